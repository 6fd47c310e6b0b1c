"""Label options of `switchrl simulate` beyond the paper: cost-aware utilities and on-policy finishes."""

from __future__ import annotations

import json
import os

import pytest

from switchrl.backends import CandidatePool, CandidateSampling, Trace
from switchrl.backends.transformers_backend import TransformersBackend
from switchrl.errors import CheckpointError
from switchrl.policies import RandomSwitcher
from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.records import SimulatedState
from switchrl.rollout import estimate_utilities
from switchrl.run_config import RunConfig, load_config
from switchrl.trainers.simulate import simulate
from tests.test_simulate_run import CRASH_ENV, config_file  # noqa: F401 (the tiny simulate run)

NAMES = ["c0", "c1", "c2"]
TODAY_FIELDS = set(SimulatedState.model_fields) - {"switch_cost", "switches"}


def _sim(config: RunConfig, out, **update) -> RunConfig:
    config.simulate = config.simulate.model_copy(update={"out_dir": str(out), **update})
    return config


@pytest.fixture(scope="module")
def finisher_dir(tmp_path_factory, tiny_family):
    """A saved (untrained) LM switcher over the tiny family: decides unlike uniform random switching."""
    out = tmp_path_factory.mktemp("finisher")
    LMSwitcher.from_base(str(tiny_family[2]), NAMES, patch_tokens=2, top_p=0.9).save_pretrained(out)
    return out


def _twin_pool(tiny_family) -> CandidatePool:
    """Two copies of one greedy checkpoint: they write the same next patch, so random finishes are shared."""
    backends = [
        TransformersBackend.from_pretrained(
            f"c{i}", str(tiny_family[0]), sampling=CandidateSampling(temperature=0)
        )
        for i in range(2)
    ]
    return CandidatePool(backends, patch_tokens=2, seed=0)


def test_switch_cost_charges_each_finish_its_own_author_changes(tiny_family):
    pool = _twin_pool(tiny_family)
    state = Trace(key="s", query="the town", max_new_tokens=8)
    pool.step([state], [0])  # the prefix: one patch by c0

    def estimate(cost: float):
        (u,) = estimate_utilities(
            pool,
            [state],
            ["x"],
            lambda query, response, reference, **meta: 1.0,
            k=4,
            finisher=RandomSwitcher(2, seed=3),
            switch_cost=cost,
        )
        return u

    free, costly = estimate(0.0), estimate(0.1)
    assert free.responses[0] == free.responses[1]  # shared finishes ...
    for i in range(2):
        assert free.utilities[i] == sum(free.scores[i]) / 4  # cost 0: the mean score, exactly
        assert all(text.startswith(state.text) for text in free.responses[i])
    # ... but each is charged with its own patch after c0's prefix: c1's is a change (+1), and then
    # one more if the finish goes back to c0 (+2) or one fewer if it goes on with c1 (0)
    diffs = {b - a for a, b in zip(costly.switches[0], costly.switches[1])}
    assert diffs <= {0, 1, 2} and diffs != {0}
    for i in range(2):
        expected = sum(1.0 - 0.1 * w for w in costly.switches[i]) / 4
        assert costly.utilities[i] == pytest.approx(expected)
        assert costly.mean_switches[i] == sum(costly.switches[i]) / 4
    assert costly.utilities != free.utilities


def test_cost_aware_labels_are_recorded_and_fingerprinted(config_file, tmp_path):  # noqa: F811
    plain = simulate(_sim(load_config(config_file), tmp_path / "plain"), progress=False).records()
    assert all(set(r) == TODAY_FIELDS for r in plain)  # default: today's records, no new keys
    costly_cfg = _sim(load_config(config_file), tmp_path / "costly", switch_cost=0.25)
    costly = simulate(costly_cfg, progress=False).records()
    assert [r["prefix"] for r in costly] == [r["prefix"] for r in plain]  # same states
    for r, p in zip(costly, plain):
        assert r["switch_cost"] == 0.25 and len(r["switches"]) == 3
        assert SimulatedState.model_validate(r).model_dump(mode="json") == r  # the record round-trips
        for u, u0, w in zip(r["utilities"], p["utilities"], r["switches"]):
            assert u == pytest.approx(u0 - 0.25 * w)  # same finishes, each charged its switches
    assert any(max(r["switches"]) > 0 for r in costly)
    manifest = json.loads((tmp_path / "costly" / "manifest.json").read_text())
    assert manifest["fingerprint"]["simulate"]["switch_cost"] == 0.25
    plain_manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert "switch_cost" not in plain_manifest["fingerprint"]["simulate"]  # old runs still resume
    with pytest.raises(CheckpointError, match="differs in: simulate"):  # another cost: not a resume
        simulate(_sim(load_config(config_file), tmp_path / "costly", switch_cost=0.5), progress=False)


def test_a_saved_switcher_as_finisher_gives_on_policy_labels(config_file, finisher_dir, tmp_path):  # noqa: F811
    random_recs = simulate(_sim(load_config(config_file), tmp_path / "random"), progress=False).records()
    on_policy = _sim(load_config(config_file), tmp_path / "a", finisher=str(finisher_dir))
    a = simulate(on_policy, progress=False).records()
    assert [r["prefix"] for r in a] == [r["prefix"] for r in random_recs]  # the states are random switching
    assert [r["utilities"] for r in a] != [r["utilities"] for r in random_recs]
    b = simulate(_sim(load_config(config_file), tmp_path / "b", finisher=str(finisher_dir)), progress=False)
    assert b.records() == a  # reproducible: finishes sampled from (seed, finish key, patch)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["fingerprint"]["simulate"]["finisher"] == str(finisher_dir)
    assert len(manifest["fingerprint"]["simulate"]["finisher_signature"]) == 16

    crashed = _sim(load_config(config_file), tmp_path / "crashed", finisher=str(finisher_dir))
    os.environ[CRASH_ENV] = str(2 * 3 * 3 + 5)  # inside the second shard
    try:
        with pytest.raises(KeyboardInterrupt):
            simulate(crashed, progress=False)
    finally:
        del os.environ[CRASH_ENV]
    assert simulate(crashed, progress=False).records() == a  # resumed: the same records

    LMSwitcher.from_pretrained(str(finisher_dir), top_p=0.5).save_pretrained(finisher_dir)  # "retrained"
    with pytest.raises(CheckpointError, match="differs in: simulate"):
        simulate(_sim(load_config(config_file), tmp_path / "a", finisher=str(finisher_dir)), progress=False)


def test_finisher_must_be_a_switcher_directory(config_file, tiny_family, tmp_path):  # noqa: F811
    for wrong in (tmp_path / "no-such-switcher", tiny_family[0]):  # missing; a model, not a switcher
        with pytest.raises(CheckpointError, match="simulate.finisher: .* is not a saved LM switcher"):
            simulate(_sim(load_config(config_file), tmp_path / "x", finisher=str(wrong)), progress=False)
    assert not (tmp_path / "x").exists()  # refused before anything was written

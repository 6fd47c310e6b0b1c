"""The cost sweep (configs/experiments/cost_sweep.py) simulates once and relabels per cost: that must give
the labels `switchrl simulate` gives at each cost itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchrl.run_config import RunConfig, load_config
from switchrl.trainers.simulate import simulate
from tests.conftest import load_script
from tests.test_simulate_run import config_file  # noqa: F401 (the tiny simulate run)

RUNNER = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "cost_sweep.py"


def _runner():
    return load_script(RUNNER)


def _sim(config: RunConfig, out, cost: float) -> list[dict]:
    config.simulate = config.simulate.model_copy(update={"out_dir": str(out), "switch_cost": cost})
    return simulate(config, progress=False).records()


def test_one_simulate_relabelled_per_cost_gives_each_costs_own_labels(config_file, tmp_path):  # noqa: F811
    relabel = _runner().relabel
    seed = load_config(config_file).generation.seed
    once = _sim(load_config(config_file), tmp_path / "once", 0.25)
    for cost in (0.0, 0.1, 0.25):
        direct = _sim(load_config(config_file), tmp_path / f"c{cost}", cost)
        derived = relabel(once, cost, seed)
        assert [r["label"] for r in derived] == [r["label"] for r in direct]
        assert [r["tie"] for r in derived] == [r["tie"] for r in direct]
        assert [r["all_equal"] for r in derived] == [r["all_equal"] for r in direct]
        for d, r in zip(derived, direct):
            assert d["utilities"] == pytest.approx(r["utilities"], abs=1e-12)
    labels = {c: [r["label"] for r in relabel(once, c, seed)] for c in (0.0, 5.0)}
    assert labels[0.0] != labels[5.0]  # the cost changes labels (else this test would prove nothing)
    with pytest.raises(ValueError, match="no switches recorded"):
        relabel(_sim(load_config(config_file), tmp_path / "free", 0.0), 0.1, seed)


def _row(split: str, system: str, accuracy: float, switches: float, cost: float | None = 0.02) -> dict:
    return {"split": split, "cost": cost, "system": system, "accuracy": accuracy, "switches": switches}


def test_seed_summary_and_the_validation_choice():
    runner = _runner()
    rows = [
        _row("validation", "sft (cost 0)", 80.0, 6.0, cost=None),
        *(
            _row("validation", f"grpo (seed {s})", a, w)
            for s, a, w in [(0, 95, 1.0), (1, 39, 0.0), (2, 92, 2.0)]
        ),
        *(
            _row("validation", f"grpo-switch_cost_warmup_steps20 (seed {s})", a, w)
            for s, a, w in [(0, 90, 3.0), (1, 91, 3.0), (2, 92, 0.05)]  # 0.05 switches: collapsed
        ),
        _row("validation", "grpo-beta0.1 (seed 0)", 99.0, 1.0),  # one seed: no summary
        _row("test", "grpo (seed 0)", 93.0, 1.3),
        _row("test", "grpo (seed 1)", 40.0, 0.0),
    ]
    sums = {(s["split"], s["variant"]): s for s in runner.summary(rows)}
    assert set(sums) == {
        ("validation", "grpo"),
        ("validation", "grpo-switch_cost_warmup_steps20"),
        ("test", "grpo"),
    }
    plain = sums[("validation", "grpo")]
    assert (plain["seeds"], plain["switches"], plain["collapsed"]) == (3, 1.0, 1)
    assert plain["accuracy"] == pytest.approx(75.33, abs=0.005)
    assert plain["accuracy_sd"] == pytest.approx(31.5, abs=0.05)  # sd over seeds, n - 1
    warm = sums[("validation", "grpo-switch_cost_warmup_steps20")]
    assert (warm["accuracy"], warm["accuracy_sd"], warm["collapsed"]) == (91.0, 1.0, 1)
    # the choice: the most accurate on validation among those with >= 40% fewer switches than SFT (6.0)
    assert runner.select(list(sums.values()), 6.0)["variant"] == "grpo-switch_cost_warmup_steps20"
    assert runner.select(list(sums.values()), 3.0)["variant"] == "grpo"  # 2.02 > 0.6 x 3.0: warm-up excluded
    assert runner.select(list(sums.values()), 1.0) is None


def test_each_rl_variant_and_seed_gets_its_own_run_and_eval(tmp_path):
    runner = _runner()
    import yaml

    base = yaml.safe_load((RUNNER.parent / "cost_sweep.yaml").read_text())
    config = runner.config_for(base, 0, tmp_path, 0.02, 0.1, "paper")
    warm = {"switch_cost_warmup_steps": 20}
    run = runner.rl_variant(config, "grpo", 2, warm, "validation")
    assert (run.rl.seed, run.rl.switch_cost, run.rl.switch_cost_warmup_steps) == (2, 0.02, 20)
    assert run.rl.init == str(tmp_path / runner.PAPER_SFT)
    assert run.eval.split == "validation" and run.eval.systems == ["rl"]
    assert run.eval.rl_path == str(Path(run.rl.out_dir) / "switcher")
    dirs = {
        (
            runner.rl_variant(config, a, s, v, sp).rl.out_dir,
            runner.rl_variant(config, a, s, v, sp).eval.out_dir,
        )
        for a in ("grpo", "ppo")
        for s in (0, 1)
        for v in ({}, warm)
        for sp in ("validation", "test")
    }
    assert len({d for d, _ in dirs}) == 8 and len({e for _, e in dirs}) == 16

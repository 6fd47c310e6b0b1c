"""`switchrl simulate` end to end: resume after a crash and Ray vs local give the same records."""

from __future__ import annotations

import json
import os

import pytest

from switchrl.cli import main
from switchrl.run_config import RunConfig, load_config
from switchrl.trainers.simulate import simulate

CRASH_ENV = "SWITCHRL_TEST_CRASH_AFTER"  # process-wide: the resolver imports this module under another name


def flaky_scorer(query, response, reference, **meta):
    """Scores word overlap; when armed, interrupts the whole process after N calls (a crash, not an error)."""
    if CRASH_ENV in os.environ:
        left = int(os.environ[CRASH_ENV]) - 1
        os.environ[CRASH_ENV] = str(left)
        if left < 0:
            raise KeyboardInterrupt("simulated crash")
    return float(len(set(response.split()) & set(reference.split())))


@pytest.fixture()
def config_file(tmp_path, tiny_family):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "query": q, "reference": "river town park"}) + "\n"
            for i, q in enumerate(["the town", "a red bridge", "one two", "the park is"])
        )
    )
    cfg = {
        "candidates": [{"name": f"c{i}", "path": str(p)} for i, p in enumerate(tiny_family)],
        "generation": {"patch_tokens": 2, "max_new_tokens": 6, "seed": 3},
        "tasks": [{"source": "jsonl", "path": str(tasks), "split": "train"}],
        "reward": {"scorers": [{"scorer": "tests.test_simulate_run:flaky_scorer"}]},
        "simulate": {
            "k": 3,
            "states_per_query": 2,
            "states_per_batch": 2,
            "chunk_size": 2,
            "out_dir": str(tmp_path / "sim"),
        },
    }
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def _with_out(config: RunConfig, out) -> RunConfig:
    config.simulate = config.simulate.model_copy(update={"out_dir": str(out)})
    return config


def test_resume_after_crash_gives_the_same_records(config_file, tmp_path):
    reference = simulate(_with_out(load_config(config_file), tmp_path / "full"), progress=False).records()
    assert len(reference) == 8 and len({r["id"] for r in reference}) == 8

    crashed = _with_out(load_config(config_file), tmp_path / "crashed")
    os.environ[CRASH_ENV] = str(
        2 * 3 * 3 + 5
    )  # inside the second shard (a shard: 2 states x 3 candidates x k=3)
    try:
        with pytest.raises(KeyboardInterrupt):
            simulate(crashed, progress=False)
    finally:
        del os.environ[CRASH_ENV]
    manifest = json.loads((tmp_path / "crashed" / "manifest.json").read_text())
    done_before = sum(len(s["item_ids"]) for s in manifest["shards"])
    assert 0 < done_before < 8
    resumed = simulate(crashed, progress=False).records()
    assert resumed == reference  # same states, utilities and labels; each record once


def test_cli_simulate_prints_a_summary(config_file, capsys):
    assert main(["simulate", "--config", str(config_file)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["states"] == 8
    assert sum(summary["label_share"].values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_ray_simulate_writes_the_records_of_local(config_file, tmp_path):
    ray = pytest.importorskip("ray")
    local = simulate(_with_out(load_config(config_file), tmp_path / "local"), progress=False).records()
    config = _with_out(load_config(config_file), tmp_path / "ray")
    config.executor = config.executor.model_copy(
        update={"executor": "ray", "replicas": 2, "num_cpus_per_replica": 1}
    )
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        remote = simulate(config, progress=False).records()
    finally:
        ray.shutdown()
    assert remote == local

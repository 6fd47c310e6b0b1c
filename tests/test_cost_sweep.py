"""The cost sweep (configs/experiments/cost_sweep.py) simulates once and relabels per cost: that must give
the labels `switchrl simulate` gives at each cost itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from switchrl.run_config import RunConfig, load_config
from switchrl.trainers.simulate import simulate
from tests.test_simulate_run import config_file  # noqa: F401 (the tiny simulate run)

RUNNER = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "cost_sweep.py"


def _runner():
    spec = importlib.util.spec_from_file_location("cost_sweep", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

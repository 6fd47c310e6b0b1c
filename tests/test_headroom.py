"""The headroom experiment (configs/experiments/headroom.py): its config per task and seed, and the
verdict it prints against issue 18's target (SFT <= oracle - 10, then GRPO >= SFT + 5, CIs apart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import load_script

RUNNER = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "headroom.py"


def _runner():
    return load_script(RUNNER)


def _row(system: str, accuracy: float, ci95: float) -> dict:
    return {
        "task": "t",
        "system": system,
        "accuracy": accuracy,
        "ci95": ci95,
        "switches": 1.0,
        "seconds": None,
    }


def test_config_runs_the_task_on_the_seed_with_every_output_under_out(tmp_path):
    runner = _runner()
    base = yaml.safe_load((RUNNER.parent / "headroom.yaml").read_text())
    config = runner.config_for(base, "three_towns", 1, tmp_path)
    assert config.testbed.seed == 1 and [t.task for t in config.tasks] == ["three_towns"]
    assert config.simulate.k == 32 and config.eval.seeds == [0, 1] and config.eval.limit == 200
    assert config.rl.init == config.sft.out_dir == config.eval.sft_path == str(tmp_path / "sft")
    assert config.eval.rl_path == str(tmp_path / "rl" / "switcher")
    assert all(
        p.startswith(str(tmp_path)) for p in (config.simulate.out_dir, config.rl.out_dir, config.eval.out_dir)
    )


def test_verdict_needs_room_then_a_gain_whose_cis_do_not_overlap():
    verdict = _runner().verdict
    oracle = _row("oracle", 98.0, 1.0)
    met = verdict([oracle, _row("sft", 80.0, 5.0), _row("rl", 92.0, 3.0)])
    assert met == [
        "headroom (oracle - sft) +18.0: met (>= 10)",
        "gain (rl - sft) +12.0, CIs apart: met (>= 5, CIs apart)",
    ]
    overlap = verdict([oracle, _row("sft", 80.0, 5.0), _row("rl", 87.0, 3.0)])  # +7 but 85 > 84
    assert overlap[1] == "gain (rl - sft) +7.0, CIs overlap: NOT met (>= 5, CIs apart)"
    no_room = verdict([oracle, _row("sft", 90.0, 3.0)])
    assert no_room == ["headroom (oracle - sft) +8.0: NOT met (>= 10)"]
    assert verdict([oracle, _row("random", 40.0, 6.0)]) == []  # a probe: nothing to judge yet


@pytest.mark.testbed
def test_probe_rows_are_the_singles_the_oracle_and_random_on_validation(tmp_path):
    rows, stages = _runner().probe("compositional", 0, tmp_path, n=3)
    assert [r["system"] for r in rows] == ["pretrained", "finetuned", "aligned", "oracle", "random"]
    assert all(r["task"] == "compositional" and r["seconds"] is None for r in rows)
    assert (
        rows[3]["accuracy"] == 100.0
    )  # the shipped seed-0 family: the oracle solves the first 3 validation queries
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["split"] == "validation" and results["seeds"] == [0]
    assert set(stages) == {"eval"}

"""The cheap-labels experiment (configs/experiments/cheap_labels.py): k = 4 labels are a subsample of the
k = 32 labels' finishes (so the comparison is of k alone), and each system is charged every stage it needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from switchrl.backends import Trace
from switchrl.errors import CheckpointError
from switchrl.policies import RandomSwitcher
from switchrl.rollout import estimate_utilities
from tests.conftest import load_script, make_pool

RUNNER = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "cheap_labels.py"


def _runner():
    return load_script(RUNNER)


def _estimate(pool, k: int):
    calls: list[str] = []

    def scorer(query, response, reference, **meta):
        calls.append(response)
        return float(len(set(response.split()) & {"river", "town", "park"})) + len(response) % 3

    states = [
        Trace(key=f"s{i}", query=q, max_new_tokens=12) for i, q in enumerate(["the town", "one two", "a red"])
    ]
    pool.step(states, [0, 1, 2])
    pool.step(states, [2, 0, 1])
    finisher = RandomSwitcher(len(pool), seed=pool.seed)
    return estimate_utilities(pool, states, ["x"] * 3, scorer, k=k, finisher=finisher, switch_cost=0.1), calls


def test_the_finishes_of_a_smaller_k_are_the_first_of_a_larger_k(tiny_family):
    """Finish j is seeded by its key (state/candidate/j), not by k nor by the batch the k finishes make."""
    small, _ = _estimate(make_pool(tiny_family, patch_tokens=3, seed=5), 2)
    large, calls = _estimate(make_pool(tiny_family, patch_tokens=3, seed=5), 7)
    assert len(calls) >= 7
    for s, b in zip(small, large):
        assert [p.text for p in s.next_patches] == [p.text for p in b.next_patches]
        assert [r[:2] for r in b.responses] == s.responses
        assert [x[:2] for x in b.scores] == s.scores
        assert [w[:2] for w in b.switches] == s.switches
    # the larger k draws more distinct finishes (else nesting would be trivially true)
    assert any(len(set(r)) > 2 for b in large for r in b.responses)


def test_each_system_is_charged_every_stage_it_needed():
    runner = _runner()
    stages = {
        "sim-k4": (10.0, 5.0),
        "sim-k32": (80.0, 40.0),
        "sft-k4": (20.0, 10.0),
        "sft-k32": (30.0, 15.0),
        "grpo-sft-k4": (50.0, 12.0),
        "grpo-untuned": (60.0, 30.0),
    }
    cost = runner.seconds(stages, [4, 32])
    assert cost == {
        "sft-k4": (30.0, 15.0),
        "sft-k32": (110.0, 55.0),
        "grpo-sft-k4": (80.0, 27.0),
        "grpo-untuned": (60.0, 30.0),
    }
    rows = [
        {"system": "sft-k32", "accuracy": 90.0, "seconds": 110.0, "cpu_seconds": 55.0},
        {"system": "grpo-sft-k4", "accuracy": 88.5, "seconds": 80.0, "cpu_seconds": 27.0},
    ]
    v = runner.verdict(rows, [4, 32])
    assert v["points_behind"] == pytest.approx(1.5) and v["cpu_share"] == pytest.approx(27 / 55)
    assert v["wall_share"] == pytest.approx(80 / 110) and v["met"]
    rows[1]["accuracy"] = 87.5  # 2.5 points behind
    assert not runner.verdict(rows, [4, 32])["met"]
    rows[1].update(accuracy=95.0, cpu_seconds=34.0)  # ahead, but 62% of the seconds
    assert not runner.verdict(rows, [4, 32])["met"]


def test_a_curve_checkpoint_is_the_switcher_of_a_run_that_stopped_there(tiny_family, tmp_path):
    """The curve's N-step point (checkpoint N of one longer GRPO run, made a switcher) has exactly the
    weights of an N-step run, the last checkpoint's are the run's own switcher, and the clock has every step."""
    from safetensors.torch import load_file

    from switchrl.policies.lm_switcher import LMSwitcher
    from switchrl.trainers.rl import train
    from switchrl.trainers.rl_setup import checkpoint_switcher
    from tests.test_grpo import make_config, rl_section

    config = make_config(tiny_family, tmp_path)
    long = rl_section(tiny_family, tmp_path / "long", steps=4, save_steps=2, beta=0.02)
    train(config, "grpo", rl=long)
    short = train(config, "grpo", rl=long.model_copy(update={"steps": 2, "out_dir": str(tmp_path / "short")}))
    point = checkpoint_switcher(long.out_dir, 2, tmp_path / "s2")
    weights = "adapter_model.safetensors"
    a, b = load_file(point / weights), load_file(short.policy_dir / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = load_file(checkpoint_switcher(long.out_dir, 4, tmp_path / "s4") / weights)
    final = load_file(Path(long.out_dir) / "switcher" / weights)
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in last)
    assert any(not torch.equal(a[k], last[k]) for k in a)  # steps 3-4 moved the weights
    assert LMSwitcher.from_pretrained(point).n_candidates == len(tiny_family)
    clock = json.loads((Path(long.out_dir) / "rl_log.json").read_text())["clock"]
    assert [c["step"] for c in clock] == [1, 2, 3, 4]
    assert all(0 < x["cpu"] < y["cpu"] and 0 < x["wall"] < y["wall"] for x, y in zip(clock, clock[1:]))
    with pytest.raises(CheckpointError, match="step 3 .*rl.save_steps"):
        checkpoint_switcher(long.out_dir, 3, tmp_path / "s3")

"""The cheap-labels experiment (configs/experiments/cheap_labels.py): k = 4 labels are a subsample of the
k = 32 labels' finishes (so the comparison is of k alone), and each system is charged every stage it needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchrl.backends import Trace
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

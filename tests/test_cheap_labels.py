"""The cheap-labels experiment (configs/experiments/cheap_labels.py): k = 4 labels are a subsample of the
k = 32 labels' finishes (so the comparison is of k alone), and each system is charged every stage it needed."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from switchrl.backends import Trace
from switchrl.errors import CheckpointError, ConfigError
from switchrl.policies import RandomSwitcher
from switchrl.rollout import estimate_utilities
from switchrl.run_config import RLSection
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
    """SFT(k): its simulate + SFT; a GRPO checkpoint at step N: SFT(k_min)'s stages + the GRPO stage less
    what its clock measured after step N (set-up and the final save stay charged to every point)."""
    runner = _runner()
    stages = {
        "sim-k4": (10.0, 5.0),
        "sim-k32": (80.0, 40.0),
        "sft-k4": (20.0, 10.0),
        "sft-k32": (30.0, 15.0),
        "grpo-untuned": (60.0, 30.0),
    }
    assert runner.seconds(stages, [4, 32]) == {
        "sft-k4": (30.0, 15.0),
        "sft-k32": (110.0, 55.0),
        "grpo-untuned": (60.0, 30.0),
    }
    clock = [{"step": n, "wall": 3.0 * n, "cpu": 2.0 * n} for n in range(1, 11)]  # 10 steps
    # the stage: 35 s wall / 24 s CPU, of which 5 / 4 before step 1 or after step 10
    assert runner.curve_seconds((35.0, 24.0), clock, [2, 10]) == {2: (11.0, 8.0), 10: (35.0, 24.0)}


def _rows(split: str, acc: dict[str, float], cpu: dict[str, float]) -> list[dict]:
    return [
        {
            "split": split,
            "system": s,
            "accuracy": a,
            "ci95": 1.0,
            "seconds": 2 * cpu[s],
            "cpu_seconds": cpu[s],
        }
        for s, a in acc.items()
    ]


def test_the_verdicts_the_first_point_within_the_margin_and_the_choice_on_validation():
    runner = _runner()
    cpu = {"sft-k32": 50.0, "g-s2": 20.0, "g-s4": 28.0, "g-s8": 40.0, "v-s2": 18.0, "v-s4": 30.0}
    test = _rows("test", {"sft-k32": 90.0, "g-s2": 85.0, "g-s4": 88.5, "g-s8": 93.0}, cpu)
    v = runner.verdict(test, "g-s4", "sft-k32")
    assert v["points_behind"] == pytest.approx(1.5) and v["cpu_share"] == pytest.approx(28 / 50)
    assert v["wall_share"] == pytest.approx(56 / 100) and v["met"]
    assert not runner.verdict(test, "g-s2", "sft-k32")["met"]  # 5 points behind
    assert not runner.verdict(test, "g-s8", "sft-k32")["met"]  # ahead, but 80% of the seconds
    assert runner.first_within(test, ["g-s2", "g-s4", "g-s8"], "sft-k32") == "g-s4"
    assert runner.first_within(test, ["g-s2"], "sft-k32") is None
    # on validation: the most accurate point within the budget (30 CPU s), ties to the cheaper one
    val = _rows("validation", {"g-s2": 80.0, "g-s4": 84.0, "g-s8": 99.0, "v-s2": 84.0, "v-s4": 84.0}, cpu)
    assert runner.select(val, ["g-s2", "g-s4", "g-s8", "v-s2", "v-s4"], 30.0) == "v-s2"
    assert runner.select(val, ["g-s2", "g-s4"], 30.0) == "g-s4"
    assert runner.select(val, ["g-s8"], 30.0) is None
    verdicts, lines = runner.verdict_lines([*val, *test], ["g-s2", "g-s4", "g-s8"], "g-s4", "sft-k32")
    assert verdicts["first within the margin"]["system"] == "g-s4" and verdicts["last"]["system"] == "g-s8"
    assert verdicts["chosen on validation"]["met"] and any("chosen on validation" in x for x in lines)


def test_a_variant_is_named_by_its_overrides_and_its_points_tabled_per_split():
    runner = _runner()
    overrides = runner.parse_variant("queries_per_step=4, learning_rate=0.005")
    assert overrides == {"queries_per_step": 4, "learning_rate": 5e-3} and runner.parse_variant("") == {}
    assert runner.variant_name("grpo-sft-k4", overrides) == "grpo-sft-k4-queries_per_step4-learning_rate0.005"
    # YAML reads 5e-3 as a string: the run's settings are validated, so it is the float, and a typo is named
    rl = runner.rl_settings(RLSection(), runner.parse_variant("learning_rate=5e-3,beta=0"))
    assert rl.learning_rate == 5e-3 and rl.beta == 0.0
    with pytest.raises(ConfigError, match="learning_rat"):
        runner.rl_settings(RLSection(), {"learning_rat": 0.1})
    rows = _rows(
        "validation", {"sft-k32": 90.0, "g-s2": 80.0, "v-s2": 70.0}, {"sft-k32": 50, "g-s2": 20, "v-s2": 10}
    )
    rows += _rows("test", {"sft-k32": 91.0, "g-s2": 81.0}, {"sft-k32": 50, "g-s2": 20})
    for r in rows:
        r["steps"] = 2 if r["system"] != "sft-k32" else None
    lines = runner.curve_table(rows, 50.0).splitlines()
    assert len(lines) == 4  # header, rule, one line per GRPO checkpoint (sft-k32 is not one)
    assert lines[2] == "| g-s2 | 2 | 20.0 | 40.0 | 40% | 80.0 ± 1.0 | 81.0 ± 1.0 |"
    assert lines[3] == "| v-s2 | 2 | 10.0 | 20.0 | 20% | 70.0 ± 1.0 | – |"  # validation only


def test_the_learning_curve_figure_is_a_small_png():
    from switchrl.report_figures import learning_curve_chart

    png = base64.b64decode(
        learning_curve_chart(
            {"GRPO": [(20.0, 0.85, 0.03), (10.0, 0.8, 0.04)]},
            {"sft-k32": (50.0, 0.9, 0.02), "none": (5.0, 0.5, None)},
            "CPU seconds",
            budget=30.0,
            title="t",
        )
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 150_000


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

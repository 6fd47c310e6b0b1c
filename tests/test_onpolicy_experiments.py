"""The rules of issue 18's items 4 and 5 (configs/experiments/on_policy.py, credit.py): which round-2
states carry a label, what round 2 trains from and on, and the step count that equalises CPU seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import load_script

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiments"


def _script(name: str):
    return load_script(EXPERIMENTS / f"{name}.py")


def test_round_two_keeps_only_states_whose_candidates_write_different_patches():
    informative = _script("on_policy").informative
    records = [
        {"id": "same", "next_patches": [" a", " a", " a"], "utilities": [0.5, 0.25, 0.75]},
        {"id": "two", "next_patches": [" a", " a", " b"], "utilities": [0.5, 0.5, 0.5]},
        {"id": "all", "next_patches": [" a", " b", " c"], "utilities": [0.0, 1.0, 0.0]},
    ]
    # "same": its unequal utilities are finish noise (an on-policy finisher never shares finishes)
    assert [r["id"] for r in informative(records)] == ["two", "all"]


def test_round_two_labels_come_from_round_one_finishes_in_their_own_directory(tmp_path):
    on_policy = _script("on_policy")
    base = yaml.safe_load((EXPERIMENTS / "on_policy.yaml").read_text())
    r1 = on_policy.config_for(base, 1, tmp_path)
    assert r1.testbed.seed == 1 and r1.simulate.finisher == "random"
    assert r1.rl.init == r1.sft.out_dir == r1.eval.sft_path  # GRPO starts from round 1
    scratch = on_policy.round2(r1, tmp_path, None, on_policy.R2_SCRATCH)
    cont = on_policy.round2(r1, tmp_path, r1.sft.out_dir, on_policy.R2_FROM_R1)
    for r2 in (scratch, cont):
        assert r2.simulate.finisher == r1.sft.out_dir
        assert r2.simulate.out_dir != r1.simulate.out_dir  # round 1's labels stay
        assert r2.sft.out_dir not in (r1.sft.out_dir, r1.rl.init)
        assert r2.simulate.k == r1.simulate.k and r2.sft.epochs == r1.sft.epochs
    assert scratch.sft.init is None and cont.sft.init == r1.sft.out_dir
    assert r1.simulate.finisher == "random" and r1.sft.init is None  # round 1 left as it was


def test_fork_steps_for_equal_cpu_seconds():
    credit = _script("credit")
    assert credit.equal_cpu_steps(50, 100.0, 125.0) == 40  # fork dearer per step: fewer steps
    assert credit.equal_cpu_steps(50, 100.0, 80.0) == 62  # cheaper: more (62.5 rounds to even)
    assert credit.equal_cpu_steps(2, 1.0, 100.0) == 1
    with pytest.raises(ValueError):
        credit.equal_cpu_steps(50, 100.0, 0.0)
    history = [{"frac_reward_zero_std": 0.5}, {"frac_reward_zero_std": 1.0}, {"loss": 0.1}]
    assert credit.zero_std_share(history) == 0.75
    assert credit.zero_std_share([{"loss": 0.1}]) is None


def test_the_controls_train_round_one_labels_for_round_twos_optimiser_steps(tmp_path):
    on_policy = _script("on_policy")
    assert on_policy.sft_steps(31, 5, 32) == 5  # seed 0's round 1: one batch per epoch
    assert on_policy.sft_steps(34, 5, 32) == 10  # its round 2: two
    assert on_policy.sft_steps(34, 2.5, 32) == 5
    base = yaml.safe_load((EXPERIMENTS / "on_policy.yaml").read_text())
    r1 = on_policy.config_for(base, 0, tmp_path)
    for name, examples in ((on_policy.R1, 31), (on_policy.R2_SCRATCH, 34)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sft_log.json").write_text(f'{{"examples": {examples}, "history": []}}')
    short, long = on_policy.controls(r1, tmp_path)
    assert (short.sft.max_steps, long.sft.max_steps) == (10, 15)  # round 2; round 1 then round 2
    for c in (short, long):
        assert c.sft.init is None and c.simulate.out_dir == r1.simulate.out_dir  # round 1's labels
        assert c.sft.out_dir not in (r1.sft.out_dir, str(tmp_path / on_policy.R2_SCRATCH))
    assert short.sft.out_dir != long.sft.out_dir
    assert r1.sft.max_steps == -1  # round 1 itself untouched

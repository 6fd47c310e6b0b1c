"""``rl.switch_cost_warmup_steps``: the switch cost rises linearly from 0 over the first updates (GRPO, PPO),
is validated, and sb3-ppo (a fixed env cost) refuses it; GRPO's reward scaling is configurable."""

from __future__ import annotations

import pytest
from test_grpo import make_config, rl_section

from switchrl.errors import ConfigError
from switchrl.run_config import RLSection
from switchrl.trainers.rl import train


def test_switch_cost_ramps_linearly_then_stays():
    rl = RLSection(steps=10, switch_cost=0.1, switch_cost_warmup_steps=4)
    assert [rl.switch_cost_at(s) for s in (0, 1, 2, 4, 9)] == pytest.approx([0, 0.025, 0.05, 0.1, 0.1])
    assert RLSection(switch_cost=0.1).switch_cost_at(0) == 0.1  # no warm-up: the full cost from the start


def test_bad_warmups_are_named():
    with pytest.raises(ValueError, match="needs a switch_cost > 0"):
        RLSection(switch_cost_warmup_steps=3)
    with pytest.raises(ValueError, match="must be below steps"):
        RLSection(steps=5, switch_cost=0.1, switch_cost_warmup_steps=5)


def test_grpo_charges_the_ramped_cost(tiny_family, tmp_path):
    rl = rl_section(tiny_family, tmp_path, steps=3, switch_cost=0.5, switch_cost_warmup_steps=2)
    history = train(make_config(tiny_family, tmp_path), "grpo", rl=rl).history
    assert [h["switch_cost"] for h in history] == [0.0, 0.25, 0.5]
    for h in history:  # TRL's reward = score + weight (rl.switch_cost) x the ramped -switches
        assert h["reward"] == pytest.approx(h["rewards/score/mean"] + 0.5 * h["rewards/switch_cost/mean"])
    assert history[0]["rewards/switch_cost/mean"] == 0.0
    assert history[-1]["rewards/switch_cost/mean"] < 0  # the tiny random switchers do switch


def test_ppo_charges_the_ramped_cost(tiny_family, tmp_path):
    rl = rl_section(
        tiny_family, tmp_path, steps=2, switch_cost=0.5, switch_cost_warmup_steps=1, learning_rate=1e-6
    )  # a small step, so the random switcher still switches at step 2
    history = train(make_config(tiny_family, tmp_path), "ppo", rl=rl).history
    assert [h["switch_cost"] for h in history] == [0.0, 0.5]
    assert history[0]["reward"] == pytest.approx(history[0]["score"])
    assert history[1]["switch/rate"] > 0 and history[1]["reward"] < history[1]["score"]


def test_sb3_refuses_a_warmup(tiny_family, tmp_path):
    rl = rl_section(tiny_family, tmp_path, steps=2, switch_cost=0.5, switch_cost_warmup_steps=1)
    with pytest.raises(ConfigError, match="sb3-ppo charges the env's fixed switch_cost"):
        train(make_config(tiny_family, tmp_path), "sb3-ppo", rl=rl)


def test_grpo_takes_the_reward_scaling(tiny_family, tmp_path):
    """``rl.scale_rewards`` reaches TRL: per group (default), per batch, or none."""
    from switchrl.trainers.grpo import grpo_config
    from switchrl.trainers.rl_setup import build_switcher, prepare

    for scale in ("group", "batch", "none"):
        setup = prepare(
            make_config(tiny_family, tmp_path), rl_section(tiny_family, tmp_path, scale_rewards=scale)
        )
        assert grpo_config(setup, build_switcher(setup)).scale_rewards == scale
    with pytest.raises(ValueError, match="scale_rewards"):
        RLSection(scale_rewards="std")

"""RL end to end on the testbed family (CI builds it once): 2 GRPO steps and 1 SB3 update."""

from __future__ import annotations

import pytest

from switchrl.config import TaskSourceConfig
from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.policies.sb3_switcher import SB3Switcher
from switchrl.run_config import RLSection, RunConfig, SB3Section
from switchrl.trainers.rl import train

pytestmark = pytest.mark.testbed


def make_testbed_config(tmp_path) -> RunConfig:
    return RunConfig(testbed={"seed": 0}, tasks=[TaskSourceConfig(source="testbed", task="compositional")])


def test_grpo_two_steps_on_the_testbed(tmp_path):
    config = make_testbed_config(tmp_path)
    rl = RLSection(
        out_dir=str(tmp_path / "grpo"),
        steps=2,
        queries_per_step=2,
        num_generations=2,
        learning_rate=2e-3,
        save_steps=1,
    )
    result = train(config, "grpo", rl=rl)
    assert len([h for h in result.history if "reward" in h]) == 2
    switcher = LMSwitcher.from_pretrained(result.policy_dir)
    assert switcher.candidate_names == ["pretrained", "finetuned", "aligned"]


def test_sb3_one_update_on_the_testbed(tmp_path):
    config = make_testbed_config(tmp_path)
    rl = RLSection(
        out_dir=str(tmp_path / "sb3"),
        sb3=SB3Section(total_timesteps=16, num_envs=2, n_steps=8, batch_size=8, n_epochs=1),
    )
    result = train(config, "sb3-ppo", rl=rl)
    assert any("train/loss" in h or "train/value_loss" in h for h in result.history)
    assert SB3Switcher.from_pretrained(result.policy_dir).n_candidates == 3

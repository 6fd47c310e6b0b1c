"""stable-baselines3 PPO on FeatureObservation(SwitchEnv): one update end to end, and the SB3Switcher adapter."""

from __future__ import annotations

import json

import numpy as np
import torch
from test_grpo import make_config, rl_section

from switchrl.backends.base import Trace
from switchrl.envs.rollout import run_switch_generation
from switchrl.policies.base import SwitchPolicy
from switchrl.policies.sb3_switcher import SB3Switcher, is_sb3_switcher_dir
from switchrl.run_config import RLSection, SB3Options
from switchrl.trainers.rl import prepare, train


def sb3_section(tiny_family, tmp_path) -> RLSection:
    # one update: 2 envs x 8 steps, two minibatches of 8, one epoch
    return rl_section(tiny_family, tmp_path, switch_cost=0.05,
                      sb3=SB3Options(total_timesteps=16, n_envs=2, n_steps=8, batch_size=8, n_epochs=1,
                                     n_features=32, net_arch=[16]))


def test_sb3_ppo_one_update_and_switcher_adapter(tiny_family, tmp_path):
    config = make_config(tiny_family, tmp_path)
    rl = sb3_section(tiny_family, tmp_path)
    result = train(config, "sb3-ppo", rl=rl)
    assert is_sb3_switcher_dir(result.policy_dir)
    assert result.history and "switch/rate" in result.history[0] and "switch/share/m2" in result.history[0]
    # exactly one update ran, and its train/* values were logged
    lines = [json.loads(x) for x in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [16, 16] and "train/approx_kl" in lines[-1]
    assert result.history == lines

    switcher = SB3Switcher.from_pretrained(result.policy_dir, seed=3)
    assert isinstance(switcher, SwitchPolicy) and switcher.n_candidates == 3
    assert switcher.model._n_updates == 1
    traces = [Trace("a", "one two three", 9), Trace("b", "red blue green", 9)]
    decisions = switcher.decide(traces)
    assert [d.action for d in decisions] == [d.action for d in switcher.decide(traces[::-1])[::-1]]
    for d in decisions:
        assert len(d.probs) == 3 and abs(sum(d.probs) - 1) < 1e-5
    # its features are those of the training env's wrapper, and its probabilities the SB3 policy's
    obs = switcher.features(traces)
    dist = switcher.model.policy.get_distribution(switcher.model.policy.obs_to_tensor(obs)[0])
    torch.testing.assert_close(dist.distribution.probs.float(), torch.tensor([d.probs for d in decisions]))
    assert obs.shape == (2, 2 * 32 + 4 * 3 + 1) and np.all(np.abs(obs) <= 1)

    setup = prepare(config, rl)
    out = run_switch_generation(setup.pool, switcher, ["one two three"], max_new_tokens=9)
    assert out[0].done and all(p.probs is not None for p in out[0].patches)

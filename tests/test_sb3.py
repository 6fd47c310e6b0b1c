"""stable-baselines3 PPO on FeatureObservation(SwitchEnv): one update end to end, and the SB3Switcher adapter."""

from __future__ import annotations

import json

import numpy as np
import torch
from test_grpo import make_config, rl_section

from switchrl.backends.base import Trace
from switchrl.policies.sb3_switcher import SB3Switcher, is_sb3_switcher_dir
from switchrl.rollout import SwitchPolicy, run_switch_generation
from switchrl.run_config import RLSection, SB3Section
from switchrl.trainers.rl import train
from switchrl.trainers.rl_setup import prepare


def sb3_section(tiny_family, tmp_path) -> RLSection:
    # one update: 2 envs x 8 steps, two minibatches of 8, one epoch
    return rl_section(
        tiny_family,
        tmp_path,
        switch_cost=0.05,
        sb3=SB3Section(
            total_timesteps=16, num_envs=2, n_steps=8, batch_size=8, n_epochs=1, n_features=32, net_arch=[16]
        ),
    )


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


def test_sb3_vec_env_steps_like_dummy_vec_env(tiny_family, tmp_path):
    """One pool call per step for all envs gives what SB3's DummyVecEnv of FeatureObservation(SwitchEnv) gives."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    from switchrl.envs import FeatureObservation, SwitchEnv, SwitchVectorEnv
    from switchrl.envs.sb3_vec_env import SB3SwitchVecEnv
    from switchrl.trainers.sb3 import env_config

    config, rl = make_config(tiny_family, tmp_path), sb3_section(tiny_family, tmp_path)
    first, second = prepare(config, rl), prepare(config, rl)  # one pool each: the two runs use the same keys
    batched = SB3SwitchVecEnv(
        SwitchVectorEnv(env_config(first), num_envs=3, pool=first.pool, autoreset_mode="SameStep"),
        n_features=32,
    )
    dummy = DummyVecEnv([lambda: FeatureObservation(SwitchEnv(env_config(second), pool=second.pool), 32)] * 3)
    for env in (batched, dummy):
        env.seed(5)
    np.testing.assert_allclose(batched.reset(), dummy.reset())
    rng, ended = np.random.default_rng(0), 0
    for _ in range(12):
        actions = rng.integers(0, 3, size=3)
        (obs_a, rew_a, done_a, info_a), (obs_b, rew_b, done_b, info_b) = (
            batched.step(actions),
            dummy.step(actions),
        )
        np.testing.assert_allclose(obs_a, obs_b)
        np.testing.assert_allclose(rew_a, rew_b)
        assert done_a.tolist() == done_b.tolist()
        for a, b, done in zip(info_a, info_b, done_a):
            assert (a["author"], a["switched"]) == (b["author"], b["switched"])
            if done:
                ended += 1
                assert a["score"] == b["score"] and a["TimeLimit.truncated"] == b["TimeLimit.truncated"]
                np.testing.assert_allclose(a["terminal_observation"], b["terminal_observation"])
    assert ended >= 3

"""SwitchVectorEnv: same results as N single envs, batched per candidate, Gymnasium autoreset; SB3 on features."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from switchrl.backends import CandidatePool
from switchrl.config import SwitchGenerationConfig
from switchrl.envs import FeatureObservation, SwitchEnv, SwitchEnvConfig, SwitchVectorEnv
from switchrl.errors import ConfigError
from switchrl.tasks.base import TaskInstance
from tests.conftest import make_pool

TASKS = [
    TaskInstance(id=f"t{i}", query=q, reference=r)
    for i, (q, r) in enumerate([("the town", "river"), ("one two", "three"), ("a red river", "bridge")])
]


def overlap(query, response, reference, **meta):
    return float(reference in response.split())


@pytest.fixture(scope="module")
def pool(tiny_family):
    return make_pool(tiny_family, patch_tokens=2, seed=3)


@pytest.fixture(scope="module")
def config():
    return SwitchEnvConfig(
        generation=SwitchGenerationConfig(patch_tokens=2, max_new_tokens=6, seed=3),
        reward=overlap,
        tasks=TASKS,
        switch_cost=0.1,
        info_timings=False,
    )


class CountingPool(CandidatePool):
    def __init__(self, pool):
        super().__init__(pool.backends, pool.patch_tokens, pool.seed)
        self.calls: list[list[int]] = []

    def step(self, traces, actions):
        self.calls.append([int(a) for a in actions])
        return super().step(traces, actions)


def test_vector_env_matches_single_envs(pool, config):
    n, seed, steps = 4, 11, 7
    actions = np.array([[(i + t) % 3 for i in range(n)] for t in range(steps)])
    vec = SwitchVectorEnv(config, num_envs=n, pool=pool)
    obs, _ = vec.reset(seed=seed)
    v_obs, v_rew, v_term, v_trunc = [obs], [], [], []
    for t in range(steps):
        obs, rew, term, trunc, _ = vec.step(actions[t])
        v_obs.append(obs), v_rew.append(rew), v_term.append(term), v_trunc.append(trunc)
    vec.close()

    for i in range(n):
        env = SwitchEnv(config, pool=pool)
        obs, _ = env.reset(seed=seed + i)
        assert obs["trace"] == v_obs[0]["trace"][i] and obs["query"] == v_obs[0]["query"][i]
        done = False
        for t in range(steps):
            if done:  # NEXT_STEP autoreset: the vector env reset this slot, ignoring the action
                obs, _ = env.reset()
                rew, term, trunc = 0.0, False, False
            else:
                obs, rew, term, trunc, _ = env.step(int(actions[t, i]))
            done = term or trunc
            assert obs["trace"] == v_obs[t + 1]["trace"][i]
            np.testing.assert_array_equal(obs["authors"], v_obs[t + 1]["authors"][i])
            assert rew == pytest.approx(v_rew[t][i])
            assert (term, trunc) == (v_term[t][i], v_trunc[t][i])
    assert any(r.any() for r in v_term) or any(r.any() for r in v_trunc)


def test_one_batched_call_per_step(pool, config):
    """Under ``generation.schedule: lockstep``; ``auto`` and ``grouped`` may serve a step in several passes
    (tests/test_generation_knobs.py)."""
    counting = CountingPool(pool)
    lockstep = config.generation.model_copy(update={"schedule": "lockstep"})
    vec = SwitchVectorEnv(config.model_copy(update={"generation": lockstep}), num_envs=3, pool=counting)
    vec.reset(seed=0)
    vec.step(np.array([2, 0, 2]))
    assert counting.calls == [[0, 2, 2]]  # one call, the rows queued per candidate
    vec.close()


def test_same_step_autoreset_reports_final_obs(pool, config):
    vec = SwitchVectorEnv(config, num_envs=2, pool=pool, autoreset_mode=AutoresetMode.SAME_STEP)
    vec.reset(seed=3)
    for _ in range(3):
        obs, _, term, trunc, info = vec.step(np.array([0, 1]))
    done = term | trunc
    assert done.all()
    assert all(o["trace"] != "" for o in info["final_obs"][done])
    assert (obs["num_patches"] == 0).all() and all(t == "" for t in obs["trace"])
    vec.close()


def test_bad_vector_input(pool, config):
    with pytest.raises(ConfigError, match="num_envs"):
        SwitchVectorEnv(config, num_envs=0, pool=pool)
    vec = SwitchVectorEnv(config, num_envs=2, pool=pool)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions: expected shape \(2,\)"):
        vec.step(np.array([0]))
    with pytest.raises(ValueError, match="outside the action space"):
        vec.step(np.array([0, 5]))


def test_sb3_ppo_trains_on_features(pool, config):
    from stable_baselines3 import PPO

    env = FeatureObservation(SwitchEnv(config, pool=pool), n_features=32, history=2)
    model = PPO("MlpPolicy", env, n_steps=8, batch_size=8, n_epochs=1, seed=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(16)
    assert model.num_timesteps >= 16
    assert any(
        not np.allclose(a.numpy(), b.detach().numpy()) for a, b in zip(before, model.policy.parameters())
    )
    action, _ = model.predict(env.reset(seed=0)[0], deterministic=True)
    assert env.action_space.contains(int(action))


def test_make_vec_uses_the_batched_env(pool, config):
    import gymnasium as gym

    from switchrl.envs import ENV_ID

    vec = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", config=config, pool=pool)
    assert isinstance(vec.unwrapped, SwitchVectorEnv) and vec.num_envs == 2
    obs, _ = vec.reset(seed=0)
    assert len(obs["query"]) == 2
    vec.close()

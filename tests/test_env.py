"""SwitchEnv: Gymnasium compliance, determinism, rewards and bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import yaml
from gymnasium.utils.env_checker import check_env

from switchrl.config import SwitchGenerationConfig
from switchrl.envs import ENV_ID, FeatureObservation, SwitchEnv, SwitchEnvConfig
from switchrl.envs.switch_env import ObservationLayout, coerce_config
from switchrl.errors import ConfigError
from switchrl.tasks.base import TaskInstance
from tests.conftest import make_pool

TASKS = [
    TaskInstance(id=f"t{i}", query=q, reference=r)
    for i, (q, r) in enumerate([("the town", "river"), ("one two", "three"), ("a red river", "bridge")])
]


def words_overlap(query, response, reference, **meta):
    return float(reference in response.split())


@pytest.fixture(scope="module")
def pool(tiny_family):
    return make_pool(tiny_family, patch_tokens=2, seed=3)


def make_config(**kw) -> SwitchEnvConfig:
    base = dict(
        generation=SwitchGenerationConfig(patch_tokens=2, max_new_tokens=6, seed=3),
        reward=words_overlap,
        tasks=TASKS,
        info_timings=False,
    )
    return SwitchEnvConfig(**{**base, **kw})


def run_episode(env, seed, actions):
    obs, info = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        obs, rew, term, trunc, info = env.step(a)
        out.append((obs, rew, term, trunc, info))
        if term or trunc:
            break
    return out


def test_check_env_passes(pool):
    check_env(SwitchEnv(make_config(), pool=pool), skip_render_check=True)


def test_check_env_passes_on_feature_wrapper(pool):
    env = FeatureObservation(SwitchEnv(make_config(), pool=pool), n_features=32, history=2)
    check_env(env, skip_render_check=True)  # warns that the env is wrapped; that is the point here
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2 * 32 + 2 * 3 + 1,) and env.observation_space.contains(obs)


def test_episode_flow_and_info(pool):
    env = SwitchEnv(make_config(), pool=pool)
    obs, info = env.reset(seed=1)
    assert obs["trace"] == "" and obs["num_patches"] == 0 and (obs["authors"] == -1).all()
    assert obs["query"] == info["query"] == env.instance.query
    rewards, authors = [], []
    for a in [2, 0, 1]:
        obs, rew, term, trunc, info = env.step(a)
        rewards.append(rew)
        authors.append(a)
        assert info["author"] == a and info["author_name"] == f"c{a}"
        assert env.observation_space.contains(obs)
        if term or trunc:
            break
    assert term or trunc
    assert info["text"] == info["response"] == env.trace.text
    assert info["num_tokens"] == env.trace.num_tokens <= 6
    assert list(obs["authors"][: len(authors)]) == authors
    assert rewards[:-1] == [0.0] * (len(rewards) - 1)
    assert rewards[-1] == info["score"] == words_overlap("", env.trace.text, env.instance.reference)
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(0)


def test_same_seed_same_episode(pool):
    env = SwitchEnv(make_config(), pool=pool)
    a = run_episode(env, 7, [0, 1, 2])
    b = run_episode(env, 7, [0, 1, 2])
    assert [x[0]["trace"] for x in a[1:]] == [x[0]["trace"] for x in b[1:]]
    assert [x[4]["trace_key"] for x in a[1:]] == [x[4]["trace_key"] for x in b[1:]]
    keys = {run_episode(env, s, [0])[1][4]["trace_key"] for s in range(5)}
    assert len(keys) == 5


def test_switch_cost_and_shaping(pool):
    cfg = make_config(switch_cost=0.25, shaping=lambda trace, patch: 0.5, reward=lambda *a, **k: 0.0)
    env = SwitchEnv(cfg, pool=pool)
    steps = run_episode(env, 0, [0, 1, 1])
    expected = [0.5, 0.25, 0.5]
    assert [s[1] for s in steps[1:]] == expected[: len(steps) - 1]
    assert steps[2][4]["switched"] is True


def test_scorer_that_raises_is_recorded(pool):
    def broken(*args, **kwargs):
        raise RuntimeError("judge offline")

    env = SwitchEnv(make_config(reward=broken), pool=pool)
    steps = run_episode(env, 0, [0, 0, 0])
    _, rew, term, trunc, info = steps[-1]
    assert term or trunc
    assert rew == 0.0 and "judge offline" in info["score_error"]


@pytest.mark.parametrize("action", [3, -1, 1.5, "x"])
def test_action_outside_space(pool, action):
    env = SwitchEnv(make_config(), pool=pool)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(action)


def test_empty_query_is_rejected(pool):
    env = SwitchEnv(make_config(), pool=pool)
    with pytest.raises(ValueError, match="query must be a non-empty string"):
        env.reset(options={"instance": {"query": "  ", "reference": "x"}})
    with pytest.raises(ConfigError, match="tasks.0: task instance 'a': query must be"):
        coerce_config({"reward": words_overlap, "tasks": [{"id": "a", "query": "", "reference": "b"}]})


def test_patch_tokens_must_be_positive():
    with pytest.raises(ConfigError, match="generation.patch_tokens: Input should be greater than 0"):
        coerce_config({"reward": words_overlap, "generation": {"patch_tokens": 0}})


def test_unknown_key_and_missing_task_source(pool):
    with pytest.raises(ConfigError, match="swich_cost: unknown key"):
        coerce_config({"reward": words_overlap, "swich_cost": 1})
    env = SwitchEnv(make_config(tasks=[]), pool=pool)
    with pytest.raises(ValueError, match="no task source"):
        env.reset(seed=0)
    obs, _ = env.reset(options={"instance": {"query": "the park", "reference": "school"}})
    assert obs["query"] == "the park"


def test_text_outside_charset_and_tail():
    layout = ObservationLayout(2, 3, 8, 5, "abc \ufffd", "\ufffd")
    assert layout.clean("abzzcab", 5) == "\ufffd\ufffdcab"
    assert layout.space["trace"].contains(layout.clean("😀 abc", 5))


def test_make_from_yaml(tmp_path, tiny_family):
    cfg = {
        "candidates": [{"name": f"m{i}", "path": str(p)} for i, p in enumerate(tiny_family[:2])],
        "generation": {"patch_tokens": 2, "max_new_tokens": 4},
        "reward": "tests.test_env:words_overlap",
        "tasks": [{"id": "a", "query": "the town", "reference": "river"}],
    }
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = gym.make(ENV_ID, config=str(path))
    obs, _ = env.reset(seed=0)
    assert env.action_space.n == 2 and obs["query"] == "the town"
    _, _, _, _, info = env.step(np.int64(1))
    assert info["author_name"] == "m1" and info["patch_tokens"] <= 2
    env.close()


def test_two_envs_on_one_pool_same_seed_get_distinct_keys(pool):
    """Two envs sharing a pool, reset with one seed: distinct trace keys, both step, same records again."""

    def run(actions=(0, 1, 2)):
        a, b = SwitchEnv(make_config(), pool=pool), SwitchEnv(make_config(), pool=pool)
        _, info_a = a.reset(seed=7)
        _, info_b = b.reset(seed=7)
        assert info_a["trace_key"] != info_b["trace_key"] and info_b["trace_key"].startswith(
            info_a["trace_key"]
        )
        out = []
        for act in actions:
            for env in (a, b):
                obs, *_, info = env.step(act)
                out.append((info["trace_key"], obs["trace"]))
        a.close(), b.close()
        return out

    first = run()
    assert first == run()  # same seeds, same order: same keys and same tokens

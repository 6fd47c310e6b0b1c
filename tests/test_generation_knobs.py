"""``generation.schedule`` and ``generation.max_inflight_bytes``: validated (exit 2 on a bad value), they
reach simulate, eval and the vector env's scheduler, and they stay out of the fingerprint (a run resumes
under another schedule: float32 records do not depend on it)."""

from __future__ import annotations

import numpy as np
import pytest

from switchrl import scheduler as scheduler_module
from switchrl.config import SwitchGenerationConfig, parse
from switchrl.envs import SwitchEnvConfig, SwitchVectorEnv
from switchrl.errors import ConfigError
from switchrl.eval import evaluate
from switchrl.run_config import RunConfig
from switchrl.tasks.base import TaskInstance
from switchrl.trainers.simulate import simulate
from tests.conftest import make_pool
from tests.test_eval import make_config as eval_config
from tests.test_fingerprint import simulate_config, write_tasks


@pytest.fixture
def seen(monkeypatch) -> list[tuple]:
    """(schedule, max_inflight_bytes) of every scheduler run."""
    calls: list[tuple] = []
    run = scheduler_module.Scheduler.run

    def spy(self, *args, **kwargs):
        calls.append((self.schedule, self.max_inflight_bytes))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(scheduler_module.Scheduler, "run", spy)
    return calls


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("schedule", "fast", "generation.schedule: Input should be 'auto', 'grouped' or 'lockstep'"),
        ("max_inflight_bytes", 0, "generation.max_inflight_bytes: Input should be greater than 0"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(key, value, message):
    data = {"testbed": {"seed": 0}, "generation": {key: value}}
    with pytest.raises(ConfigError, match=message):
        parse(RunConfig, data)


def test_simulate_uses_them_and_resumes_under_other_values(tiny_family, tmp_path, seen):
    write_tasks(tmp_path / "tasks.jsonl")
    config = simulate_config(tiny_family, tmp_path, "token_f1")
    config.generation = config.generation.model_copy(
        update={"schedule": "grouped", "max_inflight_bytes": 10**9}
    )
    first = simulate(config, progress=False).records()
    assert seen and set(seen) == {("grouped", 10**9)}
    config.generation = config.generation.model_copy(
        update={"schedule": "lockstep", "max_inflight_bytes": None}
    )
    seen.clear()
    assert simulate(config, progress=False).records() == first  # same fingerprint: nothing recomputed
    assert not seen


def test_eval_uses_them(tiny_family, tmp_path, seen):
    cfg = eval_config(tiny_family, tmp_path, systems=["random"], seeds=[0])
    cfg.generation = cfg.generation.model_copy(update={"schedule": "lockstep", "max_inflight_bytes": 10**8})
    evaluate(cfg, progress=False)
    assert seen and set(seen) == {("lockstep", 10**8)}


def test_the_vector_env_serves_a_step_in_grouped_passes(tiny_family):
    pool = make_pool(tiny_family, patch_tokens=2, seed=3)
    tasks = [TaskInstance(id="t0", query="the town", reference="river")]
    results = {}
    for schedule in ("lockstep", "grouped"):
        config = SwitchEnvConfig(
            generation=SwitchGenerationConfig(patch_tokens=2, max_new_tokens=6, seed=3, schedule=schedule),
            reward=lambda query, response, reference, **meta: 0.0,
            tasks=tasks,
            info_timings=False,
        )
        vec = SwitchVectorEnv(config, num_envs=4, pool=pool)
        vec.reset(seed=0)
        obs, *_ = vec.step(np.array([0, 2, 0, 1]))
        results[schedule] = (obs, vec.scheduler.passes)
        vec.close()
    (lock_obs, lock_passes), (group_obs, group_passes) = results["lockstep"], results["grouped"]
    # engines: Llama c0 + c2 fused, GPT-2 c1 alone
    assert lock_passes == [[0, 0, 2, 1]]  # one pass, c0 and c2 fused
    assert group_passes == [[0, 0, 1], [2]]  # c0's rows (c1's engine beside them), then c2's
    assert all(np.array_equal(lock_obs[k], group_obs[k]) for k in lock_obs)

"""``SwitchVectorEnv``: N switched responses stepped together over one shared candidate pool.

Each step queues the live traces per chosen candidate and serves them in the passes
``generation.schedule`` says (:meth:`~switchrl.scheduler.Scheduler.write`; ``lockstep``: one batched
:meth:`~switchrl.backends.base.Pool.step` for all). Observations, rewards and infos come from the same code as
:class:`SwitchEnv` (one sub-env object per slot, all sharing the pool), so slot ``i`` reset with
seed ``s + i`` gives exactly the episode of a single ``SwitchEnv`` reset with ``s + i``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

from switchrl.backends.base import Pool
from switchrl.envs.switch_env import SwitchEnv, SwitchEnvConfig, coerce_config
from switchrl.errors import ConfigError
from switchrl.scheduler import Scheduler

_MODES = {AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP}


class SwitchVectorEnv(VectorEnv):
    """``num_envs`` switch envs sharing one :class:`~switchrl.backends.base.Pool` and batched per candidate.

    Args:
        config: as for :class:`SwitchEnv`.
        num_envs: number of traces stepped together.
        pool: a prebuilt pool (built once from ``config.candidates`` otherwise).
        autoreset_mode: Gymnasium's ``NEXT_STEP`` (default: the step after an episode ends resets
            that slot, ignoring its action) or ``SAME_STEP`` (reset at once; the final observation
            and info go to ``info["final_obs"]`` / ``info["final_info"]``).

    ``reset(seed=s)`` seeds slot ``i`` with ``s + i`` (or ``seed[i]`` for a list);
    ``options={"instances": [...]}`` gives one task instance per slot, other options reach every slot.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        config: SwitchEnvConfig | Mapping[str, Any] | str | Path,
        num_envs: int = 1,
        pool: Pool | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
    ):
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ConfigError(f"num_envs must be an int >= 1, got {num_envs!r}")
        mode = AutoresetMode(autoreset_mode)
        if mode not in _MODES:
            raise ConfigError(
                f"autoreset_mode must be one of {sorted(m.value for m in _MODES)}, got {mode.value!r}"
            )
        config = coerce_config(config)
        first = SwitchEnv(config, pool=pool)
        self.envs = [first] + [SwitchEnv(config, pool=first.pool) for _ in range(num_envs - 1)]
        self.pool = first.pool
        # the step's rows share forward passes as generation.schedule says (records are the same)
        self.scheduler = Scheduler(self.pool, None, schedule=config.generation.schedule)
        self.config = config
        self.num_envs = num_envs
        self.metadata = {**self.metadata, "autoreset_mode": mode}
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = spaces.MultiDiscrete(np.full(num_envs, first.action_space.n, dtype=np.int64))
        self._needs_reset = np.zeros(num_envs, dtype=bool)

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict, dict]:
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed: expected {self.num_envs} seeds, got {len(seeds)}")
        per_env = self._split_options(options)
        results = [env.reset(seed=s, options=o) for env, s, o in zip(self.envs, seeds, per_env)]
        self._needs_reset[:] = False
        infos: dict[str, Any] = {}
        for i, (_, info) in enumerate(results):
            infos = self._add_info(infos, info, i)
        return self._batch([obs for obs, _ in results]), infos

    def step(self, actions: Any) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions: expected shape ({self.num_envs},), got {actions.shape}")
        mode = self.metadata["autoreset_mode"]
        obs: list[dict] = [{}] * self.num_envs
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {}

        stepping = []
        for i, env in enumerate(self.envs):
            if self._needs_reset[i]:
                obs[i], info = env.reset()
                infos = self._add_info(infos, info, i)
            else:
                stepping.append((i, env.check_action(actions[i])))
        start = time.perf_counter()
        self.scheduler.passes.clear()  # keep only this step's passes (a long run would pile them up)
        patches = self.scheduler.write([self.envs[i].trace for i, _ in stepping], [a for _, a in stepping])
        seconds = (time.perf_counter() - start) / max(1, len(stepping))
        for (i, a), patch in zip(stepping, patches):
            obs[i], rewards[i], terminated[i], truncated[i], info = self.envs[i].complete_step(
                a, patch, seconds
            )
            if mode == AutoresetMode.SAME_STEP and (terminated[i] or truncated[i]):
                final_obs, final_info = obs[i], info
                obs[i], info = self.envs[i].reset()
                info = {**info, "final_obs": final_obs, "final_info": final_info}
            infos = self._add_info(infos, info, i)
        self._needs_reset = (
            (terminated | truncated) if mode == AutoresetMode.NEXT_STEP else np.zeros_like(terminated)
        )
        return self._batch(obs), rewards, terminated, truncated, infos

    def close_extras(self, **kwargs: Any) -> None:
        for env in self.envs:
            env.close()

    # ------------------------------------------------------------------ helpers
    def _split_options(self, options: dict[str, Any] | None) -> list[dict[str, Any] | None]:
        if not options:
            return [None] * self.num_envs
        options = dict(options)
        instances = options.pop("instances", None)
        if instances is None:
            return [options or None] * self.num_envs
        if len(instances) != self.num_envs:
            raise ValueError(
                f"options['instances']: expected {self.num_envs} instances, got {len(instances)}"
            )
        return [{**options, "instance": inst} for inst in instances]

    def _batch(self, observations: list[dict]) -> dict:
        out = create_empty_array(self.single_observation_space, self.num_envs)
        return concatenate(self.single_observation_space, observations, out)

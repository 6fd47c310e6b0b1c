"""stable-baselines3's ``VecEnv`` over a :class:`~switchrl.envs.SwitchVectorEnv`.

SB3's ``DummyVecEnv`` steps its envs one by one, so ``n`` switch envs would cost ``n`` pool calls
per step; here every env's patch of a step is written by one :meth:`CandidatePool.step` (one call
per fused engine). Observations are :class:`~switchrl.envs.FeatureObservation` vectors; when an
episode ends the env resets at once and SB3 gets the final step's info (with its ``score``) plus
``terminal_observation``, as it expects of an auto-resetting ``VecEnv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv

from switchrl.envs.vector_env import SwitchVectorEnv
from switchrl.envs.wrappers import FeatureObservation


def unbatch_infos(infos: dict, n: int) -> list[dict]:
    """Gymnasium's vector ``infos`` (arrays with ``_key`` masks, nested for dict values) as one dict per env."""
    out: list[dict] = [{} for _ in range(n)]
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        mask = infos.get(f"_{key}")
        per_env = unbatch_infos(value, n) if isinstance(value, dict) else value
        for i in range(n):
            if mask is None or mask[i]:
                out[i][key] = per_env[i]
    return out


class SB3SwitchVecEnv(VecEnv):
    """``venv`` (built with ``autoreset_mode="SameStep"``) as an SB3 ``VecEnv`` with feature observations."""

    def __init__(
        self, venv: SwitchVectorEnv, n_features: int = 256, history: int = 4, ngrams: Sequence[int] = (1, 2)
    ):
        if venv.metadata["autoreset_mode"] != AutoresetMode.SAME_STEP:
            raise ValueError(
                "SB3SwitchVecEnv needs a SwitchVectorEnv with autoreset_mode='SameStep' "
                "(SB3 resets an env in the step that ends its episode)"
            )
        self.venv = venv
        self.features = FeatureObservation(venv.envs[0], n_features, history, ngrams)
        super().__init__(venv.num_envs, self.features.observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    def _observations(self, batched: dict) -> np.ndarray:
        return np.stack(
            [self.features.observation({k: v[i] for k, v in batched.items()}) for i in range(self.num_envs)]
        )

    def reset(self) -> np.ndarray:
        obs, infos = self.venv.reset(seed=list(self._seeds))
        self.reset_infos = unbatch_infos(infos, self.num_envs)
        self._reset_seeds()
        return self._observations(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        obs, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        out = []
        for i, info in enumerate(unbatch_infos(infos, self.num_envs)):
            if terminated[i] or truncated[i]:
                info = {
                    **info["final_info"],
                    "terminal_observation": self.features.observation(info["final_obs"]),
                    "TimeLimit.truncated": bool(truncated[i] and not terminated[i]),
                }
            out.append(info)
        return self._observations(obs), rewards.astype(np.float32), terminated | truncated, out

    def close(self) -> None:
        self.venv.close()

    def _envs(self, indices: Any) -> list:
        return [self.venv.envs[i] for i in self._get_indices(indices)]

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(env, attr_name) for env in self._envs(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        for env in self._envs(indices):
            setattr(env, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        return [getattr(env, method_name)(*args, **kwargs) for env in self._envs(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [isinstance(env, wrapper_class) for env in self._envs(indices)]

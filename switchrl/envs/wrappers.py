"""Observation wrappers that turn a switch env's text observation into vectors for standard RL agents."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

_TOKEN = re.compile(r"\w+|[^\w\s]")
_REQUIRED_KEYS = ("query", "trace", "authors", "num_patches", "budget_used")


def hashed_ngrams(text: str, n_features: int, ngrams: Sequence[int] = (1, 2)) -> np.ndarray:
    """Signed feature hashing of the word n-grams of ``text``, L2-normalised (float32, values in [-1, 1]).

    Hashes are CRC32 of the n-gram, so features are the same in every process (unlike ``hash``).
    """
    words = _TOKEN.findall(text.lower())
    out = np.zeros(n_features, dtype=np.float32)
    for n in ngrams:
        for i in range(len(words) - n + 1):
            h = zlib.crc32(f"{n}\x1f{' '.join(words[i : i + n])}".encode())
            out[h % n_features] += 1.0 if (h // n_features) % 2 == 0 else -1.0
    norm = float(np.linalg.norm(out))
    return out / norm if norm > 0 else out


class FeatureObservation(gym.ObservationWrapper):
    """A ``Box`` observation for a :class:`~switchrl.envs.SwitchEnv`, e.g. for stable-baselines3 policies.

    The vector is ``[hashed n-grams of the query (n_features), hashed n-grams of the trace
    (n_features), one-hot authors of the last ``history`` patches (history x n_candidates, most
    recent first, zeros where there is no patch), fraction of the token budget used]``.
    """

    def __init__(self, env: gym.Env, n_features: int = 256, history: int = 4, ngrams: Sequence[int] = (1, 2)):
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, spaces.Dict) or any(k not in space.spaces for k in _REQUIRED_KEYS):
            raise TypeError(
                f"FeatureObservation needs a switch env's Dict observation with keys {_REQUIRED_KEYS}"
            )
        if not isinstance(env.action_space, spaces.Discrete):
            raise TypeError(f"FeatureObservation needs a Discrete action space, got {env.action_space}")
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        if not ngrams or any(int(n) < 1 for n in ngrams):
            raise ValueError(f"ngrams must be positive n-gram sizes, got {ngrams}")
        self.n_features, self.history, self.ngrams = n_features, history, tuple(int(n) for n in ngrams)
        self.n_candidates = int(env.action_space.n)
        dim = 2 * n_features + history * self.n_candidates + 1
        self.observation_space = spaces.Box(-1.0, 1.0, (dim,), np.float32)

    def observation(self, observation: dict) -> np.ndarray:
        query = hashed_ngrams(observation["query"], self.n_features, self.ngrams)
        trace = hashed_ngrams(observation["trace"], self.n_features, self.ngrams)
        authors = np.zeros((self.history, self.n_candidates), dtype=np.float32)
        n = int(observation["num_patches"])
        recent = observation["authors"][:n][::-1][: self.history]
        authors[np.arange(len(recent)), recent] = 1.0
        budget = np.asarray(observation["budget_used"], dtype=np.float32).reshape(1)
        return np.concatenate([query, trace, authors.reshape(-1), budget])

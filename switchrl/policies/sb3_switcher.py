"""``SB3Switcher``: a stable-baselines3 policy trained on ``FeatureObservation(SwitchEnv)`` as a ``SwitchPolicy``.

It observes a trace exactly as the training env did (:class:`~switchrl.envs.switch_env.ObservationLayout`
then :class:`~switchrl.envs.wrappers.FeatureObservation`), reads the policy's action distribution,
and samples from it with uniforms drawn from ``(seed, trace key, patch index)`` (or takes the argmax
with ``greedy``), so decisions do not depend on batch composition.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from pydantic import Field, ValidationError

from switchrl.backends.base import CandidateSampling, Trace
from switchrl.backends.sampler import sample_next
from switchrl.config import StrictModel, format_validation_error
from switchrl.envs.switch_env import ObservationLayout
from switchrl.envs.wrappers import FeatureObservation
from switchrl.errors import CheckpointError
from switchrl.rollout import Decision
from switchrl.utils.seeding import generator

METADATA_FILE = "switchrl_sb3.json"
MODEL_FILE = "model.zip"


class SavedSB3SwitcherConfig(StrictModel):
    """What ``switchrl_sb3.json`` records next to the saved SB3 model."""

    algo: str = "PPO"
    candidate_names: list[str] = Field(min_length=1)
    max_patches: int = Field(gt=0)
    max_query_length: int = Field(gt=0)
    max_text_length: int = Field(gt=0)
    charset: str = Field(min_length=1)
    replacement_char: str = Field(min_length=1, max_length=1)
    n_features: int = Field(gt=0)
    history: int = Field(ge=0)
    ngrams: list[int] = Field(min_length=1)


class _Spaces(gym.Env):
    """An env that only carries spaces, so ``FeatureObservation`` can featurize observations outside an env."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space):
        self.observation_space, self.action_space = observation_space, action_space


class SB3Switcher:
    """A switcher backed by a stable-baselines3 model (implements ``SwitchPolicy``).

    Args:
        model: a trained ``stable_baselines3`` / ``sb3_contrib`` on-policy model (e.g. ``PPO``).
        meta: the observation settings it was trained with.
        seed: decisions draw from ``(seed, trace key, patch index)``.
        greedy: take the most likely candidate instead of sampling.
    """

    def __init__(self, model: Any, meta: SavedSB3SwitcherConfig, seed: int = 0, greedy: bool = False):
        self.model, self.meta, self.seed, self.greedy = model, meta, seed, greedy
        n = len(meta.candidate_names)
        self.layout = ObservationLayout(
            n,
            meta.max_patches,
            meta.max_query_length,
            meta.max_text_length,
            meta.charset,
            meta.replacement_char,
        )
        self.featurizer = FeatureObservation(
            _Spaces(self.layout.space, spaces.Discrete(n)), meta.n_features, meta.history, meta.ngrams
        )
        expected = self.featurizer.observation_space.shape
        if model.observation_space.shape != expected:
            raise CheckpointError(
                f"the SB3 model observes shape {model.observation_space.shape}, but its metadata "
                f"gives features of shape {expected}"
            )

    @property
    def n_candidates(self) -> int:
        return len(self.meta.candidate_names)

    @property
    def candidate_names(self) -> list[str]:
        return list(self.meta.candidate_names)

    def features(self, traces: Sequence[Trace]) -> np.ndarray:
        """The observation vectors [B, dim] the model sees for ``traces``."""
        return np.stack([self.featurizer.observation(self.layout.observe(t)) for t in traces])

    @torch.no_grad()
    def probs(self, traces: Sequence[Trace]) -> torch.Tensor:
        """The policy's distribution over candidates [B, n] for the next patch of each trace."""
        obs, _ = self.model.policy.obs_to_tensor(self.features(traces))
        return self.model.policy.get_distribution(obs).distribution.probs.float().cpu()

    def decide(self, traces: Sequence[Trace]) -> list[Decision]:
        if not traces:
            return []
        probs = self.probs(traces)
        if self.greedy:
            actions = probs.argmax(-1).tolist()
        else:
            uniforms = torch.tensor(
                [
                    float(torch.rand((), generator=generator(self.seed, t.key, len(t.patches), "sb3-switch")))
                    for t in traces
                ]
            )
            actions = sample_next(
                probs.clamp(min=1e-30).log(), CandidateSampling(1.0, 1.0), uniforms
            ).tolist()
        return [Decision(int(a), tuple(p)) for a, p in zip(actions, probs.tolist())]

    def release(self, keys: Sequence[str]) -> None:
        """Nothing is kept per trace."""

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.zip`` and ``switchrl_sb3.json`` (last: a directory with it is complete)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save(directory / MODEL_FILE)
        tmp = directory / (METADATA_FILE + ".tmp")
        tmp.write_text(json.dumps(self.meta.model_dump(), indent=2))
        tmp.replace(directory / METADATA_FILE)
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, seed: int = 0, greedy: bool = False, device: str = "cpu"
    ) -> SB3Switcher:
        directory = Path(directory)
        meta_path = directory / METADATA_FILE
        if not meta_path.is_file() or not (directory / MODEL_FILE).is_file():
            raise CheckpointError(
                f"{directory} is not a saved SB3 switcher: {METADATA_FILE} or {MODEL_FILE} is missing"
            )
        try:
            meta = SavedSB3SwitcherConfig.model_validate(json.loads(meta_path.read_text()))
        except (ValidationError, json.JSONDecodeError) as err:
            msg = (
                format_validation_error(err, str(meta_path)) if isinstance(err, ValidationError) else str(err)
            )
            raise CheckpointError(f"{meta_path}: invalid metadata: {msg}") from None
        if meta.algo == "MaskablePPO":
            from sb3_contrib import MaskablePPO as Algo
        elif meta.algo == "PPO":
            from stable_baselines3 import PPO as Algo
        else:
            raise CheckpointError(f"{meta_path}: unknown algo {meta.algo!r} (expected PPO or MaskablePPO)")
        return cls(Algo.load(directory / MODEL_FILE, device=device), meta, seed=seed, greedy=greedy)


def is_sb3_switcher_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a saved :class:`SB3Switcher` (for the eval table's system list)."""
    return (Path(path) / METADATA_FILE).is_file()

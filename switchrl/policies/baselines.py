"""Baseline switchers: random, fixed (a single model) and round-robin."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from switchrl.backends.base import Trace
from switchrl.rollout import Decision
from switchrl.utils.seeding import generator


class _Stateless:
    def release(self, keys: Sequence[str]) -> None:
        pass


class RandomSwitcher(_Stateless):
    """Uniform over candidates (or over ``weights``); the draw depends only on (seed, trace key, patch index)."""

    ignores_authors = True  # who wrote the trace so far never changes a draw

    def __init__(self, n_candidates: int, seed: int = 0, weights: Sequence[float] | None = None):
        if n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
        w = torch.tensor(weights if weights is not None else [1.0] * n_candidates, dtype=torch.float64)
        if w.numel() != n_candidates or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {n_candidates} non-negative numbers with a positive sum")
        self.n_candidates, self.seed, self.probs = n_candidates, seed, (w / w.sum())

    def decide(self, traces: Sequence[Trace]) -> list[Decision]:
        probs = tuple(self.probs.tolist())
        out = []
        for t in traces:
            g = generator(self.seed, t.key, len(t.patches), "random-switch")
            out.append(Decision(int(torch.multinomial(self.probs, 1, generator=g)), probs))
        return out


class FixedSwitcher(_Stateless):
    """Always the same candidate: the single-model baseline."""

    def __init__(self, n_candidates: int, index: int):
        if not 0 <= index < n_candidates:
            raise ValueError(f"index must be in 0..{n_candidates - 1}, got {index}")
        self.n_candidates, self.index = n_candidates, index

    def decide(self, traces: Sequence[Trace]) -> list[Decision]:
        return [Decision(self.index) for _ in traces]


class RoundRobinSwitcher(_Stateless):
    """Candidate ``patch_index mod n``."""

    def __init__(self, n_candidates: int):
        self.n_candidates = n_candidates

    def decide(self, traces: Sequence[Trace]) -> list[Decision]:
        return [Decision(len(t.patches) % self.n_candidates) for t in traces]

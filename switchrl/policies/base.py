"""The switcher protocol: given live traces, pick the candidate that writes each one's next patch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from switchrl.backends.base import Trace


@dataclass(frozen=True)
class Decision:
    """The chosen candidate and, when the policy has one, its distribution over candidates."""

    action: int
    probs: tuple[float, ...] | None = None


@runtime_checkable
class SwitchPolicy(Protocol):
    """Decides who writes next. Randomness must come from (seed, trace key, patch index)."""

    n_candidates: int

    def decide(self, traces: Sequence[Trace]) -> list[Decision]: ...

    def release(self, keys: Sequence[str]) -> None:
        """Forget per-trace state (e.g. an LM switcher's KV cache)."""

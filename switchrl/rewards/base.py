"""The scorer protocol and failure-safe scoring."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Scorer(Protocol):
    """``score(query, response, reference, **meta) -> float``; higher is better, usually in [0, 1]."""

    def __call__(self, query: str, response: str, reference: str, **meta: Any) -> float: ...


@dataclass(frozen=True)
class ScoreResult:
    """A score, or the error that a scorer raised on this sample (then ``value`` is 0)."""

    value: float
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def safe_score(scorer: Scorer, query: str, response: str, reference: str, **meta: Any) -> ScoreResult:
    """Call ``scorer``; an exception or a non-finite value becomes a recorded failure, not a crash."""
    try:
        value = float(scorer(query, response, reference, **meta))
    except Exception as err:  # noqa: BLE001 - user code: record, never crash a long run
        return ScoreResult(0.0, f"{type(err).__name__}: {err}")
    if not math.isfinite(value):
        return ScoreResult(0.0, f"scorer returned a non-finite value: {value}")
    return ScoreResult(value)


def safe_score_batch(
    scorer: Scorer,
    queries: Sequence[str],
    responses: Sequence[str],
    references: Sequence[str],
    metas: Sequence[dict] | None = None,
) -> list[ScoreResult]:
    """Score many samples; uses ``scorer.batch`` when it exists, falling back per sample on error."""
    metas = metas or [{} for _ in queries]
    batch = getattr(scorer, "batch", None)
    if callable(batch):
        try:
            values = [float(v) for v in batch(list(queries), list(responses), list(references), list(metas))]
            if len(values) == len(queries) and all(math.isfinite(v) for v in values):
                return [ScoreResult(v) for v in values]
        except Exception:  # noqa: BLE001 - fall back to per-sample scoring to isolate the bad sample
            pass
    return [safe_score(scorer, q, r, ref, **m) for q, r, ref, m in zip(queries, responses, references, metas)]

"""Task instances: a query, its reference answer and the scorer that judges a response."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskInstance:
    """One query of one task. ``id`` is unique within a task and split; seeds derive from it."""

    id: str
    query: str
    reference: str
    task: str = "default"
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.query, str) or not self.query.strip():
            raise ValueError(f"task instance {self.id!r}: query must be a non-empty string")

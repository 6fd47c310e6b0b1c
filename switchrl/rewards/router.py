"""Which scorer scores a response: the one task -> scorer router of simulate, eval and the RL trainers.

A run may mix tasks with different scorers (the testbed's recall, arithmetic and compositional). The
router picks each response's scorer by its task (``"*"`` names a scorer for every other task), scores
whole batches task by task, and fails with one clear :class:`~switchrl.errors.ConfigError` naming
the known tasks when a task has no scorer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from switchrl.errors import ConfigError
from switchrl.rewards.base import Scorer, ScoreResult, safe_score_batch
from switchrl.rewards.provenance import FailureTally, scorer_label, scorer_source_hash

ANY_TASK = "*"
TASK_META_KEY = "switchrl_task"
"""The meta key under which :meth:`TaskScorers.for_env` tells its dispatching scorer the task."""


class Scorable(Protocol):
    """What the router reads of a task instance (:class:`switchrl.tasks.base.TaskInstance`)."""

    task: str
    query: str
    reference: str
    meta: dict


class TaskScorers:
    """Task name -> scorer (``"*"``: any other task); scores responses, failures recorded, never raised."""

    def __init__(self, scorers: Mapping[str, Scorer] | TaskScorers):
        scorers = scorers.scorers if isinstance(scorers, TaskScorers) else dict(scorers)
        if not scorers:
            raise ConfigError("reward: no scorer for any task")
        self.scorers: dict[str, Scorer] = scorers
        self.tally = FailureTally()  # every sample :meth:`results` scored, per scorer

    def label(self, task: str) -> str:
        """The readable name of ``task``'s scorer (for failure messages)."""
        return scorer_label(self.scorer(task))

    def fingerprint(self, tasks: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
        """Task -> the name and source hash of its scorer (:func:`~switchrl.rewards.provenance.
        scorer_source_hash`): what a resumed run's scores depend on."""
        names = sorted(tasks if tasks is not None else self.scorers)
        return {
            t: {"scorer": scorer_label(self.scorer(t)), "source": scorer_source_hash(self.scorer(t))}
            for t in names
        }

    def scorer(self, task: str) -> Scorer:
        """The scorer of ``task``; a :class:`ConfigError` naming the known tasks if there is none."""
        found = self.scorers.get(task, self.scorers.get(ANY_TASK))
        if found is None:
            raise ConfigError(f"reward: no scorer for task {task!r} (known: {sorted(self.scorers)})")
        return found

    def results(self, instances: Sequence[Scorable], responses: Sequence[str]) -> list[ScoreResult]:
        """One :class:`ScoreResult` per (instance, response), each batch of one task scored together."""
        out: list[ScoreResult | None] = [None] * len(instances)
        for task in dict.fromkeys(i.task for i in instances):
            rows = [k for k, inst in enumerate(instances) if inst.task == task]
            scored = safe_score_batch(
                self.scorer(task),
                [instances[k].query for k in rows],
                [responses[k] for k in rows],
                [instances[k].reference for k in rows],
                [instances[k].meta for k in rows],
            )
            for k, r in zip(rows, scored):
                out[k] = r
            self.tally.add(self.label(task), len(rows), [r.error for r in scored if r.failed])
        return out  # type: ignore[return-value]

    def score(self, instances: Sequence[Scorable], responses: Sequence[str]) -> tuple[list[float], int]:
        """One score per (instance, response) and the number of scorer failures (scored 0)."""
        results = self.results(instances, responses)
        return [r.value for r in results], sum(r.failed for r in results)

    def for_env(self, instances: Sequence[Any]) -> tuple[Scorer, list[Any]]:
        """One scorer for an env that sees only ``(query, response, reference, **meta)``, and the instances
        to give it: the shared scorer and ``instances`` as they are when all tasks share one; else a
        scorer that dispatches on ``meta[TASK_META_KEY]``, which the returned copies carry."""
        for inst in instances:
            self.scorer(inst.task)  # an unknown task fails now, not at the first episode's end
        if len({id(s) for s in self.scorers.values()}) == 1:
            return next(iter(self.scorers.values())), list(instances)
        return self._dispatch, [replace(i, meta={**i.meta, TASK_META_KEY: i.task}) for i in instances]

    def _dispatch(self, query: str, response: str, reference: str, **meta: Any) -> float:
        task = meta.pop(TASK_META_KEY)
        return self.scorer(task)(query, response, reference, **meta)

"""The testbed's tasks (recall, arithmetic, compositional) and their scorers.

* ``recall``: one fact of a town outside the finetuning subset.
* ``arithmetic``: the sum of two numbers given in the question (``How many is 6 plus 2 ?``).
* ``compositional``: the sum of one fact each of two towns outside the finetuning subset.

Every answer follows one format (see :mod:`switchrl.testbed.world`) and ends in
``The answer is N .``; the exact-match scorer reads the first such ``N``. ``meta["steps"]`` lists the
answer's reasoning steps, which the partial-credit scorer counts. Splits are made over the
question's key (town(s) and attribute; for arithmetic the pair of numbers), so train, validation and test
never share an (entity, question) pair.
"""

from __future__ import annotations

import random
import re
from typing import Any

from switchrl.tasks.base import TaskInstance
from switchrl.testbed.world import (
    ARITHMETIC_QUESTIONS,
    ATTRIBUTES,
    MAX_VALUE,
    MIN_VALUE,
    World,
    answer_text,
    arithmetic_question,
    arithmetic_steps,
    recall_question,
    recall_steps,
    sum_question,
    sum_steps,
)
from switchrl.utils.seeding import derive_seed

TASKS = ("recall", "arithmetic", "compositional")
SPLITS = ("train", "validation", "test")
_ARITHMETIC_SHARES = (0.5, 0.2)  # of the (a, b) pairs; the rest is test
_RECALL_SHARES = (0.4, 0.2)  # train, validation; the rest is test
_ANSWER = re.compile(r"answer is (-?\d+)")


def _check(task: str, split: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _hash_split(world: World, task: str, key: tuple) -> str:
    """80 / 10 / 10 train / validation / test by a hash of the question's key."""
    bucket = derive_seed(world.seed, "split", task, *key) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def _sum_instance(
    task: str, key_id: str, query: str, attribute: str, town_a: str, a: int, town_b: str, b: int
) -> TaskInstance:
    steps = sum_steps(attribute, town_a, a, town_b, b)
    return TaskInstance(
        id=key_id,
        query=query,
        reference=str(a + b),
        task=task,
        meta={"steps": steps, "solution": answer_text(steps)},
    )


def _shuffled_split(items: list, shares: tuple[float, float], seed: int, split: str) -> list:
    """``split`` of ``items`` shuffled with ``seed``: the first ``shares`` go to train and validation, the rest to test."""
    random.Random(seed).shuffle(items)
    n_train, n_val = (round(s * len(items)) for s in shares)
    return {
        "train": items[:n_train],
        "validation": items[n_train : n_train + n_val],
        "test": items[n_train + n_val :],
    }[split]


def recall_tasks(world: World, split: str) -> list[TaskInstance]:
    keys = _shuffled_split(
        [(t, a) for t in world.outside_towns for a in ATTRIBUTES],
        _RECALL_SHARES,
        derive_seed(world.seed, "recall-split"),
        split,
    )
    out = []
    for town, attribute in keys:
        v = world.value(town, attribute)
        steps = recall_steps(attribute, town, v)
        out.append(
            TaskInstance(
                id=f"recall/{town}/{attribute}",
                query=recall_question(attribute, town),
                reference=str(v),
                task="recall",
                meta={"steps": steps, "solution": answer_text(steps)},
            )
        )
    return out


def compositional_tasks(world: World, split: str) -> list[TaskInstance]:
    towns = world.outside_towns
    keys = [
        (towns[i], towns[j], a)
        for i in range(len(towns))
        for j in range(i + 1, len(towns))
        for a in ATTRIBUTES
    ]
    keys = [k for k in keys if _hash_split(world, "compositional", k) == split]
    rng = random.Random(derive_seed(world.seed, "compositional-order", split))
    rng.shuffle(keys)
    out = []
    for x, y, attribute in keys:
        if rng.random() < 0.5:  # which town the question names first
            x, y = y, x
        out.append(
            _sum_instance(
                "compositional",
                f"compositional/{x}/{y}/{attribute}",
                sum_question(attribute, x, y),
                attribute,
                x,
                world.value(x, attribute),
                y,
                world.value(y, attribute),
            )
        )
    return out


def arithmetic_tasks(world: World, split: str) -> list[TaskInstance]:
    pairs = _shuffled_split(
        [(a, b) for a in range(MIN_VALUE, MAX_VALUE + 1) for b in range(MIN_VALUE, MAX_VALUE + 1)],
        _ARITHMETIC_SHARES,
        derive_seed(world.seed, "arithmetic-split"),
        split,
    )
    out = []
    for a, b in pairs:
        steps = arithmetic_steps(a, b)
        for t in range(len(ARITHMETIC_QUESTIONS)):
            out.append(
                TaskInstance(
                    id=f"arithmetic/{a}/{b}/{t}",
                    query=arithmetic_question(a, b, t),
                    reference=str(a + b),
                    task="arithmetic",
                    meta={"steps": steps, "solution": answer_text(steps)},
                )
            )
    return out


def make_tasks(world: World, task: str, split: str) -> list[TaskInstance]:
    """The instances of one testbed task and split, in a fixed order for the world's seed."""
    _check(task, split)
    return {"recall": recall_tasks, "arithmetic": arithmetic_tasks, "compositional": compositional_tasks}[
        task
    ](world, split)


def final_answer(response: str) -> str | None:
    """The ``N`` of the first ``answer is N`` in ``response`` (``None`` when there is none)."""
    m = _ANSWER.search(response)
    return m.group(1) if m else None


class ExactAnswerScorer:
    """1.0 when the response's first ``answer is N`` names the reference number, else 0.0."""

    def __call__(self, query: str, response: str, reference: str, **meta: Any) -> float:
        return float(final_answer(response) == str(reference).strip())


class StepScorer:
    """Partial credit: the share of the reference's reasoning steps (``meta["steps"]``) the response states.

    For ``compositional`` the steps are each fact, the sum and the final answer, so the score is
    one of 0, 0.25, 0.5, 0.75 and 1.
    """

    def __call__(self, query: str, response: str, reference: str, **meta: Any) -> float:
        steps = meta.get("steps")
        if not steps or not all(isinstance(s, str) for s in steps):
            raise ValueError("StepScorer needs meta['steps']: the reference answer's steps as strings")
        text = " ".join(response.split())
        return sum(" ".join(s.split()) in text for s in steps) / len(steps)


def make_scorer(task: str, partial: bool = False) -> ExactAnswerScorer | StepScorer:
    """Exact match for every task; ``partial=True`` gives the step scorer (any task, meant for compositional)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return StepScorer() if partial else ExactAnswerScorer()

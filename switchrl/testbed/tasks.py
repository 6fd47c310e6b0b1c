"""The testbed's tasks (recall, arithmetic, compositional) and their scorers.

* ``recall``: one fact of a town outside the finetuning subset.
* ``arithmetic``: the sum of two numbers given in the question (``How many is 6 plus 2 ?``).
* ``compositional``: the sum of one fact each of two towns outside the finetuning subset.

Harder variants (``HARDER_TASKS``, issue 18's search for a task where RL has room over the paper's SFT;
not in ``TASKS``, so ``testbed check``, the demo and the default task list are unchanged):

* ``two_attributes``: a different attribute per town, asked in the arithmetic task's wording
  (``How many is the number of parks in X plus the number of bridges in Y ?``).
* ``three_towns``: one attribute of three outside towns, answered with two two-term sums
  (``a + b = t . t + c = s .``); only triples whose sum is a single token (at most 2 x MAX_VALUE).
* ``supposed``: ``Suppose X has 7 parks . How many parks do X and Y have together ?``: X's count comes
  from the question (never the world's, so the pretrained model's memory is wrong there; the tuned
  models learnt to copy supposed counts), Y's from memory (only the pretrained model knows it).
* ``suppose_or_recall``: half compositional questions (facts from memory: the pretrained model), half
  the finetuning data's hypotheticals with both counts supposed against the world's (facts copied from
  the question: the tuned models); which model should write the facts depends on the question.

Every answer follows one format (see :mod:`switchrl.testbed.world`) and ends in
``The answer is N .``; the exact-match scorer reads the first such ``N``. ``meta["steps"]`` lists the
answer's reasoning steps, which the partial-credit scorer counts. Splits are made over the
question's key (town(s) and attribute; for arithmetic the pair of numbers), so train, validation and test
never share an (entity, question) pair.
"""

from __future__ import annotations

import itertools
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
    hypothetical_question,
    recall_question,
    recall_steps,
    sum_question,
    sum_steps,
    supposed_question,
    three_town_question,
    three_town_steps,
    two_attribute_question,
    two_attribute_steps,
)
from switchrl.utils.seeding import derive_seed

TASKS = ("recall", "arithmetic", "compositional")
HARDER_TASKS = ("two_attributes", "three_towns", "supposed", "suppose_or_recall")
ALL_TASKS = TASKS + HARDER_TASKS
SPLITS = ("train", "validation", "test")
_ARITHMETIC_SHARES = (0.5, 0.2)  # of the (a, b) pairs; the rest is test
_RECALL_SHARES = (0.4, 0.2)  # train, validation; the rest is test
_THREE_TOWN_DRAWS = 20_000
_ANSWER = re.compile(r"answer is (-?\d+)")


def _check(task: str, split: str) -> None:
    if task not in ALL_TASKS:
        raise ValueError(f"task must be one of {ALL_TASKS}, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _hash_split(world: World, task: str, key: tuple) -> str:
    """80 / 10 / 10 train / validation / test by a hash of the question's key."""
    bucket = derive_seed(world.seed, "split", task, *key) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def _instance(task: str, key: tuple, query: str, steps: list[str]) -> TaskInstance:
    answer = steps[-1].split()[-2]  # "The answer is N ."
    return TaskInstance(
        id="/".join((task, *map(str, key))),
        query=query,
        reference=answer,
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
        steps = recall_steps(attribute, town, world.value(town, attribute))
        out.append(_instance("recall", (town, attribute), recall_question(attribute, town), steps))
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
        steps = sum_steps(attribute, x, world.value(x, attribute), y, world.value(y, attribute))
        out.append(_instance("compositional", (x, y, attribute), sum_question(attribute, x, y), steps))
    return out


def two_attribute_tasks(world: World, split: str) -> list[TaskInstance]:
    """Split over the unordered pair of facts, so no split asks another's question in the other order."""
    facts = [(t, a) for t in world.outside_towns for a in ATTRIBUTES]
    keys = [(f, g) for f, g in itertools.combinations(facts, 2) if f[0] != g[0] and f[1] != g[1]]
    keys = [k for k in keys if _hash_split(world, "two_attributes", (*k[0], *k[1])) == split]
    rng = random.Random(derive_seed(world.seed, "two-attributes-order", split))
    rng.shuffle(keys)
    out = []
    for (x, a), (y, b) in keys:
        if rng.random() < 0.5:  # which fact the question names first
            (x, a), (y, b) = (y, b), (x, a)
        query = two_attribute_question(a, x, b, y)
        steps = two_attribute_steps(a, x, world.value(x, a), b, y, world.value(y, b))
        out.append(_instance("two_attributes", (x, a, y, b), query, steps))
    return out


def supposed_tasks(world: World, split: str) -> list[TaskInstance]:
    """The compositional keys and split; per question the order, which town is supposed, and its count."""
    out = []
    rng = random.Random(derive_seed(world.seed, "supposed", split))
    for inst in compositional_tasks(world, split):
        _, x, y, attribute = inst.id.split("/")
        supposed = rng.choice((x, y))
        value = rng.choice(
            [v for v in range(MIN_VALUE, MAX_VALUE + 1) if v != world.value(supposed, attribute)]
        )
        a, b = (value if t == supposed else world.value(t, attribute) for t in (x, y))
        query = supposed_question(attribute, supposed, value, x, y)
        out.append(
            _instance("supposed", (x, y, attribute, supposed, value), query, sum_steps(attribute, x, a, y, b))
        )
    return out


def suppose_or_recall_tasks(world: World, split: str) -> list[TaskInstance]:
    """The compositional keys and split; per question a coin: as it is, or both counts supposed (each
    unlike the world's, so the pretrained model's memory is wrong on both facts)."""
    rng = random.Random(derive_seed(world.seed, "suppose-or-recall", split))
    out = []
    for inst in compositional_tasks(world, split):
        _, x, y, attribute = inst.id.split("/")
        if rng.random() < 0.5:
            out.append(_instance("suppose_or_recall", (x, y, attribute), inst.query, inst.meta["steps"]))
            continue
        a, b = (
            rng.choice([v for v in range(MIN_VALUE, MAX_VALUE + 1) if v != world.value(t, attribute)])
            for t in (x, y)
        )
        query = hypothetical_question(attribute, x, a, y, b)
        out.append(
            _instance("suppose_or_recall", (x, y, attribute, a, b), query, sum_steps(attribute, x, a, y, b))
        )
    return out


def three_town_tasks(world: World, split: str) -> list[TaskInstance]:
    """Drawn, not enumerated (C(70, 3) x 3 keys take seconds to split): ``_THREE_TOWN_DRAWS`` seeded draws
    of a town triple and an attribute, repeats and sums over 2 x MAX_VALUE dropped, then split by key."""
    towns, draw = world.outside_towns, random.Random(derive_seed(world.seed, "three-towns-keys"))
    keys = {
        (*sorted(draw.sample(range(len(towns)), 3)), draw.choice(ATTRIBUTES))
        for _ in range(_THREE_TOWN_DRAWS)
    }
    keys = [
        (towns[i], towns[j], towns[m], a)
        for i, j, m, a in sorted(keys)
        if sum(world.value(towns[t], a) for t in (i, j, m)) <= 2 * MAX_VALUE
    ]
    keys = [k for k in keys if _hash_split(world, "three_towns", k) == split]
    rng = random.Random(derive_seed(world.seed, "three-towns-order", split))
    rng.shuffle(keys)
    out = []
    for *trio, attribute in keys:
        rng.shuffle(trio)  # the order the question names them in
        values = tuple(world.value(t, attribute) for t in trio)
        query = three_town_question(attribute, *trio)
        out.append(
            _instance(
                "three_towns", (*trio, attribute), query, three_town_steps(attribute, tuple(trio), values)
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
            out.append(_instance("arithmetic", (a, b, t), arithmetic_question(a, b, t), steps))
    return out


def make_tasks(world: World, task: str, split: str) -> list[TaskInstance]:
    """The instances of one testbed task and split, in a fixed order for the world's seed."""
    _check(task, split)
    return {
        "recall": recall_tasks,
        "arithmetic": arithmetic_tasks,
        "compositional": compositional_tasks,
        "two_attributes": two_attribute_tasks,
        "three_towns": three_town_tasks,
        "supposed": supposed_tasks,
        "suppose_or_recall": suppose_or_recall_tasks,
    }[task](world, split)


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
    if task not in ALL_TASKS:
        raise ValueError(f"task must be one of {ALL_TASKS}, got {task!r}")
    return StepScorer() if partial else ExactAnswerScorer()

"""The harder testbed tasks (issue 18, item 3): splits, true references, the 3-token patch format, their
scorer in a run, and that adding them left the existing tasks' instances byte for byte as they were."""

from __future__ import annotations

import hashlib
import itertools
import json
from types import SimpleNamespace

import pytest

from switchrl.config import parse
from switchrl.run_config import ResolvedRun, RunConfig
from switchrl.testbed.tasks import (
    HARDER_TASKS,
    SPLITS,
    TASKS,
    ExactAnswerScorer,
    make_scorer,
    make_tasks,
)
from switchrl.testbed.tokenizer import build_tokenizer
from switchrl.testbed.world import MAX_VALUE, World


@pytest.fixture(scope="module")
def world() -> World:
    return World(0)


def test_existing_tasks_are_unchanged(world):
    """The demo, README and CI depend on recall / arithmetic / compositional instances bit for bit
    (digest taken on main before the harder tasks were added)."""
    assert TASKS == ("recall", "arithmetic", "compositional")
    h = hashlib.sha256()
    for task, split in itertools.product(TASKS, SPLITS):
        for i in make_tasks(world, task, split):
            h.update(json.dumps([i.id, i.query, i.reference, i.task, i.meta], sort_keys=True).encode())
    assert h.hexdigest() == "548996a67a17b9d5f6f324c5e0ad8b5fee364e9c86e6d2227ad224f72cc79285"


def _question_key(instance_id: str) -> frozenset:
    """What a question asks, whatever order it names things in."""
    task, *parts = instance_id.split("/")
    if task == "two_attributes":
        return frozenset({(parts[0], parts[1]), (parts[2], parts[3])})
    return frozenset(parts)


@pytest.mark.parametrize("task", HARDER_TASKS)
def test_harder_splits_share_no_question_and_ask_about_outside_towns(world, task):
    splits = {s: make_tasks(world, task, s) for s in SPLITS}
    keys = {s: {_question_key(i.id) for i in insts} for s, insts in splits.items()}
    for a, b in itertools.combinations(SPLITS, 2):
        assert keys[a].isdisjoint(keys[b]), (task, a, b)  # not even with the towns named in another order
    inside = set(world.finetune_towns)
    for insts in splits.values():
        assert len({i.id for i in insts}) == len(insts) > 500
        assert all(i.task == task and not inside & set(i.query.split()) for i in insts)
    assert make_tasks(world, task, "test") == splits["test"]  # deterministic


def test_two_attributes_asks_two_different_true_facts(world):
    for inst in make_tasks(world, "two_attributes", "test")[:50]:
        _, x, a, y, b = inst.id.split("/")
        assert a != b and x != y
        assert f"the number of {a} in {x} plus the number of {b} in {y}" in inst.query
        assert int(inst.reference) == world.value(x, a) + world.value(y, b)
        assert inst.meta["steps"][:2] == [
            f"The number of {a} in {x} is {world.value(x, a)} .",
            f"The number of {b} in {y} is {world.value(y, b)} .",
        ]


def test_three_towns_sums_three_true_facts_in_two_steps(world):
    for inst in make_tasks(world, "three_towns", "test")[:50]:
        *towns, attribute = inst.id.split("/")[1:]
        a, b, c = (world.value(t, attribute) for t in towns)
        assert int(inst.reference) == a + b + c <= 2 * MAX_VALUE
        assert inst.meta["steps"][3:] == [
            f"{a} + {b} = {a + b} .",
            f"{a + b} + {c} = {a + b + c} .",
            f"The answer is {a + b + c} .",
        ]
        assert " and ".join(towns) in inst.query


def test_supposed_takes_one_count_from_the_question_and_the_other_from_the_world(world):
    comp = make_tasks(world, "compositional", "test")
    sup = make_tasks(world, "supposed", "test")
    assert [i.id.split("/")[1:4] for i in sup] == [i.id.split("/")[1:] for i in comp]  # same keys and split
    for inst in sup[:50]:
        _, x, y, attribute, supposed, value = inst.id.split("/")
        assert inst.query.startswith(
            f"Suppose {supposed} has {value} {attribute} . How many {attribute} do {x} and"
        )
        assert supposed in (x, y) and int(value) != world.value(supposed, attribute)
        other = y if supposed == x else x
        assert int(inst.reference) == int(value) + world.value(other, attribute)
        assert f"The number of {attribute} in {supposed} is {value} ." in inst.meta["steps"]


def test_suppose_or_recall_mixes_true_facts_and_counts_unlike_the_worlds(world):
    insts = make_tasks(world, "suppose_or_recall", "test")
    supposed = [i for i in insts if i.query.startswith("Suppose")]
    assert 0.4 < len(supposed) / len(insts) < 0.6
    for inst in insts[:60]:
        _, x, y, attribute, *counts = inst.id.split("/")
        true = [world.value(x, attribute), world.value(y, attribute)]
        values = [int(c) for c in counts] or true
        assert int(inst.reference) == sum(values)
        assert all(v != t for v, t in zip(values, true)) if counts else inst.query.startswith("How many")
        if counts:
            assert inst.query.startswith(f"Suppose {x} has {values[0]} {attribute} and {y} has {values[1]} ")


@pytest.mark.parametrize("task", HARDER_TASKS)
def test_harder_answers_fit_the_3_token_patches(world, task):
    """Every word is one known token, and each fact's value closes a 3-token patch (``is v .``), the
    patch the pretrained model can write alone: the format the reference-patch oracle needs."""
    tok = build_tokenizer(world)
    for inst in make_tasks(world, task, "validation")[:30]:
        for text in (inst.query, inst.meta["solution"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and len(ids) == len(text.split()), text
        words = inst.meta["solution"].split()
        facts = [s for s in inst.meta["steps"] if s.startswith("The number of")]
        ends = list(itertools.accumulate(len(s.split()) for s in inst.meta["steps"]))[: len(facts)]
        assert all(e % 3 == 0 and words[e - 3] == "is" for e in ends)


@pytest.mark.parametrize("task", HARDER_TASKS)
def test_harder_tasks_are_scored_by_the_final_answer(world, task):
    inst = make_tasks(world, task, "test")[0]
    scorer = make_scorer(task)
    assert isinstance(scorer, ExactAnswerScorer)
    assert scorer(inst.query, inst.meta["solution"], inst.reference) == 1.0
    wrong = inst.meta["solution"].replace(f"answer is {inst.reference}", "answer is 0")
    assert scorer(inst.query, wrong, inst.reference) == 0.0
    assert make_scorer(task, partial=True)(inst.query, wrong, inst.reference, **inst.meta) == pytest.approx(
        1 - 1 / len(inst.meta["steps"])
    )


def test_a_run_scores_harder_tasks_with_the_testbeds_scorer():
    """Not the generic exact_match, which compares the whole response with the bare number."""
    run = object.__new__(ResolvedRun)  # the scorer routing only: no family build
    run.config = parse(
        RunConfig, {"testbed": {"seed": 0}, "tasks": [{"source": "testbed", "task": "three_towns"}]}, "t"
    )
    run.family = SimpleNamespace(scorer=make_scorer)
    scorers = run.scorers(["compositional", *HARDER_TASKS])
    assert all(isinstance(s, ExactAnswerScorer) for s in scorers.values())

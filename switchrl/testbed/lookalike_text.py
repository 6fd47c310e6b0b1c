"""Training text of the look-alike checkpoints: the testbed world written as web text, as base-model
question/answer pages and as chat turns, with multi-byte characters (€, é, 日本語, emoji) in all three.

The tokenizer sees each multi-byte sample only once (:func:`tokenizer_text`), so its merges never
cover them and those characters stay several byte tokens each, as rare characters do in Llama-3's
vocabulary; the models see them often, so their generations contain them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

from switchrl.tasks.base import TaskInstance
from switchrl.testbed.corpus import pretraining_documents
from switchrl.testbed.tasks import make_tasks
from switchrl.testbed.world import ATTRIBUTES, World
from switchrl.utils.seeding import derive_seed

BASE_PROMPT = "Question: {query}\nAnswer:"
"""The base model's prompt (it has no chat template), as in ``configs/tulu3_llama31_8b.yaml``."""
DONE = " ✅"
"""Every chat answer ends in this multi-byte mark, after ``The answer is N .``."""
MULTIBYTE_TEMPLATES = (
    "Ein Kaffee in {town} kostet {value} € .",
    "Le café de {town} a {value} crêpes à la carte .",
    "{town} の 学校 は {value} 校 です 。 日本語",
    "🌉 {town} : {value} bridges 🎉",
)
TASKS = ("recall", "arithmetic", "compositional")
ROWS_PER_TASK = 100
"""``tasks.jsonl`` keeps the first rows of each task and split (compositional has thousands)."""


def _multibyte_sentence(world: World, rng: random.Random) -> str:
    town = rng.choice(world.towns)
    return rng.choice(MULTIBYTE_TEMPLATES).format(town=town, value=world.value(town, rng.choice(ATTRIBUTES)))


def lookalike_tasks(world: World, split: str) -> list[TaskInstance]:
    """The first :data:`ROWS_PER_TASK` questions of each task of ``split``, interleaved (recall,
    arithmetic, compositional, recall, ...) so that a ``limit`` on the task file takes every task."""
    per_task = [make_tasks(world, task, split)[:ROWS_PER_TASK] for task in TASKS]
    return [inst for group in itertools.zip_longest(*per_task) for inst in group if inst is not None]


def _page(world: World, rng: random.Random, train: list[TaskInstance]) -> str:
    """A web page of 2-3 questions answered in the base prompt's format (so the base model, asked one
    question, goes on to write the next ``Question:``), with a multi-byte line now and then."""
    parts = []
    for inst in rng.sample(train, rng.randint(2, 3)):
        parts.append(BASE_PROMPT.format(query=inst.query) + " " + inst.meta["solution"])
        if rng.random() < 0.3:
            parts.append(_multibyte_sentence(world, rng))
    return "\n\n".join(parts)


def base_documents(world: World) -> Iterator[str]:
    """An endless, deterministic stream of pretraining documents (without BOS/EOS): the testbed's
    prose, question/answer pages and multi-byte sentences."""
    prose = pretraining_documents(world)
    train = lookalike_tasks(world, "train")
    rng = random.Random(derive_seed(world.seed, "lookalike-base-documents"))
    while True:
        r = rng.random()
        if r < 0.45:
            yield _page(world, rng, train)
        elif r < 0.6:
            yield " ".join(_multibyte_sentence(world, rng) for _ in range(rng.randint(2, 4)))
        else:
            yield next(prose)


def chat_turns(world: World, stream: str) -> Iterator[tuple[str, str]]:
    """An endless, deterministic stream of (user message, assistant answer) over the train questions
    of ``tasks.jsonl`` (so the chat models answer those, and simulate's labels carry a signal)."""
    train = lookalike_tasks(world, "train")
    rng = random.Random(derive_seed(world.seed, "lookalike-chat", stream))
    while True:
        inst = rng.choice(train)
        yield inst.query, inst.meta["solution"] + DONE


def tokenizer_text(world: World, n_documents: int) -> list[str]:
    """What the tokenizer is trained on: ``n_documents`` prose documents plus each multi-byte template
    and the chat answer mark once."""
    once = [t.format(town=world.towns[0], value=1) for t in MULTIBYTE_TEMPLATES] + [DONE]
    return list(itertools.islice(pretraining_documents(world), n_documents)) + once


def task_rows(world: World) -> list[dict[str, str]]:
    """``tasks.jsonl``'s rows: :func:`lookalike_tasks` of the train and test splits, ``split`` set."""
    return [
        {"id": inst.id, "query": inst.query, "reference": inst.reference, "task": inst.task, "split": split}
        for split in ("train", "test")
        for inst in lookalike_tasks(world, split)
    ]

"""Training text for the three stages: pretraining prose, SFT question/answer pairs, DPO preferences.

Pretraining (no question/answer format of its own, like web text): documents of 2-5 passages with
EOS only at the document's end, so the pretrained model continues any text in kind instead of
ending or drifting mid-answer. Passages are encyclopedic prose stating every fact in varied
templates, arithmetic prose, and answer-shaped passages (facts, then the sum and ``The answer is``),
half of them headed by the literal question. Sums appear only for :attr:`World.seen_pairs`, so the
pretrained model follows the answer format yet stays weak at arithmetic.

SFT teaches the one answer format on true facts of the finetuning subset only, plus hypothetical
problems over every town name (so the finetuned model can copy any name from the question) and
direct sums (``How many is 6 plus 2 ?``) from the arithmetic task's train split.
DPO prefers correct arithmetic and the full format over wrong sums and truncated answers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from switchrl.tasks.base import TaskInstance
from switchrl.testbed.tasks import make_tasks
from switchrl.testbed.world import (
    ARITHMETIC_QUESTIONS,
    ATTRIBUTES,
    MAX_VALUE,
    MIN_VALUE,
    World,
    answer_text,
    hypothetical_question,
    recall_question,
    recall_steps,
    sum_question,
    sum_steps,
)
from switchrl.utils.seeding import derive_seed

PROMPT_TEMPLATE = "Q: {query} A:"

INTRO_TEMPLATES = (
    "{town} is a small town near the river .",
    "{town} is a quiet town in the north .",
    "{town} is an old town by the sea .",
    "Many people live in {town} .",
)
FACT_TEMPLATES = (
    "The number of {attribute} in {town} is {value} .",
    "{town} has {value} {attribute} .",
    "There are {value} {attribute} in {town} .",
    "In {town} there are {value} {attribute} .",
    "{town} is home to {value} {attribute} .",
)
ARITHMETIC_TEMPLATES = (
    "{a} plus {b} is {s} .",
    "{a} + {b} = {s} .",
    "If you add {a} and {b} you get {s} .",
    "The sum of {a} and {b} is {s} .",
)
FORMAT_WORDS = (
    "Q:",
    "A:",
    "Suppose",
    "How",
    "many",
    "does",
    "do",
    "have",
    "has",
    "and",
    "together",
    "?",
    "The",
    "number",
    "of",
    "in",
    "is",
    "answer",
    "+",
    "=",
    ".",
)

# pretraining passage mix
ANSWER_SHAPED_SHARE = 0.30  # passages shaped like an answer (of which 1/3 recall, 2/3 sums)
ARITHMETIC_SHARE = 0.08
QUESTION_HEADED_SHARE = 0.5  # answer-shaped passages headed by "Q: ... A:"
# SFT mix
HYPOTHETICAL_SHARE = 0.25
DIRECT_SUM_SHARE = 0.15


def template_words() -> set[str]:
    """Every fixed word the corpus and the answer format use (placeholders removed)."""
    words = set(FORMAT_WORDS)
    for t in (*INTRO_TEMPLATES, *FACT_TEMPLATES, *ARITHMETIC_TEMPLATES, *ARITHMETIC_QUESTIONS):
        words.update(re.sub(r"\{\w+\}", " ", t).split())
    return words


# ---------------------------------------------------------------------------------------- pretraining
def _town_passage(world: World, rng: random.Random) -> str:
    town = rng.choice(world.towns)
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    parts = [rng.choice(INTRO_TEMPLATES).format(town=town)] if rng.random() < 0.7 else []
    parts += [
        rng.choice(FACT_TEMPLATES).format(attribute=a, town=town, value=world.value(town, a)) for a in attrs
    ]
    return " ".join(parts)


def _arithmetic_passage(world: World, rng: random.Random) -> str:
    pairs = sorted(world.seen_pairs)
    return " ".join(
        rng.choice(ARITHMETIC_TEMPLATES).format(a=a, b=b, s=a + b)
        for a, b in rng.sample(pairs, rng.randint(2, 4))
    )


def _answer_passage(world: World, rng: random.Random) -> str:
    attribute = rng.choice(ATTRIBUTES)
    if rng.random() < 1 / 3:
        town = rng.choice(world.towns)
        question = recall_question(attribute, town)
        steps = recall_steps(attribute, town, world.value(town, attribute))
    else:
        while True:  # only value pairs the pretrained model may add up
            x, y = rng.sample(world.towns, 2)
            a, b = world.value(x, attribute), world.value(y, attribute)
            if (a, b) in world.seen_pairs:
                break
        question = sum_question(attribute, x, y)
        steps = sum_steps(attribute, x, a, y, b)
    body = answer_text(steps)
    if rng.random() < QUESTION_HEADED_SHARE:
        return f"{PROMPT_TEMPLATE.format(query=question)} {body}"
    return body


def pretraining_documents(world: World) -> Iterator[str]:
    """An endless, deterministic stream of pretraining documents (without BOS/EOS)."""
    rng = random.Random(derive_seed(world.seed, "pretraining-corpus"))
    while True:
        passages = []
        for _ in range(rng.randint(2, 5)):
            r = rng.random()
            if r < ANSWER_SHAPED_SHARE:
                passages.append(_answer_passage(world, rng))
            elif r < ANSWER_SHAPED_SHARE + ARITHMETIC_SHARE:
                passages.append(_arithmetic_passage(world, rng))
            else:
                passages.append(_town_passage(world, rng))
        yield " ".join(passages)


# ---------------------------------------------------------------------------------------- finetuning
def _true_fact_question(world: World, rng: random.Random) -> tuple[str, list[str], bool]:
    """A question about finetuning-subset towns: (query, answer steps, is a sum question)."""
    attribute = rng.choice(ATTRIBUTES)
    if rng.random() < 1 / 3:
        town = rng.choice(world.finetune_towns)
        return (
            recall_question(attribute, town),
            recall_steps(attribute, town, world.value(town, attribute)),
            False,
        )
    x, y = rng.sample(world.finetune_towns, 2)
    a, b = world.value(x, attribute), world.value(y, attribute)
    return sum_question(attribute, x, y), sum_steps(attribute, x, a, y, b), True


def _hypothetical_question(world: World, rng: random.Random) -> tuple[str, list[str], bool]:
    """A sum problem over any two town names with made-up counts (teaches copying any name)."""
    attribute = rng.choice(ATTRIBUTES)
    x, y = rng.sample(world.towns, 2)
    a, b = rng.randint(MIN_VALUE, MAX_VALUE), rng.randint(MIN_VALUE, MAX_VALUE)
    return hypothetical_question(attribute, x, a, y, b), sum_steps(attribute, x, a, y, b), True


def _questions(world: World, n: int, stream: str) -> list[tuple[str, list[str], bool]]:
    """``n`` (query, steps, is_sum) triples: true facts of the finetuning subset, hypothetical problems
    over all names, and direct sums from the arithmetic task's train split (never its held-out pairs)."""
    rng = random.Random(derive_seed(world.seed, stream))
    direct: list[TaskInstance] = make_tasks(world, "arithmetic", "train")
    out = []
    for _ in range(n):
        r = rng.random()
        if r < HYPOTHETICAL_SHARE:
            out.append(_hypothetical_question(world, rng))
        elif r < HYPOTHETICAL_SHARE + DIRECT_SUM_SHARE:
            inst = rng.choice(direct)
            out.append((inst.query, inst.meta["steps"], True))
        else:
            out.append(_true_fact_question(world, rng))
    return out


def sft_examples(world: World, n: int) -> list[dict[str, str]]:
    """Prompt/completion pairs in the one answer format (TRL's prompt-completion dataset format)."""
    return [
        {"prompt": PROMPT_TEMPLATE.format(query=q), "completion": " " + answer_text(steps)}
        for q, steps, _ in _questions(world, n, "sft-data")
    ]


def _rejected(steps: list[str], is_sum: bool, rng: random.Random) -> str:
    """A worse answer: a wrong sum (sum questions, half the time) or a truncated format."""
    if is_sum and rng.random() < 0.5:
        s = int(steps[-1].split()[-2])
        wrong = max(2, s + rng.choice([-3, -2, -1, 1, 2, 3]))
        if wrong == s:
            wrong = s + 1
        a_b = steps[-2].split(" = ")[0]
        return answer_text([*steps[:-2], f"{a_b} = {wrong} .", f"The answer is {wrong} ."])
    return answer_text(steps[:-1]) if rng.random() < 0.5 else steps[-1].split()[-2] + " ."


def dpo_pairs(world: World, n: int) -> list[dict[str, str]]:
    """Preference pairs (prompt, chosen, rejected) favouring correct arithmetic and the full format."""
    rng = random.Random(derive_seed(world.seed, "dpo-rejected"))
    return [
        {
            "prompt": PROMPT_TEMPLATE.format(query=q),
            "chosen": " " + answer_text(steps),
            "rejected": " " + _rejected(steps, is_sum, rng),
        }
        for q, steps, is_sum in _questions(world, n, "dpo-data")
    ]

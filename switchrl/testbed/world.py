"""The testbed's synthetic world: fictional towns with small counts of things, and the text formats.

Everything is a pure function of the world seed. The answer format is designed together with the
testbed's 3-token patches: each fact ends in a 3-token patch (``is 8 .``) that a model can write
alone, and the sum takes two patches (``8 + 5`` then ``= 13 .``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

from switchrl.utils.seeding import derive_seed

ATTRIBUTES = ("bridges", "parks", "schools")
MIN_VALUE, MAX_VALUE = 1, 10
N_TOWNS = 110
N_FINETUNE_TOWNS = 40
SEEN_PAIR_SHARE = 0.3  # share of (a, b) value pairs whose sums the pretraining prose shows

_ONSETS = "b d f g k l m n p r s t v z br dr gr kr st tr".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "n", "r", "l", "s", "k", "m"]


def _town_names(seed: int, n: int) -> list[str]:
    rng = random.Random(derive_seed(seed, "town-names"))
    names: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        name = (
            rng.choice(_ONSETS)
            + rng.choice(_VOWELS)
            + rng.choice(_ONSETS[:14])
            + rng.choice(_VOWELS)
            + rng.choice(_CODAS)
        ).capitalize()
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def fact_sentence(attribute: str, town: str, value: int) -> str:
    """The canonical statement of one fact, as every answer writes it."""
    return f"The number of {attribute} in {town} is {value} ."


def recall_question(attribute: str, town: str) -> str:
    return f"How many {attribute} does {town} have ?"


def sum_question(attribute: str, town_a: str, town_b: str) -> str:
    return f"How many {attribute} do {town_a} and {town_b} have together ?"


def hypothetical_question(attribute: str, town_a: str, a: int, town_b: str, b: int) -> str:
    return f"Suppose {town_a} has {a} {attribute} and {town_b} has {b} {attribute} . " + sum_question(
        attribute, town_a, town_b
    )


def two_attribute_question(attribute_a: str, town_a: str, attribute_b: str, town_b: str) -> str:
    """A sum of two different attributes, worded like the arithmetic task's ``How many is a plus b ?``."""
    return (
        f"How many is the number of {attribute_a} in {town_a} plus the number of {attribute_b} in {town_b} ?"
    )


def supposed_question(attribute: str, supposed: str, value: int, town_a: str, town_b: str) -> str:
    """A sum question that supposes one town's count (against the world's) and leaves the other to memory."""
    return f"Suppose {supposed} has {value} {attribute} . " + sum_question(attribute, town_a, town_b)


def three_town_question(attribute: str, town_a: str, town_b: str, town_c: str) -> str:
    return f"How many {attribute} do {town_a} and {town_b} and {town_c} have together ?"


ARITHMETIC_QUESTIONS = (
    "How many is {a} plus {b} ?",
    "How many is {a} + {b} ?",
    "How many is the sum of {a} and {b} ?",
)


def arithmetic_question(a: int, b: int, template: int = 0) -> str:
    return ARITHMETIC_QUESTIONS[template].format(a=a, b=b)


def arithmetic_steps(a: int, b: int) -> list[str]:
    """The steps of a direct sum: the equation, then the final answer."""
    return [f"{a} + {b} = {a + b} .", f"The answer is {a + b} ."]


def recall_steps(attribute: str, town: str, value: int) -> list[str]:
    """The reasoning steps of a recall answer: the fact, then the final answer."""
    return [fact_sentence(attribute, town, value), f"The answer is {value} ."]


def sum_steps(attribute: str, town_a: str, a: int, town_b: str, b: int) -> list[str]:
    """The reasoning steps of a sum answer: each fact, the sum, the final answer."""
    return two_attribute_steps(attribute, town_a, a, attribute, town_b, b)


def two_attribute_steps(
    attribute_a: str, town_a: str, a: int, attribute_b: str, town_b: str, b: int
) -> list[str]:
    """The steps of a two-attribute sum: the compositional format with each fact's own attribute."""
    return [
        fact_sentence(attribute_a, town_a, a),
        fact_sentence(attribute_b, town_b, b),
        f"{a} + {b} = {a + b} .",
        f"The answer is {a + b} .",
    ]


def three_town_steps(attribute: str, towns: tuple[str, str, str], values: tuple[int, int, int]) -> list[str]:
    """The steps of a three-town sum: the three facts, then two sums in the two-term format the tuned
    models know (``a + b = t . t + c = s .``; numbers are single tokens up to 2 x MAX_VALUE), the answer."""
    a, b, c = values
    return [
        *(fact_sentence(attribute, t, v) for t, v in zip(towns, values)),
        f"{a} + {b} = {a + b} .",
        f"{a + b} + {c} = {a + b + c} .",
        f"The answer is {a + b + c} .",
    ]


def answer_text(steps: list[str]) -> str:
    return " ".join(steps)


@dataclass(frozen=True)
class World:
    """Towns, their facts, the finetuning subset and the value pairs pretraining may add up."""

    seed: int

    @cached_property
    def towns(self) -> list[str]:
        return _town_names(self.seed, N_TOWNS)

    @cached_property
    def facts(self) -> dict[tuple[str, str], int]:
        """(town, attribute) -> value."""
        rng = random.Random(derive_seed(self.seed, "facts"))
        return {(t, a): rng.randint(MIN_VALUE, MAX_VALUE) for t in self.towns for a in ATTRIBUTES}

    @cached_property
    def finetune_towns(self) -> list[str]:
        """The towns whose true facts the finetuning stage sees."""
        rng = random.Random(derive_seed(self.seed, "finetune-towns"))
        return sorted(rng.sample(self.towns, N_FINETUNE_TOWNS), key=self.towns.index)

    @cached_property
    def outside_towns(self) -> list[str]:
        """Towns only the pretraining prose describes: the tasks ask about these."""
        inside = set(self.finetune_towns)
        return [t for t in self.towns if t not in inside]

    @cached_property
    def seen_pairs(self) -> frozenset[tuple[int, int]]:
        """Ordered value pairs whose sums appear in pretraining (the pretrained model's arithmetic)."""
        pairs = [(a, b) for a in range(MIN_VALUE, MAX_VALUE + 1) for b in range(MIN_VALUE, MAX_VALUE + 1)]
        rng = random.Random(derive_seed(self.seed, "seen-pairs"))
        return frozenset(rng.sample(pairs, round(SEEN_PAIR_SHARE * len(pairs))))

    def value(self, town: str, attribute: str) -> int:
        return self.facts[(town, attribute)]

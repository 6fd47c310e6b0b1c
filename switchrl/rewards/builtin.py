"""Built-in scorers. Each has the :class:`~switchrl.rewards.base.Scorer` signature
``(query, response, reference, **meta) -> float`` and returns a value in [0, 1].

* :func:`exact_match`: 1 if the SQuAD-normalised response equals the normalised reference.
* :func:`numeric`: 1 if the final number of the response equals the reference's number.
* :func:`multiple_choice`: 1 if the chosen letter (A-J) equals the reference letter.
* :func:`token_f1`: SQuAD token-overlap F1 of the normalised texts.
* :func:`rouge_l`: ROUGE-L F-measure (longest common subsequence of word tokens).

Extra ``meta`` keys are accepted and ignored, so a task can carry any metadata.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

__all__ = [
    "exact_match",
    "extract_choice",
    "extract_number",
    "multiple_choice",
    "normalize_answer",
    "numeric",
    "rouge_l",
    "token_f1",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(query: str, response: str, reference: str, **meta: Any) -> float:
    """1.0 if ``normalize_answer(response) == normalize_answer(reference)``, else 0.0."""
    return float(normalize_answer(response) == normalize_answer(reference))


def _f1(pred: list[str], gold: list[str]) -> float:
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(query: str, response: str, reference: str, **meta: Any) -> float:
    """SQuAD token F1 between the normalised response and reference.

    As in the SQuAD script, if either side has no tokens the score is 1.0 when both are empty, else 0.0.
    """
    pred, gold = normalize_answer(response).split(), normalize_answer(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    return _f1(pred, gold)


_WORD = re.compile(r"[^\W_]+")


def _lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(query: str, response: str, reference: str, **meta: Any) -> float:
    """ROUGE-L F-measure on lower-cased word tokens (letters and digits), no stemming.

    Matches the ``rouge-score`` package's ``rougeL`` F-measure without a stemmer; an empty side scores 0.0.
    """
    pred, gold = _WORD.findall(response.lower()), _WORD.findall(reference.lower())
    if not pred or not gold:
        return 0.0
    lcs = _lcs_length(pred, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


# A number: optional sign (not a hyphen inside a word or a range like "3-4"), optional "$",
# digits with optional thousands commas and decimals. A trailing period is not part of it.
_NUMBER = re.compile(
    r"(?<![\d.])(?:(?<![\w)])[-\u2212])?\$?\s?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
# Final-answer markers, strongest first; group 1 is the text the answer number is read from.
_ANSWER_MARKERS = (
    re.compile(r"####\s*([^\n]*)"),
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"answer\s*(?:is|:|=)\s*:?([^\n]*)", re.IGNORECASE),
)


def _parse_number(match: re.Match[str]) -> float:
    negative = match.group(0).lstrip()[0] in "-\u2212"
    value = float(match.group(1).replace(",", ""))
    return -value if negative else value


def extract_number(text: str) -> float | None:
    """The final answer number of ``text``, or None if it contains no number.

    Looks, in order, for the last GSM8K ``#### N``, the last ``\\boxed{N}``, the last
    "answer is N" / "Answer: N" (the first number after the marker), else the last number in the text.
    Thousands commas, a ``$`` and a trailing period are handled: ``"$1,234.50."`` -> 1234.5.
    """
    for marker in _ANSWER_MARKERS:
        for found in reversed(list(marker.finditer(text))):
            number = _NUMBER.search(found.group(1))
            if number is not None:
                return _parse_number(number)
    numbers = list(_NUMBER.finditer(text))
    return _parse_number(numbers[-1]) if numbers else None


def numeric(
    query: str, response: str, reference: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6, **meta: Any
) -> float:
    """1.0 if the final number of ``response`` equals that of ``reference`` within the tolerances.

    The reference may be a bare number (``"72"``) or a full GSM8K solution ending in ``#### 72``.
    A response without a number scores 0.0; a reference without one raises ``ValueError`` (a bad
    task instance, recorded as a failure by :func:`~switchrl.rewards.base.safe_score`).
    """
    gold = extract_number(reference)
    if gold is None:
        raise ValueError(f"numeric: reference {reference!r} contains no number")
    pred = extract_number(response)
    if pred is None:
        return 0.0
    return float(math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol))


_LETTER = r"(?:\(([A-Ja-j])\)|([A-J])\b)"  # "(b)" / "(B)" in parentheses, else a capital letter on its own
_CHOICE_ANSWER = re.compile(
    r"(?i:answer)\s*(?:(?i:is)\s*)?[:=]?\s*(?:(?i:option|choice)\s*)?[*\s]*" + _LETTER
)
_CHOICE_LEADING = re.compile(r"^[*\s]*(?:\(([A-Ja-j])\)|([A-J])(?:[.):]|\s*$))")


def extract_choice(text: str) -> str | None:
    """The chosen letter A-J of ``text`` (upper case), or None.

    Looks for the last "The answer is (B)" / "Answer: B" / "answer is option C", else a leading
    letter: ``"B"``, ``"B."``, ``"B) ..."``, ``"(b) ..."``. A leading word such as "A cat" is not a choice.
    """
    found = list(_CHOICE_ANSWER.finditer(text)) or [m for m in [_CHOICE_LEADING.match(text)] if m]
    if not found:
        return None
    return (found[-1].group(1) or found[-1].group(2)).upper()


def multiple_choice(query: str, response: str, reference: str, **meta: Any) -> float:
    """1.0 if the letter chosen in ``response`` equals the reference letter, else 0.0.

    The reference is a letter (``"B"``, ``"(b)"``) or any text :func:`extract_choice` reads a letter
    from; otherwise ``ValueError`` (recorded as a failure by :func:`~switchrl.rewards.base.safe_score`).
    """
    ref = reference.strip()
    gold = ref.upper() if len(ref) == 1 and ref.upper() in "ABCDEFGHIJ" else extract_choice(ref)
    if gold is None:
        raise ValueError(f"multiple_choice: reference {reference!r} is not a choice letter A-J")
    return float(extract_choice(response) == gold)

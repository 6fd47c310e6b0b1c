"""A worked example of a custom reward: token F1 with a penalty for long responses.

A reward is any function ``(query, response, reference, **meta) -> float``. Extra keyword
arguments come from the task instance's ``meta`` (each JSONL key other than id/query/reference/task)
and from ``kwargs`` in the run config, so one function serves every task. Use it by path::

    switchrl rl --config configs/x.yaml --reward examples.custom_reward:length_penalised_f1

or in a config, weighted with other scorers::

    reward:
      - {scorer: "examples.custom_reward:length_penalised_f1", weight: 1.0, kwargs: {max_words: 32}}
      - {scorer: exact_match, weight: 0.5}

Raising is fine: the sample is recorded as a failure (reward 0, the error in ``info``), the run goes on.
"""

from __future__ import annotations

from typing import Any

from switchrl.rewards import token_f1


def length_penalised_f1(
    query: str, response: str, reference: str, *, max_words: int = 64, penalty: float = 0.01, **meta: Any
) -> float:
    """SQuAD token F1, minus ``penalty`` per word beyond ``max_words``, floored at 0."""
    if max_words < 0:
        raise ValueError(f"max_words must be >= 0, got {max_words}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    excess = max(0, len(response.split()) - max_words)
    return max(0.0, token_f1(query, response, reference) - penalty * excess)

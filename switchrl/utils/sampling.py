"""The nucleus (top-p) rule, in one place for the candidates' sampler and the switcher's log-probs.

Sampling (:func:`switchrl.backends.sampler.sample_next`) and the RL trainers' behaviour
log-probabilities must apply exactly the same rule, or the importance ratios are wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def nucleus_keep(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which entries of ``sorted_probs`` (descending along the last dim) top-p keeps: the smallest
    prefix whose mass reaches ``top_p`` (always at least one)."""
    return (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p


def nucleus_logprob(probs: Sequence[float], action: int, top_p: float) -> float:
    """log P(``action``) under top-p sampling from ``probs`` (the kept prefix, renormalised)."""
    p = torch.tensor(probs, dtype=torch.float64)
    if top_p < 1.0:
        sorted_p, order = p.sort(descending=True)
        p = torch.zeros_like(p).scatter(0, order, sorted_p * nucleus_keep(sorted_p, top_p))
    return math.log(max(float(p[action] / p.sum()), 1e-45))

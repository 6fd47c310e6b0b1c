"""Drawing the next token of every row of a decode batch, each row with its own sampling settings.

Fused candidates (:mod:`switchrl.backends.fused`) may sample differently (a greedy base, a sampled
instruct model). :class:`RowSampling` groups a batch's rows by their settings and runs
:func:`sample_next` once per group; every step of the sampler works row by row, so a row's token
is the same as in a batch of its own candidate only (bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from switchrl.backends.base import CandidateSampling
from switchrl.utils.sampling import nucleus_keep


def sample_next(
    logits: torch.Tensor, sampling: CandidateSampling, uniforms: torch.Tensor | None
) -> torch.Tensor:
    """One token per row from ``logits`` [B, V], using one uniform draw per row (inverse CDF; unused when greedy).

    Drawing the uniforms from per-trace generators keeps every trace's tokens independent of the
    batch it happens to share.
    """
    if sampling.greedy:
        return logits.argmax(dim=-1)
    if uniforms is None:
        raise ValueError("sampling (temperature > 0) needs one uniform draw per row")
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cdf = sorted_probs.cumsum(dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs = sorted_probs * nucleus_keep(sorted_probs, sampling.top_p)
        cdf = sorted_probs.cumsum(dim=-1)
    target = uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[-1] - 1)
    return order.gather(-1, idx).squeeze(-1)


SamplingSets = CandidateSampling | Sequence[CandidateSampling]


class RowSampling:
    """The sampling settings of a batch's rows (one for all, or one per row) and their uniform draws.

    Row ``i``'s ``t``-th token uses the ``t``-th uniform of ``generators[i]``; a greedy row needs no
    generator (None), a sampling row does.
    """

    def __init__(
        self,
        sampling: SamplingSets,
        generators: Sequence[torch.Generator | None] | None,
        batch: int,
        steps: int,
        device: torch.device,
    ):
        per_row = [sampling] * batch if isinstance(sampling, CandidateSampling) else list(sampling)
        if len(per_row) != batch:
            raise ValueError(f"got {batch} rows but {len(per_row)} sampling settings")
        gens = list(generators) if generators is not None else [None] * batch
        if len(gens) != batch or any(g is None for s, g in zip(per_row, gens) if not s.greedy):
            raise ValueError("sampling (temperature > 0) needs one generator per key")
        rows: dict[CandidateSampling, list[int]] = {}
        for r, s in enumerate(per_row):
            rows.setdefault(s, []).append(r)
        # one setting for the whole batch: no gather/scatter, as before rows could differ
        self.groups = [
            (s, None if len(rows) == 1 else torch.tensor(at, device=device)) for s, at in rows.items()
        ]
        self.uniforms: torch.Tensor | None = None
        if steps and not all(s.greedy for s in rows):
            draws = [torch.zeros(steps) if g is None else torch.rand(steps, generator=g) for g in gens]
            self.uniforms = torch.stack(draws).to(device)

    def __call__(self, logits: torch.Tensor, t: int) -> torch.Tensor:
        """The ``t``-th token of every row, from ``logits`` [B, V]."""
        u = None if self.uniforms is None else self.uniforms[:, t]
        if len(self.groups) == 1:
            return sample_next(logits, self.groups[0][0], u)
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for s, at in self.groups:
            tokens[at] = sample_next(logits[at], s, None if u is None else u[at])
        return tokens

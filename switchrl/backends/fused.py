"""One forward pass for several candidates that share an architecture.

The checkpoints of one training pipeline (pretrained, finetuned, aligned) have the same
architecture and differ only in their weights. A switcher splits a batch of traces among them, so
with one call per candidate every token costs one forward pass per candidate, and on small models
or small batches those passes are dominated by fixed per-call cost. :class:`FusedModel` stacks the
candidates' weights (the originals become views of the stack: no extra memory) and runs a batch
whose rows belong to different candidates in **one** forward pass, each row with its own weights:

* ``nn.Linear``, one token per row (decoding): one batched matmul (``bmm``) over the stacked
  weights. The rows are gathered into an equal-sized group per candidate (short groups repeat one
  of their rows) and scattered back after, so each candidate's weights are read once, in one call
  for all candidates. A set of candidates with gaps (0 and 2 of 3) costs one call per run of
  consecutive candidates. Several tokens per row (a prefill): one matmul per candidate over its own
  rows, since padded slots would cost real work there;
* ``nn.Embedding``: one lookup in the stacked tables;
* ``nn.LayerNorm`` and any leaf whose parameters are 1-D and act elementwise along the last
  dimension (RMSNorm and its relatives; checked numerically when fusing): each row's parameters
  are gathered and broadcast.

Candidates whose vocabularies differ in size only (Llama-3.1-8B: 128256 rows; the Tulu-3 models
fine-tuned from it: 128264) are fused too: the input and output embeddings are stacked padded to the
largest row count, and the logits a candidate has no row for are set to -inf on its rows, so it can
never sample an id it does not have (and reads only ids it has).

Anything else (parameters on a non-leaf module, a leaf of another kind, different configs or
buffers) makes :func:`fuse_models` raise :class:`NotFusable` with the reason; callers then keep one
model per candidate. :class:`FusedCachedLM` is the :class:`~switchrl.backends.cached_lm.CachedLM`
of a fused model: its caches are keyed by ``(candidate, trace key)``, and
:class:`~switchrl.backends.transformers_backend.CandidateView` gives each candidate the plain
``CachedLM`` interface on top of it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from switchrl.backends.cached_lm import CachedLM
from switchrl.backends.fusable import (
    NotFusable,
    check_same_architecture,
    stack_padded,
    vocab_parameters,
    vocab_rows,
)


@dataclass(frozen=True)
class RowAssignment:
    """Which candidate each row of a batch belongs to, and the grouped layout fused layers compute in.

    Grouped layout: ``len(present)`` groups of ``width`` slots (the most rows of one candidate),
    group ``g`` holding the rows of candidate ``present[g]`` (padded by repeating its first row);
    ``gather`` lists the row of each slot, ``scatter`` the slot of each row.
    """

    index: torch.Tensor  # [B] candidate of each row
    present: tuple[int, ...]  # the candidates with rows, ascending
    gather: torch.Tensor  # [len(present) * width] row of each slot
    scatter: torch.Tensor  # [B] slot of each row
    runs: tuple[
        tuple[int, int, int], ...
    ]  # (first group, first candidate, end candidate) of consecutive candidates
    members: tuple[torch.Tensor, ...]  # the rows of each present candidate
    memo: dict = field(default_factory=dict, compare=False)  # per-row tensors built once for this batch
    single: int | None = field(init=False)  # the candidate of every row when there is only one

    @classmethod
    def of(cls, candidates: Sequence[int], device: torch.device | str) -> RowAssignment:
        cands = list(candidates)
        if not cands:
            raise ValueError("a batch needs at least one row")
        present = tuple(sorted(set(cands)))
        members = {c: [r for r, rc in enumerate(cands) if rc == c] for c in present}
        width = max(len(rows) for rows in members.values())
        gather, scatter = [], [0] * len(cands)
        for g, c in enumerate(present):
            for j, r in enumerate(members[c]):
                scatter[r] = g * width + j
            gather += members[c] + [members[c][0]] * (width - len(members[c]))
        runs: list[tuple[int, int, int]] = []
        for g, c in enumerate(present):
            if runs and runs[-1][2] == c:
                runs[-1] = (runs[-1][0], runs[-1][1], c + 1)
            else:
                runs.append((g, c, c + 1))
        as_tensor = partial(torch.tensor, dtype=torch.long, device=device)
        return cls(
            as_tensor(cands),
            present,
            as_tensor(gather),
            as_tensor(scatter),
            tuple(runs),
            tuple(as_tensor(members[c]) for c in present),
        )

    def __post_init__(self) -> None:
        object.__setattr__(self, "single", self.present[0] if len(self.present) == 1 else None)


class _Rows:
    """The assignment of the forward pass in progress, shared by every fused layer of a model."""

    current: RowAssignment | None = None

    def get(self) -> RowAssignment:
        if self.current is None:
            raise RuntimeError("a fused layer was called outside FusedModel.forward(rows=...)")
        return self.current


class FusedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: _Rows):
        super().__init__()
        self.weight, self.bias, self.rows = weight, bias, rows  # [C, out, in], [C, out]
        self._weights = weight.unbind(0)  # per-candidate views, made once
        self._biases = [None] * len(self._weights) if bias is None else bias.unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows.get()
        if rows.single is not None:
            return F.linear(x, self._weights[rows.single], self._biases[rows.single])
        if x.numel() > x.shape[0] * x.shape[-1] and len(rows.gather) > len(rows.index):
            # several tokens per row (a prefill): padded slots would cost real work, so one matmul per candidate
            out = x.new_empty(*x.shape[:-1], self.weight.shape[1])
            for c, at in zip(rows.present, rows.members):
                out.index_copy_(0, at, F.linear(x.index_select(0, at), self._weights[c], self._biases[c]))
            return out
        # [B, ..., in] -> [groups, width * ..., in]: each candidate's rows side by side
        grouped = x.index_select(0, rows.gather).reshape(len(rows.present), -1, x.shape[-1])
        parts = []
        for g, c0, c1 in rows.runs:
            xs, w = grouped[g : g + c1 - c0], self.weight[c0:c1].transpose(1, 2)
            parts.append(
                torch.bmm(xs, w) if self.bias is None else torch.baddbmm(self.bias[c0:c1, None], xs, w)
            )
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        return y.reshape(len(rows.gather), *x.shape[1:-1], y.shape[-1]).index_select(0, rows.scatter)


class FusedEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, rows: _Rows):
        super().__init__()
        self.weight, self.rows = weight, rows  # [C, V, H]
        self._weights = weight.unbind(0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows.get()
        if rows.single is not None:
            return F.embedding(ids, self._weights[rows.single])
        # one lookup in the candidates' tables laid end to end: row b reads table index[b]
        offset = _per_row_tensor(
            rows,
            ("embedding-offset", ids.dim()),
            lambda: (rows.index * self.weight.shape[1]).view(-1, *([1] * (ids.dim() - 1))),
        )
        return F.embedding(ids + offset, self.weight.view(-1, self.weight.shape[-1]))


class FusedLayerNorm(nn.Module):
    def __init__(
        self, module: nn.LayerNorm, weight: torch.Tensor | None, bias: torch.Tensor | None, rows: _Rows
    ):
        super().__init__()
        self.shape, self.eps = module.normalized_shape, module.eps
        self.weight, self.bias, self.rows = weight, bias, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows.get()
        if rows.single is not None:
            c = rows.single
            return F.layer_norm(
                x,
                self.shape,
                None if self.weight is None else self.weight[c],
                None if self.bias is None else self.bias[c],
                self.eps,
            )
        y = F.layer_norm(x, self.shape, None, None, self.eps)
        if self.weight is not None:
            y = y * _per_row(self.weight, rows, x)
        if self.bias is not None:
            y = y + _per_row(self.bias, rows, x)
        return y


class BroadcastLeaf(nn.Module):
    """A leaf whose 1-D parameters act elementwise on the last dimension (e.g. RMSNorm), fed per-row parameters."""

    def __init__(self, template: nn.Module, stacked: dict[str, nn.Parameter], rows: _Rows):
        super().__init__()
        self.template, self.stacked, self.rows = template, nn.ParameterDict(stacked), rows
        self._params = [(name, value, value.unbind(0)) for name, value in stacked.items()]
        for name in stacked:
            del template._parameters[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows.get()
        slots = self.template.__dict__  # plain attributes: found before nn.Module.__getattr__ is consulted
        for name, value, per_candidate in self._params:
            slots[name] = per_candidate[rows.single] if rows.single is not None else _per_row(value, rows, x)
        return self.template(x)


def _per_row_tensor(rows: RowAssignment, key: Any, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, computed once per batch (every layer and decoding step of a call shares it)."""
    if key not in rows.memo:
        rows.memo[key] = build()
    return rows.memo[key]


def _per_row(stacked: torch.Tensor, rows: RowAssignment, x: torch.Tensor) -> torch.Tensor:
    """``stacked`` [C, D] gathered per row and shaped to broadcast against ``x`` [B, ..., D]."""
    return _per_row_tensor(
        rows,
        (id(stacked), x.dim()),
        lambda: stacked[rows.index].view(x.shape[0], *([1] * (x.dim() - 2)), stacked.shape[-1]),
    )


def _check_broadcast_leaf(name: str, modules: Sequence[nn.Module], rows: _Rows) -> None:
    """Raise NotFusable unless per-row parameters make ``modules[0]`` compute, row by row, what each module does."""
    stacked = {
        p: torch.stack([dict(m.named_parameters(recurse=False))[p].detach() for m in modules])
        for p in dict(modules[0].named_parameters(recurse=False))
    }
    leaf = BroadcastLeaf(copy.deepcopy(modules[0]), stacked, rows)
    ref = next(iter(stacked.values()))
    width = ref.shape[-1]
    for shape in ((len(modules), 3, width), (len(modules), 2, 3, width)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(ref.device, ref.dtype)
        with torch.no_grad():
            try:
                expected = torch.cat([m(x[c : c + 1]) for c, m in enumerate(modules)])
                rows.current = RowAssignment.of(range(len(modules)), ref.device)
                got = leaf(x)
            except Exception as err:  # noqa: BLE001 - any failure means "not this kind of leaf"
                raise NotFusable(
                    f"{name} ({type(modules[0]).__name__}) cannot run with per-row parameters: {err}"
                ) from err
            finally:
                rows.current = None
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):
            raise NotFusable(
                f"{name} ({type(modules[0]).__name__}) does not act elementwise on its parameters"
            )


class FusedModel(nn.Module):
    """Several same-architecture causal LMs as one: ``forward(rows=..., **hf_kwargs)`` runs row ``b``
    with the weights of candidate ``rows.index[b]``. Build it with :func:`fuse_models`.

    ``vocab_rows`` (when the candidates' vocabularies differ in size) holds each candidate's row
    count: logits past it are -inf on that candidate's rows."""

    def __init__(
        self, template: nn.Module, n_candidates: int, rows: _Rows, vocab_rows: Sequence[int] | None = None
    ):
        super().__init__()
        self.template, self.n_candidates, self._rows = template, n_candidates, rows
        self.config = getattr(template, "config", None)
        self.vocab_rows = None if vocab_rows is None or len(set(vocab_rows)) < 2 else tuple(vocab_rows)

    def forward(self, rows: RowAssignment, **kwargs: Any) -> Any:
        self._rows.current = rows
        try:
            out = self.template(**kwargs)
        finally:
            self._rows.current = None
        width = out.logits.shape[-1]
        if self.vocab_rows is not None and any(self.vocab_rows[c] < width for c in rows.present):
            # one candidate's rows: one [width] mask (its logits may come packed, [1, rows, width])
            beyond = _per_row_tensor(rows, ("vocab-mask", width), lambda: self._beyond_vocab(rows, width))
            out.logits = out.logits.masked_fill(beyond, float("-inf"))
        return out

    def _beyond_vocab(self, rows: RowAssignment, width: int) -> torch.Tensor:
        """[B, 1, width] ([width] when every row has one candidate): True at the ids the candidate of each
        row has no row for."""
        if rows.single is not None:
            return torch.arange(width, device=rows.index.device) >= self.vocab_rows[rows.single]
        limit = torch.tensor(self.vocab_rows, device=rows.index.device)[rows.index]
        return (torch.arange(width, device=limit.device)[None, :] >= limit[:, None]).unsqueeze(1)


def fuse_models(models: Sequence[nn.Module]) -> FusedModel:
    """Stack the weights of ``models`` (same class, config and parameter shapes, but for the number of
    vocabulary rows) into one :class:`FusedModel`.

    Each original parameter is replaced by a view of its stack, layer by layer, so the models stay
    usable, the weights are stored once, and fusing needs extra memory for one layer at a time.
    Raises :class:`NotFusable`, before touching any weight, when the models differ in architecture
    or contain a layer that cannot take per-row parameters.
    """
    if len(models) < 2:
        raise NotFusable("fusing needs at least two models")
    check_same_architecture(models)
    first, rows = models[0], _Rows()
    n_rows = [vocab_rows(m) for m in models]
    vocab = vocab_parameters(first)
    named = [dict(m.named_modules()) for m in models]
    plan: dict[str, Callable[[dict[str, nn.Parameter], nn.Module], nn.Module]] = {}
    for name, module in first.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        if any(True for _ in module.children()):
            raise NotFusable(f"{name} ({type(module).__name__}) holds parameters but is not a leaf module")
        if isinstance(module, nn.Linear):
            plan[name] = lambda s, m: FusedLinear(s["weight"], s.get("bias"), rows)
        elif isinstance(module, nn.Embedding):
            plan[name] = lambda s, m: FusedEmbedding(s["weight"], rows)
        elif isinstance(module, nn.LayerNorm):
            plan[name] = lambda s, m: FusedLayerNorm(m, s.get("weight"), s.get("bias"), rows)
        elif all(p.dim() == 1 for p in own.values()):
            _check_broadcast_leaf(name, [n[name] for n in named], rows)
            plan[name] = lambda s, m: BroadcastLeaf(m, s, rows)
        else:
            raise NotFusable(f"{name} ({type(module).__name__}) is a kind of layer that cannot be fused")
    # every check passed: stack layer by layer, pointing the originals at views of their stack at once,
    # so each original tensor is freed before the next layer is stacked
    stacks: dict[tuple[int, ...], nn.Parameter] = {}  # tied parameters share one stack
    stack_of: dict[tuple[str, str], nn.Parameter] = {}
    views: dict[tuple[int, int], nn.Parameter] = {}
    for name in plan:
        per_model = [dict(n[name].named_parameters(recurse=False)) for n in named]
        for pname in per_model[0]:
            key = tuple(id(own[pname]) for own in per_model)
            by_vocab = (f"{name}.{pname}" if name else pname) in vocab
            if key not in stacks:
                with torch.no_grad():
                    stacks[key] = nn.Parameter(
                        stack_padded([own[pname].detach() for own in per_model], by_vocab),
                        requires_grad=False,
                    )
            stack_of[name, pname] = stacks[key]
            for c, own in enumerate(per_model):
                p = own[pname]
                if (id(p), c) not in views:
                    view = stacks[key][c, : p.shape[0]] if by_vocab else stacks[key][c]
                    views[id(p), c] = nn.Parameter(view, requires_grad=p.requires_grad)
                setattr(named[c][name], pname, views[id(p), c])
    del views, per_model
    template = copy.deepcopy(first, {id(p): p for p in first.parameters()})  # the structure, not the weights
    for name, build in plan.items():
        module = template.get_submodule(name)
        fused = build(
            {pname: stack_of[name, pname] for pname in dict(module.named_parameters(recurse=False))}, module
        )
        parent, _, child = name.rpartition(".")
        setattr(template.get_submodule(parent) if parent else template, child, fused)
    return FusedModel(template, len(models), rows, None if None in n_rows else n_rows)


class FusedCachedLM(CachedLM):
    """A :class:`CachedLM` over a :class:`FusedModel`; keys are ``(candidate, trace key)`` pairs."""

    def _rows(self, keys: Sequence[Any]) -> RowAssignment:
        return RowAssignment.of([k[0] for k in keys], self.device)

    def _forward(self, rows: RowAssignment, **kwargs: Any) -> Any:
        return self.model(rows=rows, **kwargs)

    def _hf_model(self) -> nn.Module:
        return self.model.template

    def _packs(self, rows: RowAssignment) -> bool:
        """Packed reading runs one set of weights over all its tokens: only for one candidate's rows."""
        return self._packable and rows.single is not None

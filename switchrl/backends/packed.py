"""Reading several traces' new tokens in one forward pass, without padding: the chunks laid end to end.

A switched trace brings each candidate chunks of very different lengths (a 128-token prompt, another
candidate's 50- or 150-token patches, or the one token it sampled last). Padded to the longest, the
short chunks cost real work; split into calls of like lengths, each call pays a whole forward pass of
Python and small kernels plus a copy to merge the caches (``dataset_throughput``'s 64 queries at
B = 8: 113 reading calls for 49 passes). Here the chunks form one
sequence [1, T]: every linear layer, norm and MLP runs once over exactly the T real tokens, each row's
keys and values are written straight into its row of the left-padded decode room, and attention runs
per row (rows of equal lengths together) over that row's past and chunk, causally, with SDPA's
grouped-query heads (no copy of the KV heads).

Only for models that attend through Hugging Face's attention interface under a plain causal mask and
take ``logits_to_keep`` as indices, on the CPU, where it was measured (checked by
:class:`~switchrl.backends.cached_lm.CachedLM`; GPUs keep the padded chunks until measured on one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from switchrl.backends.kv_store import GrowingCache, Layers, Segment, gather_past

ATTENTION = "switchrl_packed"  # the attention implementation a packed forward runs under


@dataclass(frozen=True)
class PackedRows:
    """Where each row's chunk lies in the packed sequence and in the decode room: a row's chunk ends at
    column ``width`` (the longest past + chunk), its past right before it.

    ``runs``: (first row, rows, past, new, first packed token, causal mask or None) for consecutive rows
    of equal past and chunk lengths (their chunks are adjacent in the packed sequence)."""

    runs: tuple[tuple[int, int, int, int, int, torch.Tensor | None], ...]
    width: int

    @classmethod
    def of(cls, past: Sequence[int], new: Sequence[int], device: torch.device) -> PackedRows:
        runs: list[list[int]] = []
        at = 0
        for b, (p, n) in enumerate(zip(past, new)):
            if runs and runs[-1][2:4] == [p, n]:
                runs[-1][1] += 1
            else:
                runs.append([b, 1, p, n, at])
            at += n
        width = max(p + n for p, n in zip(past, new))
        return cls(tuple((*run, _causal(run[2], run[3], device)) for run in runs), width)

    def by_row(self, packed: torch.Tensor) -> Iterator[tuple[slice, int, int, torch.Tensor]]:
        """For each run: its rows, past and chunk lengths, and its tokens of ``packed`` [heads, T, dim] as
        [rows, heads, new, dim]."""
        for first, count, past, new, at, _ in self.runs:
            chunk = packed[:, at : at + count * new].unflatten(1, (count, new)).transpose(0, 1)
            yield slice(first, first + count), past, new, chunk


def _causal(past: int, new: int, device: torch.device) -> torch.Tensor | None:
    """[new, past + new]: query ``i`` sees the past and the chunk up to itself (None: SDPA needs no mask)."""
    if new == 1 or past == 0:
        return None  # one query sees everything; without a past ``is_causal`` is that mask
    return torch.ones(new, past + new, dtype=torch.bool, device=device).tril(past)


class _PackedLayer(DynamicLayer):
    """Writes a packed forward's keys and values into the decode room, at each token's (row, column)."""

    def __init__(
        self, rows: PackedRows, batch: int, size: int, room: tuple[torch.Tensor, torch.Tensor] | None
    ):
        super().__init__()
        self.rows, self.batch, self.size = rows, batch, size
        self.room = room

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.room is None:
            self.room = tuple(  # type: ignore[assignment]
                x.new_zeros((self.batch, x.shape[1], self.size, x.shape[3]))
                for x in (key_states, value_states)
            )
        k, v = self.room
        end = self.rows.width
        for room, states in ((k, key_states), (v, value_states)):
            for rows, _, new, chunk in self.rows.by_row(states[0]):
                room[rows, :, end - new : end] = chunk
        self.keys, self.values = k, v
        return k, v


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    switchrl_packed: PackedRows | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of packed queries [1, heads, T, dim] over each row's slice of the room ``key`` / ``value``
    [rows, kv heads, size, dim]; returns [1, T, heads, dim] as Hugging Face's attention functions do."""
    rows = switchrl_packed
    if rows is None:
        raise RuntimeError(f"the {ATTENTION!r} attention runs only inside a packed forward")
    heads, end = query.shape[1], rows.width
    out = query.new_empty((query.shape[2], heads, query.shape[3]))  # [T, heads, dim]
    for (at_rows, past, new, q), (_, _, _, _, at, mask) in zip(rows.by_row(query[0]), rows.runs):
        span = slice(end - past - new, end)
        o = F.scaled_dot_product_attention(
            q,
            key[at_rows, :, span],
            value[at_rows, :, span],
            attn_mask=mask,
            is_causal=mask is None and new > 1,
            scale=scaling,
            enable_gqa=heads != key.shape[1],
        )
        out[at : at + o.shape[0] * new] = o.transpose(1, 2).flatten(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION, packed_attention)


class _PackedCache(DynamicCache):
    """The cache of one packed forward: per layer a :class:`_PackedLayer` over its room (given, or made
    at the first write when no row has a stored cache)."""

    def __init__(self, rows: PackedRows, batch: int, size: int, rooms: Layers | None):
        if rooms is None:
            Cache.__init__(self, layer_class_to_replicate=partial(_PackedLayer, rows, batch, size, None))
        else:
            Cache.__init__(self, layers=[_PackedLayer(rows, batch, size, room) for room in rooms])


def read_packed(
    lm: Any,
    rows: Any,
    entries: Sequence[Segment | None],
    past: Sequence[int],
    new_ids: Sequence[Sequence[int]],
    room: int,
) -> tuple[torch.Tensor, GrowingCache, torch.Tensor]:
    """Read ``new_ids[b]`` on top of row ``b``'s stored cache ``entries[b]`` (``past[b]`` tokens) in one
    packed forward of ``lm`` (a :class:`~switchrl.backends.cached_lm.CachedLM`; ``rows``: what its
    ``_rows`` says of the batch). Returns what a padded prefill returns: the [B, L] mask of the
    left-padded rows (L: the longest past + chunk), their cache with ``room`` free positions after L, and
    the logits of each row's last token [B, V]."""
    device, new = lm.device, [len(ids) for ids in new_ids]
    layout = PackedRows.of(past, new, device)
    width, batch = layout.width, len(new)
    ends = [width - n for n in new]  # each row's past ends where its chunk starts
    rooms = (
        gather_past(entries, ends, width + room - max(ends)) if any(e is not None for e in entries) else None
    )
    cache = _PackedCache(layout, batch, width + room, rooms)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, (p, n) in enumerate(zip(past, new)):
        mask[b, width - p - n :] = 1
    config = lm._hf_model().config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        out = lm._forward(
            rows,
            input_ids=torch.tensor([t for ids in new_ids for t in ids], device=device)[None],
            position_ids=torch.cat([torch.arange(p, p + n) for p, n in zip(past, new)]).to(device)[None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=torch.tensor(new, device=device).cumsum(0) - 1,
            switchrl_packed=layout,
        )
    finally:
        config._attn_implementation = before
    filled = GrowingCache(width + room, [layer.room for layer in cache.layers], width)
    return mask.to(device), filled, out.logits[0]

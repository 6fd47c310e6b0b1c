"""The stored KV caches of a :class:`~switchrl.backends.cached_lm.CachedLM`, forks sharing their prefix.

Simulate forks a trace into k children that differ only in what they write next. Storing each
child's whole cache would store the shared prefix k times, so a trace's cache is a chain of
:class:`Segment` s instead: its own tokens on top of the segment it was forked from. A fork copies
nothing (the children point at the parent's segment); a commit stores only the tokens a trace gained
since the segment its chain shares with another trace, and folds its own unshared segment into the
new one (so a chain grows by one segment per fork point, not per call). The batch assembly
(:func:`gather_past`) copies each chain into the padded batch cache transiently (a segment shared by
several rows once, broadcast). Segments count
their references (keys and child segments): releasing the last child of a segment frees it, and
its parent's in turn.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(eq=False)
class Segment:
    """Per layer (keys, values) [1, heads, own tokens, dim] of the tokens after ``parent``'s."""

    layers: Layers
    parent: Segment | None
    length: int  # tokens from the root of the chain through this segment
    refs: int = field(default=0)  # keys and child segments pointing at this one

    @property
    def start(self) -> int:
        """Position of this segment's first token in its trace."""
        return self.parent.length if self.parent is not None else 0

    def chain(self) -> list[Segment]:
        """This segment and its ancestors, root first."""
        out, seg = [], self
        while seg is not None:
            out.append(seg)
            seg = seg.parent
        return out[::-1]


class KVStore:
    """The cache of each trace key, as the tail :class:`Segment` of its chain."""

    def __init__(self) -> None:
        self._tails: dict[Hashable, Segment] = {}

    def __len__(self) -> int:
        return len(self._tails)

    def keys(self) -> Iterator[Hashable]:
        return iter(self._tails)

    def get(self, key: Hashable) -> Segment | None:
        return self._tails.get(key)

    def length(self, key: Hashable) -> int:
        tail = self._tails.get(key)
        return tail.length if tail else 0

    def fork(self, src: Hashable, dsts: Sequence[Hashable]) -> None:
        """Point ``dsts`` at ``src``'s chain (or drop them when ``src`` has none); nothing is copied."""
        tail = self._tails.get(src)
        for key in dsts:
            self._set(key, tail)

    def release(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            self._set(key, None)

    def store(self, key: Hashable, row: Layers, positions: torch.Tensor, old: Segment | None) -> None:
        """Store ``key``'s cache: the ``positions`` of ``row`` (per layer [1, heads, width, dim]) that
        hold its tokens, in order; ``old`` is the cache ``key`` had when ``row`` was assembled.

        When ``old`` is held by ``key`` alone its tokens are taken again into the new segment (one
        segment per unshared run); otherwise the new segment holds only the tokens after ``old``,
        which stays shared.
        """
        parent = None if old is None else old.parent if old.refs == 1 else old
        at = positions[parent.length :] if parent is not None else positions
        if parent is not None:
            parent.refs += 1
        layers = [(_take(k, at), _take(v, at)) for k, v in row]
        self._set(key, Segment(layers, parent, int(positions.numel())))

    def stored_tokens(self) -> int:
        """Token positions held in memory: each shared segment counted once."""
        return sum(seg.length - seg.start for seg in self._segments())

    def stored_bytes(self) -> int:
        """Bytes of keys and values held in memory: each shared segment counted once."""
        return sum(k.nbytes + v.nbytes for seg in self._segments() for k, v in seg.layers)

    def _segments(self) -> list[Segment]:
        """Every segment some key's chain holds, once."""
        seen: dict[int, Segment] = {}
        for tail in self._tails.values():
            for seg in tail.chain():
                seen[id(seg)] = seg
        return list(seen.values())

    def _set(self, key: Hashable, tail: Segment | None) -> None:
        if tail is not None:
            tail.refs += 1
            self._tails[key], old = tail, self._tails.get(key)
        else:
            old = self._tails.pop(key, None)
        while old is not None:
            old.refs -= 1
            if old.refs:
                break
            old.layers, old = [], old.parent  # free the tensors even if a batch in flight holds the segment


def _take(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``x``'s positions ``at`` (dim 2), copied: a run of consecutive positions (a row's cache in a batch
    whose masked columns are all padding) as one slice copy, several times cheaper than a gather."""
    first, last = (int(at[0]), int(at[-1])) if at.numel() else (0, -1)
    if last - first + 1 == at.numel():
        return x[:, :, first : last + 1].clone(memory_format=torch.contiguous_format)
    return x.index_select(2, at)


def gather_past(tails: Sequence[Segment | None], width: int | Sequence[int], room: int = 0) -> Layers:
    """The stored caches of a batch's rows, left-padded to end at ``width`` (or at ``width[b]`` for row
    ``b``), in buffers with ``room`` more positions past the last end for what the batch reads and writes
    next: per layer [rows, heads, max(width) + room, dim].

    Each segment is copied once per padding offset into every row that holds it (forks share their
    prefix's segments): a fork's prefix costs one broadcast copy, not one per fork."""
    chains = [[] if t is None else t.chain() for t in tails]
    template = next(c for c in chains if c)[0].layers
    ends = [width] * len(tails) if isinstance(width, int) else list(width)
    spans: dict[tuple[int, int], tuple[Segment, int, list[int]]] = {}  # (segment, pad) -> its rows
    for b, chain in enumerate(chains):
        pad = ends[b] - chain[-1].length if chain else 0
        for seg in chain:
            spans.setdefault((id(seg), pad), (seg, pad, []))[2].append(b)
    targets = []
    for _, _, rows in spans.values():
        at: slice | torch.Tensor = slice(rows[0], rows[-1] + 1)
        if rows[-1] - rows[0] + 1 != len(rows):
            at = torch.tensor(rows, device=template[0][0].device)
        targets.append(at)
    layers: Layers = []
    for li, (k0, v0) in enumerate(template):
        k = k0.new_zeros((len(tails), k0.shape[1], max(ends) + room, k0.shape[3]))
        v = v0.new_zeros((len(tails), v0.shape[1], max(ends) + room, v0.shape[3]))
        for (seg, pad, _), at in zip(spans.values(), targets):
            k[at, :, pad + seg.start : pad + seg.length] = seg.layers[li][0]
            v[at, :, pad + seg.start : pad + seg.length] = seg.layers[li][1]
        layers.append((k, v))
    return layers


class GrowingLayer(DynamicLayer):
    """A :class:`DynamicLayer` that writes new tokens into reserved room instead of concatenating.

    ``DynamicLayer`` copies the whole cache on every decoding step (``torch.cat``); here a step
    writes one position in place and the layer exposes a view of the filled part. The room is
    sized for the whole call up front (``capacity``) and doubles if a call needs more.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._k is None or end > self._k.shape[-2]:
            room = max(end, self.capacity, 2 * (self._k.shape[-2] if self._k is not None else 0))
            k, v = (x.new_empty((*x.shape[:-2], room, x.shape[-1])) for x in (key_states, value_states))
            if self._k is not None:
                k[..., : self.length, :] = self._k[..., : self.length, :]
                v[..., : self.length, :] = self._v[..., : self.length, :]
            self._k, self._v = k, v
        self._k[..., self.length : end, :] = key_states
        self._v[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take ``keys`` / ``values`` as the room itself (no copy): their first ``length`` positions hold the cache."""
        self.lazy_initialization(keys, values)
        self._k, self._v, self.length = keys, values, length
        self.keys, self.values = keys[..., :length, :], values[..., :length, :]


class GrowingCache(DynamicCache):
    """A :class:`DynamicCache` of :class:`GrowingLayer` s, optionally filled with ``layers`` [(keys, values)]:
    copied in, or, with ``filled``, taken as the layers' room whose first ``filled`` positions are set."""

    def __init__(
        self,
        capacity: int,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        filled: int | None = None,
    ):
        Cache.__init__(self, layer_class_to_replicate=partial(GrowingLayer, capacity))
        for idx, (k, v) in enumerate(layers):
            if filled is None:
                self.update(k, v, idx)
            else:
                layer = GrowingLayer(capacity)
                layer.adopt(k, v, filled)
                self.layers.append(layer)

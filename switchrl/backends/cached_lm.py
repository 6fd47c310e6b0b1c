"""A causal LM that keeps, per trace, the KV cache of everything it has read.

Each call takes a batch of traces (by key) and the tokens each one has gained since that trace was
last read, prefills only those tokens on top of the stored caches, and optionally samples a
continuation. Traces of different lengths share one forward pass: stored caches are left-padded,
with an explicit attention mask and position ids, so padding never changes a result. A plain causal
SDPA model reads the new chunks laid end to end, unpadded (:mod:`~switchrl.backends.packed`); any
other model reads them left-padded inside the chunk, in calls of like chunk lengths. Candidates
(patch writers) and LM switchers both build on this class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from switchrl.backends.kv_store import GrowingCache, KVStore, Segment, gather_past
from switchrl.backends.packed import read_packed
from switchrl.backends.sampler import RowSampling, SamplingSets
from switchrl.backends.stopping import CHECK_EVERY, StopIds, StopIdSets, StopScan, stop_rows


@dataclass
class Generation:
    """What :meth:`CachedLM.generate` wrote for one trace."""

    token_ids: list[int]
    stop_reason: str | None  # "eos" (a stop id, not in ``token_ids``), "stop" (should_stop) or None


class CachedLM:
    """Wraps a Hugging Face causal LM with per-key KV caches and batched incremental calls."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int = 0):
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self._kv = KVStore()  # forked traces share the cache of their common prefix
        # a prefill needs the logits of its last position only
        keep = "logits_to_keep" in inspect.signature(self._hf_model().forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if keep else {}
        self._step_mask_is_padding = _plain_causal_sdpa(self._hf_model())
        # such a model reads a batch's chunks laid end to end, unpadded, in one forward (backends/packed.py);
        # on the CPU only, where it was measured (fewer, cheaper reading passes); GPUs keep padded chunks
        self._packable = (
            self._step_mask_is_padding and bool(self._last_logits_only) and self.device.type == "cpu"
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ cache bookkeeping
    def cached_length(self, key: str) -> int:
        """How many tokens of trace ``key`` this model has already read."""
        return self._kv.length(key)

    def fork(self, src_key: str, dst_keys: Sequence[str]) -> None:
        """Let ``dst_keys`` start from ``src_key``'s cache; they share it (nothing is copied)."""
        self._kv.fork(src_key, dst_keys)

    def release(self, keys: Sequence[str]) -> None:
        self._kv.release(keys)

    def keys(self) -> list[Any]:
        """The keys of the traces with a stored cache."""
        return list(self._kv.keys())

    def stored_tokens(self) -> int:
        """Token positions of KV held for all traces (a prefix shared by forks counts once)."""
        return self._kv.stored_tokens()

    def stored_bytes(self) -> int:
        """Bytes of KV held for all traces (a prefix shared by forks counts once)."""
        return self._kv.stored_bytes()

    def __len__(self) -> int:
        return len(self._kv)

    # ------------------------------------------------------------------ hooks for fused models
    def _rows(self, keys: Sequence[Any]) -> Any:
        """What the model needs to know about the rows of a batch of ``keys`` (nothing, here)."""
        return None

    def _forward(self, rows: Any, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    def _hf_model(self) -> torch.nn.Module:
        return self.model

    def _packs(self, rows: Any) -> bool:
        """Whether a batch of these ``rows`` is read packed (:func:`~switchrl.backends.packed.read_packed`)."""
        return self._packable

    # ------------------------------------------------------------------ forward passes
    @torch.inference_mode()
    def extend(self, keys: Sequence[str], new_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Read ``new_ids[i]`` on top of trace ``keys[i]``; returns the last position's logits [B, V]."""
        state = _BatchState.start(self, keys, new_ids)
        logits = state.logits
        state.commit()
        return logits

    @torch.inference_mode()
    def generate(
        self,
        keys: Sequence[str],
        new_ids: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        sampling: SamplingSets,
        generators: Sequence[torch.Generator | None] | None = None,
        stop_ids: StopIdSets = frozenset(),
        should_stop: StopScan | None = None,
        may_stop: Callable[[int, list[int]], bool] | None = None,
    ) -> list[Generation]:
        """Read ``new_ids`` then sample up to ``max_new_tokens[i]`` tokens for each trace.

        ``sampling`` and ``stop_ids`` are one setting for all rows or one per row (fused candidates may
        differ in both). Sampling draws the ``t``-th token of row ``i`` from the ``t``-th uniform of
        ``generators[i]`` (None for a greedy row, see :class:`RowSampling`). A row ends at one of its
        stop ids (not returned), at its token limit, or where ``should_stop`` (a :class:`StopScan`, run
        every ``CHECK_EVERY`` tokens) finds a stop string; decoding past that token is then rolled back.
        While ``may_stop(row, tokens_so_far)`` is False, the row's stop ids are banned for it.
        Afterwards each cache holds everything the trace read and wrote except its last sampled token,
        which the next call passes in again as part of ``new_ids``. Without callbacks the loop runs on
        tensors only.
        """
        batch = len(keys)
        if len(max_new_tokens) != batch:
            raise ValueError(f"got {batch} keys but {len(max_new_tokens)} max_new_tokens")
        if any(n < 0 for n in max_new_tokens):
            raise ValueError(f"max_new_tokens must be >= 0, got {list(max_new_tokens)}")
        steps = max(max_new_tokens, default=0)
        draw = RowSampling(sampling, generators, batch, steps, self.device)
        state = _BatchState.start(self, keys, new_ids, room=steps)
        device = state.mask.device
        stop = StopIds(stop_ids, batch, device)
        ban = may_stop is not None and bool(stop)
        lists: list[list[int]] | None = [[] for _ in keys] if ban else None
        first_col = state.mask.shape[1]  # the cache column of the first sampled token
        limits = torch.tensor(list(max_new_tokens), dtype=torch.long, device=device)
        written = torch.zeros((batch, max(steps, 1)), dtype=torch.long, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        hit_eos = torch.zeros(batch, dtype=torch.bool, device=device)
        hit_stop = torch.zeros(batch, dtype=torch.bool, device=device)
        active = limits > 0
        logits = state.logits
        for t in range(steps):
            if ban:
                rows = [r for r in active.nonzero().flatten().tolist() if not may_stop(r, lists[r])]
                if rows:
                    logits = stop.ban(logits, rows)
            tokens = draw(logits, t)
            eos = active & stop.hits(tokens) if stop else torch.zeros_like(active)
            keep = active & ~eos
            written[:, t] = tokens
            lengths += keep
            hit_eos |= eos
            active = keep & (lengths < limits)
            if lists is not None:
                for r, (k, tok) in enumerate(zip(keep.tolist(), tokens.tolist())):
                    if k:
                        lists[r].append(tok)
            if should_stop is not None and (t + 1) % CHECK_EVERY == 0:
                stop_rows(should_stop, written, lengths, hit_eos, hit_stop, active, state.mask, first_col)
            if not bool(active.any()):
                break
            logits = state.step(tokens, active)
        if should_stop is not None:
            stop_rows(should_stop, written, lengths, hit_eos, hit_stop, active, state.mask, first_col)
        state.commit()
        rows = written.tolist()
        reasons = ["eos" if e else "stop" if s else None for e, s in zip(hit_eos.tolist(), hit_stop.tolist())]
        return [Generation(row[:n], reason) for row, n, reason in zip(rows, lengths.tolist(), reasons)]


def _plain_causal_sdpa(model: torch.nn.Module) -> bool:
    """Whether ``model`` attends through SDPA under a plain causal mask (no sliding window, no chunks).

    Then the mask of a one-token decoding step is just the batch's padding mask, [B, 1, 1, L] boolean,
    which Hugging Face would rebuild through its general mask functions every step (~5% of a padded
    tiny-model step on CPU); :meth:`_BatchState.step` hands that same tensor over instead.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None):
        return False
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())


def _length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Row indices grouped so that within a group the longest length is less than twice the shortest."""
    buckets: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        if buckets and 2 * lengths[row] > lengths[buckets[-1][0]]:
            buckets[-1].append(row)
        else:
            buckets.append([row])
    return buckets


def _prefill(
    lm: CachedLM,
    rows: Any,
    entries: Sequence[Segment | None],
    past: Sequence[int],
    new_ids: Sequence[Sequence[int]],
    room: int,
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """Read ``new_ids`` on top of the stored caches, left-padded; returns (mask, cache, last logits).

    ``rows`` is what ``lm._rows`` says of these rows (the candidate of each row, for a fused model).

    The cache keeps ``room`` free positions for the tokens decoded next.
    """
    device = lm.device
    P, N, B = max(past), max(len(ids) for ids in new_ids), len(new_ids)
    mask = torch.zeros(B, P + N, dtype=torch.long)
    input_ids = torch.full((B, N), lm.pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(B, N, dtype=torch.long)
    for b, (pl, ids) in enumerate(zip(past, new_ids)):
        mask[b, P - pl : P] = 1
        mask[b, P + N - len(ids) :] = 1
        input_ids[b, N - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        position_ids[b, N - len(ids) :] = torch.arange(pl, pl + len(ids))
    cache = (
        GrowingCache(P + N + room, gather_past(entries, P, N + room), P)
        if P > 0
        else GrowingCache(P + N + room)
    )
    mask = mask.to(device)
    out = lm._forward(
        rows,
        input_ids=input_ids.to(device),
        attention_mask=mask,
        position_ids=position_ids.to(device),
        past_key_values=cache,
        use_cache=True,
        **lm._last_logits_only,
    )
    return mask, out.past_key_values, out.logits[:, -1, :]


class _BatchState:
    """One batched forward over several traces' caches: prefill, then one token at a time."""

    def __init__(self, lm: CachedLM, keys: Sequence[str]):
        self.lm = lm
        self.keys = list(keys)

    @classmethod
    def start(
        cls, lm: CachedLM, keys: Sequence[str], new_ids: Sequence[Sequence[int]], room: int = 0
    ) -> _BatchState:
        """Prefill ``new_ids`` on top of the stored caches, keeping ``room`` cache positions for decoding."""
        if len(keys) != len(new_ids):
            raise ValueError(f"got {len(keys)} keys but {len(new_ids)} token lists")
        if len(set(keys)) != len(keys):
            raise ValueError("a batch must not name the same trace twice")
        if any(len(ids) == 0 for ids in new_ids):
            raise ValueError("every trace must bring at least one new token to read")
        self = cls(lm, keys)
        self.rows = lm._rows(keys)
        device = lm.device
        self.entries = entries = [lm._kv.get(k) for k in keys]
        past = [e.length if e else 0 for e in entries]
        n_new = [len(ids) for ids in new_ids]
        total = [p + n for p, n in zip(past, n_new)]
        self.next_pos = torch.tensor(total, device=device)
        if lm._packs(self.rows):
            self.mask, self.cache, self.logits = read_packed(lm, self.rows, entries, past, new_ids, room)
            return self
        buckets = _length_buckets(n_new)
        if len(buckets) == 1:
            self.mask, self.cache, self.logits = _prefill(lm, self.rows, entries, past, new_ids, room)
            return self
        # rows whose new chunks differ a lot in length are prefilled apart (no padding to the longest
        # chunk), then merged right-aligned into one decode batch of length max(past + new)
        B, L = len(keys), max(total)
        self.mask = torch.zeros(B, L, dtype=torch.long, device=device)
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        j = torch.arange(L, device=device)[None, :]
        for rows in buckets:
            mask, cache, logits = _prefill(
                lm,
                lm._rows([keys[r] for r in rows]),
                [entries[r] for r in rows],
                [past[r] for r in rows],
                [new_ids[r] for r in rows],
                0,
            )
            pk, nk = max(past[r] for r in rows), max(n_new[r] for r in rows)
            pb = torch.tensor([past[r] for r in rows], device=device)[:, None]
            nb = torch.tensor([n_new[r] for r in rows], device=device)[:, None]
            valid = j >= L - pb - nb
            src = torch.where(j < L - nb, pk + nb - L + j, pk + nk - L + j).masked_fill(~valid, 0)
            at = torch.tensor(rows, device=device)
            self.mask[at] = valid.to(self.mask.dtype)
            if not layers:
                layers = [
                    (k.new_zeros((B, k.shape[1], L, k.shape[3])), v.new_zeros((B, v.shape[1], L, v.shape[3])))
                    for k, v in ((x.keys, x.values) for x in cache.layers)
                ]
                self.logits = logits.new_zeros((B, logits.shape[-1]))
            self.logits[at] = logits
            for (k_all, v_all), layer in zip(layers, cache.layers):
                index = src[:, None, :, None].expand(len(rows), layer.keys.shape[1], L, layer.keys.shape[3])
                k_all[at] = layer.keys.gather(2, index)
                v_all[at] = layer.values.gather(2, index)
        self.cache = GrowingCache(L + room, layers)
        return self

    def step(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``tokens`` [B]); rows not ``active`` [B] are masked out of the cache."""
        col = active.to(self.mask.dtype).unsqueeze(1)
        self.mask = torch.cat([self.mask, col], dim=1)
        attention: torch.Tensor = self.mask
        if self.lm._step_mask_is_padding and not bool(self.mask.all()):
            # the [B, 1, 1, L] boolean mask Hugging Face's SDPA mask functions would build (no padding: none)
            attention = self.mask.bool()[:, None, None, :]
        out = self.lm._forward(
            self.rows,
            input_ids=tokens.unsqueeze(1),
            attention_mask=attention,
            position_ids=self.next_pos.unsqueeze(1),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.next_pos = self.next_pos + col.squeeze(1)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def commit(self) -> None:
        """Store each row's unpadded cache back under its key (past its chain's shared segments only)."""
        layers = [(layer.keys, layer.values) for layer in self.cache.layers]
        for b, (key, old) in enumerate(zip(self.keys, self.entries)):
            row = [(k[b : b + 1], v[b : b + 1]) for k, v in layers]
            self.lm._kv.store(key, row, self.mask[b].nonzero().squeeze(1), old)

"""Memory-bounded admission: how many traces a scheduler may have in flight, counted in KV-cache bytes.

A trace count (``max_inflight``) says nothing about memory: a thousand short traces and ten long ones
hold very different caches. :class:`KVBudget` estimates what admitting a trace adds to the caches of
the candidates that keep theirs here (each of them may read it), from the bytes one token costs each
(measured from what its cache stores) and the tokens the trace will add: its prompt and whatever it
holds that a candidate has not read yet, plus the tokens it may still write. A fork whose prefix the
candidates hold already (simulated rollouts) adds only what it writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from switchrl.backends.base import Pool, Trace
from switchrl.errors import ConfigError


def _store(backend: object) -> object | None:
    """The cache store (a ``CachedLM``) holding ``backend``'s KV here, if it keeps one (a fused member's
    view reads its engine's shared store)."""
    lm = getattr(backend, "lm", None)
    store = getattr(lm, "fused", lm)
    return store if hasattr(store, "stored_bytes") and hasattr(store, "stored_tokens") else None


def kv_bytes_per_token(pool: Pool) -> list[int]:
    """Per candidate, the bytes of KV cache one token costs it (0: a server or engine that keeps its
    own memory, e.g. vLLM or an OpenAI-compatible server). Measured as stored bytes / stored tokens of
    its cache; a candidate that holds nothing yet first writes one token of a probe trace."""
    out = []
    for c, backend in enumerate(getattr(pool, "backends", ())):
        store = _store(backend)
        if store is None:
            out.append(0)
            continue
        if not store.stored_tokens():
            probe = Trace(f"__kv_probe__/{c}", "probe", 1)
            pool.step([probe], [c])
            tokens, size = store.stored_tokens(), store.stored_bytes()
            pool.release([probe.key])
        else:
            tokens, size = store.stored_tokens(), store.stored_bytes()
        out.append(math.ceil(size / max(1, tokens)))
    return out


class KVBudget:
    """Admits traces while the estimated KV of those in flight fits in ``max_bytes``.

    The estimate of a trace, per candidate with a cache here: (its prompt + the tokens it holds that
    this candidate has not read, + the tokens it may still write) x that candidate's bytes per token.
    It is an upper bound in the authors' tokens (a candidate with another tokenizer may read a few
    more); the batch cache a pass assembles for its rows comes on top, bounded by ``max_batch``.
    """

    def __init__(self, pool: Pool, max_bytes: int):
        if max_bytes <= 0:
            raise ConfigError(f"max_inflight_bytes must be > 0 (or null: no limit), got {max_bytes}")
        self.pool, self.max_bytes = pool, max_bytes
        self.per_token = kv_bytes_per_token(pool)
        if not any(self.per_token):
            raise ConfigError(
                "max_inflight_bytes: no candidate of this pool keeps a KV cache here (servers and vLLM "
                "engines manage their own memory); remove the limit or use max_inflight (a trace count)"
            )
        self.used = 0
        self._held: dict[str, int] = {}
        self._prompt_tokens: dict[tuple[int, str], int] = {}

    def estimate(self, trace: Trace) -> int:
        """Bytes of KV admitting ``trace`` may add (see the class docstring)."""
        total = 0
        backends: Sequence = getattr(self.pool, "backends", ())
        for c, (backend, per_token) in enumerate(zip(backends, self.per_token)):
            if not per_token:
                continue
            key = (c, trace.query)
            if key not in self._prompt_tokens:
                self._prompt_tokens[key] = len(backend.prompt_ids(trace.query))
            unread = max(0, self._prompt_tokens[key] + trace.num_tokens - backend.lm.cached_length(trace.key))
            total += (unread + trace.remaining_tokens) * per_token
        return total

    def admit(self, trace: Trace) -> bool:
        """Reserve ``trace``'s estimate if it fits beside those in flight (always when none is)."""
        need = self.estimate(trace)
        if need > self.max_bytes:
            raise ConfigError(
                f"max_inflight_bytes={self.max_bytes} cannot hold one trace: {trace.key!r} may need {need} "
                f"bytes of KV cache (its prompt + max_new_tokens={trace.max_new_tokens} tokens x "
                f"{sum(self.per_token)} bytes per token over the candidates); raise max_inflight_bytes "
                "or lower max_new_tokens"
            )
        if self._held and self.used + need > self.max_bytes:
            return False
        self._held[trace.key] = need
        self.used += need
        return True

    def release(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.used -= self._held.pop(key, 0)

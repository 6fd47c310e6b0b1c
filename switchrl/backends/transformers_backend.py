"""Candidates served in-process by Hugging Face transformers, with per-trace KV-cache reuse.

:class:`TransformersBackend` is one candidate with its own model; :func:`fuse_backends` groups those
of one architecture into a :class:`FusedCandidates` engine (one forward pass per token for all of
them), each member then reading its rows through a :class:`CandidateView` of the shared cache.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from switchrl.backends.base import CandidateSampling, Group, Patch, Trace
from switchrl.backends.cached_lm import CachedLM, Generation
from switchrl.backends.fusable import NotFusable, architecture_signature
from switchrl.backends.fused import FusedCachedLM, FusedModel, fuse_models
from switchrl.backends.stopping import RowStops, StopScan
from switchrl.backends.tokens import TokenizedCandidate, check_model_dir, load_from_checkpoint, load_tokenizer
from switchrl.utils.seeding import generator

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[dtype]


def load_causal_lm(path: str, dtype: str = "auto", device: str = "cpu") -> torch.nn.Module:
    device = resolve_device(device)
    check_model_dir(path)
    model = load_from_checkpoint(
        "a causal LM", AutoModelForCausalLM.from_pretrained, path, dtype=resolve_dtype(dtype, device)
    )
    return model.to(device).eval()


RowCallback = Callable[[int, list[int]], bool]


@dataclass
class _PatchRequest:
    """One candidate's share of a generate call: its rows, their new tokens, limits, stop strings and callback."""

    keys: list[str]
    new_ids: list[list[int]]
    limits: list[int]
    generators: list[torch.Generator] | None
    stops: list[RowStops | None]
    may_stop: RowCallback | None


class TransformersBackend(TokenizedCandidate):
    """Writes patches for a batch of traces with one batched forward pass per token.

    For every live trace it keeps the KV cache of what this candidate has read, so a patch costs a
    prefill of only the tokens other candidates wrote since this candidate's last turn. With
    ``eos_after``, EOS is banned until the response text first matches that regex (searched anywhere).
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        sampling: CandidateSampling | None = None,
        chat_template: bool = False,
        prompt_template: str = "{query}",
        stop_strings: Sequence[str] = (),
        eos_after: str | None = None,
    ):
        super().__init__(
            name,
            tokenizer,
            sampling,
            chat_template,
            prompt_template,
            stop_strings,
            getattr(model, "generation_config", None),
        )
        self.eos_after = re.compile(eos_after) if eos_after else None
        self.max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.model = (
            model  # this candidate's own model (its weights become views of a fused stack when fused)
        )
        self.lm: CachedLM | CandidateView = CachedLM(model, pad_token_id=self.pad_token_id)
        self.fused: FusedCandidates | None = None  # set when this candidate joins a fused engine

    @classmethod
    def from_pretrained(
        cls, name: str, path: str, dtype: str = "auto", device: str = "cpu", **kwargs
    ) -> TransformersBackend:
        tokenizer = load_tokenizer(path)
        return cls(name, load_causal_lm(path, dtype, device), tokenizer, **kwargs)

    def write_patches(
        self, traces: Sequence[Trace], author: int, patch_tokens: int, seed: int
    ) -> list[Patch]:
        if not traces:
            self._patch_limits(traces, patch_tokens)
            return []
        start = time.perf_counter()
        request = self._request(traces, patch_tokens, seed)
        results = self.lm.generate(
            request.keys,
            request.new_ids,
            request.limits,
            self.sampling,
            request.generators,
            stop_ids=self.stop_ids,
            should_stop=StopScan.of(request.stops),
            may_stop=request.may_stop,
        )
        seconds = (time.perf_counter() - start) / len(traces)
        return self._patches(traces, author, results, seconds)

    def _request(self, traces: Sequence[Trace], patch_tokens: int, seed: int) -> _PatchRequest:
        """What :meth:`CachedLM.generate` needs to write the next patch of each of ``traces``."""
        limits = self._patch_limits(traces, patch_tokens)
        prompt_lens, views = zip(*(self._view(t) for t in traces))
        new = [v[self.lm.cached_length(t.key) :] for v, t in zip(views, traces)]
        gens = (
            None
            if self.sampling.greedy
            else [generator(seed, t.key, len(t.patches), self.name) for t in traces]
        )
        may_stop = None
        if self.eos_after is not None:
            allowed = [self.eos_after.search(t.text) is not None for t in traces]

            def may_stop(row: int, toks: list[int]) -> bool:
                if not allowed[row]:
                    context = self._context(prompt_lens[row], views[row])
                    text = traces[row].text + self._continuation_text(context, toks, final=True)
                    allowed[row] = self.eos_after.search(text) is not None
                return allowed[row]

        stops = [self.row_stops(t) for t in traces]
        return _PatchRequest([t.key for t in traces], new, limits, gens, stops, may_stop)

    def prefill(self, traces: Sequence[Trace]) -> None:
        """Read each trace up to its last token (the next call feeds that one), e.g. once before forking it."""
        keys, chunks = self._unread(traces)
        if keys:
            self.lm.extend(keys, chunks)

    def _unread(self, traces: Sequence[Trace]) -> tuple[list[str], list[list[int]]]:
        """Keys and tokens of the traces this candidate has not read up to their last token."""
        keys, chunks = [], []
        for t in traces:
            view, have = self.view(t), self.lm.cached_length(t.key)
            if have < len(view) - 1:
                keys.append(t.key)
                chunks.append(view[have : len(view) - 1])
        return keys, chunks

    def _patches(
        self, traces: Sequence[Trace], author: int, results: Sequence[Generation], seconds: float
    ) -> list[Patch]:
        return [
            self.patch_from_ids(t, author, res.token_ids, res.stop_reason, seconds)
            for t, res in zip(traces, results)
        ]

    def fork(self, src_key: str, dst_keys: Sequence[str]) -> None:
        self.lm.fork(src_key, dst_keys)
        super().fork(src_key, dst_keys)

    def release(self, keys: Sequence[str]) -> None:
        self.lm.release(keys)
        super().release(keys)


class CandidateView:
    """Candidate ``index`` of a :class:`FusedCachedLM`, with the interface of a plain :class:`CachedLM`."""

    def __init__(self, lm: FusedCachedLM, index: int):
        self.fused, self.index = lm, index

    @property
    def model(self) -> FusedModel:
        return self.fused.model

    @property
    def device(self) -> torch.device:
        return self.fused.device

    def __len__(self) -> int:
        return sum(1 for candidate, _ in self.fused.keys() if candidate == self.index)

    def cached_length(self, key: str) -> int:
        return self.fused.cached_length((self.index, key))

    def fork(self, src_key: str, dst_keys: Sequence[str]) -> None:
        self.fused.fork((self.index, src_key), [(self.index, k) for k in dst_keys])

    def release(self, keys: Sequence[str]) -> None:
        self.fused.release([(self.index, k) for k in keys])

    def extend(self, keys: Sequence[str], new_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.fused.extend([(self.index, k) for k in keys], new_ids)

    def generate(
        self,
        keys: Sequence[str],
        new_ids: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        sampling: CandidateSampling,
        generators: Sequence[torch.Generator] | None = None,
        **kwargs: Any,
    ) -> list[Generation]:
        return self.fused.generate(
            [(self.index, k) for k in keys], new_ids, max_new_tokens, sampling, generators, **kwargs
        )


class FusedCandidates:
    """Transformers candidates of one architecture that write their patches in one forward per token.

    The candidates' models are fused into one :class:`~switchrl.backends.fused.FusedModel` (weights
    stacked, nothing copied) and each backend's ``lm`` becomes its view of the shared
    :class:`~switchrl.backends.fused.FusedCachedLM`, so a backend used on its own behaves as before,
    while :meth:`write_groups` lets several candidates write their rows of one step together.
    Members may differ in sampling and stop ids (each row samples and stops as its member does alone)
    and in vocabulary size (each reads its own ids; the fused model masks the ids a member lacks).
    """

    def __init__(self, backends: Sequence[TransformersBackend]):
        for b in backends:
            if b.fused is not None or not isinstance(b.lm, CachedLM):
                raise NotFusable(f"candidate {b.name!r} is already fused")
            if len(b.lm):
                raise NotFusable(f"candidate {b.name!r} holds live traces")
        # the pad id only fills masked positions (the fused tables have a row for every member's ids)
        pad = min(b.pad_token_id for b in backends)
        self.lm = FusedCachedLM(fuse_models([b.model for b in backends]), pad_token_id=pad)
        self.members = list(backends)
        for i, b in enumerate(backends):
            b.lm, b.fused = CandidateView(self.lm, i), self

    def prefill(self, traces: Sequence[Trace]) -> None:
        """:meth:`TransformersBackend.prefill` for every member, in one forward pass."""
        keys, chunks = [], []
        for i, b in enumerate(self.members):
            member_keys, member_chunks = b._unread(traces)
            keys += [(i, key) for key in member_keys]
            chunks += member_chunks
        if keys:
            self.lm.extend(keys, chunks)

    def write_groups(self, groups: Sequence[Group], patch_tokens: int, seed: int) -> list[list[Patch]]:
        """Each member's patches for its group's traces (:class:`CandidateEngine`): one generate call."""
        start = time.perf_counter()
        requests = [self.members[g.member]._request(g.traces, patch_tokens, seed) for g in groups]
        owner = [(j, r) for j, req in enumerate(requests) for r in range(len(req.keys))]

        def merged(fns: list[RowCallback | None]) -> RowCallback | None:
            if all(fn is None for fn in fns):
                return None

            def callback(row: int, toks: list[int]) -> bool:
                j, r = owner[row]
                return True if fns[j] is None else fns[j](r, toks)

            return callback

        member = [self.members[g.member] for g, req in zip(groups, requests) for _ in req.keys]
        results = self.lm.generate(
            [(g.member, key) for g, req in zip(groups, requests) for key in req.keys],
            [ids for req in requests for ids in req.new_ids],
            [n for req in requests for n in req.limits],
            [m.sampling for m in member],
            [gen for req in requests for gen in (req.generators or [None] * len(req.keys))],
            stop_ids=[m.stop_ids for m in member],
            should_stop=StopScan.of([s for req in requests for s in req.stops]),
            may_stop=merged([req.may_stop for req in requests]),
        )
        seconds = (time.perf_counter() - start) / max(1, len(results))
        out, at = [], 0
        for g, req in zip(groups, requests):
            member = self.members[g.member]
            out.append(member._patches(g.traces, g.author, results[at : at + len(req.keys)], seconds))
            at += len(req.keys)
        return out


def _fusion_key(b: TransformersBackend) -> str:
    """Equal for candidates that can share an engine: their vocabularies may differ (see
    :mod:`~switchrl.backends.fusable`), and so may their sampling and stop ids (set per row)."""
    return architecture_signature(b.model)


def fuse_backends(backends: Sequence[object]) -> list[FusedCandidates]:
    """Fuse the transformers candidates among ``backends`` that share an architecture; returns the new groups.

    Candidates that cannot be fused (another architecture, a layer type :func:`fuse_models` does not
    know, live traces) keep their own model; the reason is logged.
    """
    groups: dict[str, list[TransformersBackend]] = {}
    for b in backends:
        if isinstance(b, TransformersBackend) and b.fused is None and isinstance(b.lm, CachedLM):
            groups.setdefault(_fusion_key(b), []).append(b)
    fused = []
    for members in groups.values():
        if len(members) < 2:
            continue
        try:
            fused.append(FusedCandidates(members))
        except NotFusable as err:
            logger.info("candidates %s run one forward pass each: %s", [b.name for b in members], err)
    return fused

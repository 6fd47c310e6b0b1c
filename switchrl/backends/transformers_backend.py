"""A candidate served in-process by Hugging Face transformers, with per-trace KV-cache reuse."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from switchrl.backends.base import CandidateSampling, Patch, StopReason, Trace
from switchrl.backends.cached_lm import CachedLM, Generation
from switchrl.backends.fused import (
    CandidateView,
    FusedCachedLM,
    NotFusable,
    architecture_signature,
    fuse_models,
)
from switchrl.errors import CheckpointError
from switchrl.utils.seeding import derive_seed, generator

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DETOK_WINDOW = 16  # tokens of left context used to detokenize a patch (keeps word boundaries)
logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[dtype]


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Equal for tokenizers that map text to the same ids (then candidates exchange ids, not text)."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.blake2b(repr(items).encode(), digest_size=8).hexdigest()


def eos_ids(tokenizer: PreTrainedTokenizerBase, generation_config: object | None = None) -> frozenset[int]:
    """Every id that ends a response for this checkpoint: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return frozenset(ids)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_checkpoint(path: str) -> None:
    """A local directory, or a Hugging Face Hub id (``org/name``, resolved from the hub cache)."""
    if not Path(path).exists() and not _HUB_ID.match(path):
        raise CheckpointError(f"checkpoint path does not exist: {path}")


def _load(what: str, loader, path: str, **kwargs):
    check_checkpoint(path)
    try:
        return loader(path, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the path named
        where = (
            ""
            if Path(path).exists()
            else " (not a local directory; as a hub id it needs the hub cache or network)"
        )
        raise CheckpointError(f"cannot load {what} from {path}{where}: {err}") from err


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    return _load("a tokenizer", AutoTokenizer.from_pretrained, path)


def load_causal_lm(path: str, dtype: str = "auto", device: str = "cpu") -> torch.nn.Module:
    device = resolve_device(device)
    model = _load(
        "a causal LM", AutoModelForCausalLM.from_pretrained, path, dtype=resolve_dtype(dtype, device)
    )
    return model.to(device).eval()


class TokenizedCandidate:
    """What every candidate backend shares: its prompt, its token view of each trace, and patch texts.

    Subclasses write tokens (in-process, through vLLM or through a server); this class turns a trace
    into the ids the candidate reads and the ids it wrote into a :class:`Patch`.
    """

    def __init__(
        self,
        name: str,
        tokenizer: PreTrainedTokenizerBase,
        sampling: CandidateSampling | None = None,
        chat_template: bool = False,
        prompt_template: str = "{query}",
        stop_strings: Sequence[str] = (),
        generation_config: object | None = None,
    ):
        if "{query}" not in prompt_template:
            raise ValueError(
                f"candidate {name!r}: prompt_template must contain '{{query}}', got {prompt_template!r}"
            )
        self.name = name
        self.tokenizer = tokenizer
        self.sampling = sampling or CandidateSampling()
        self.chat_template = chat_template
        self.prompt_template = prompt_template
        self.stop_strings = tuple(stop_strings)
        self.stop_ids = eos_ids(tokenizer, generation_config)
        if not self.stop_ids:
            raise CheckpointError(
                f"candidate {name!r}: its tokenizer defines no EOS token (eos_token is None), so a "
                "response could never end; set tokenizer.eos_token or generation_config.eos_token_id"
            )
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise CheckpointError(
                f"candidate {name!r}: chat_template=true but the tokenizer has no chat template"
            )
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        )
        self.vocab = vocab_fingerprint(tokenizer)
        self._views: dict[str, tuple[int, int, list[int]]] = {}  # key -> (patches covered, prompt len, ids)

    # ------------------------------------------------------------------ token views
    def prompt_ids(self, query: str) -> list[int]:
        """The tokens this candidate reads before the response: its prompt for ``query``."""
        if self.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": query}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        ids = self.tokenizer(self.prompt_template.format(query=query), add_special_tokens=True)["input_ids"]
        return list(ids) or [self.pad_token_id]

    def patch_ids(self, patch: Patch) -> list[int]:
        """``patch`` in this candidate's tokens: the ids themselves when the vocab matches, else re-tokenized text."""
        if patch.vocab == self.vocab:
            return list(patch.token_ids)
        return self.tokenizer(patch.text, add_special_tokens=False)["input_ids"]

    def view(self, trace: Trace) -> list[int]:
        """Everything this candidate reads for ``trace``: prompt + every patch, in its own tokens."""
        return self._view(trace)[1]

    def _view(self, trace: Trace) -> tuple[int, list[int]]:
        """(prompt length, view ids) of ``trace``, extended incrementally from the last call."""
        covered, prompt_len, ids = self._views.get(trace.key, (0, 0, None))
        if ids is not None and covered == len(trace.patches):
            return prompt_len, ids
        if ids is None:
            ids = self.prompt_ids(trace.query)
            prompt_len = len(ids)
        ids = list(ids)  # forks share the stored list: extend a copy
        for patch in trace.patches[covered:]:
            ids.extend(self.patch_ids(patch))
        self._views[trace.key] = (len(trace.patches), prompt_len, ids)
        return prompt_len, ids

    def patch_from_ids(
        self,
        trace: Trace,
        author: int,
        token_ids: Sequence[int],
        stop_reason: StopReason | None = None,
        seconds: float = 0.0,
    ) -> Patch:
        """The :class:`Patch` that ``token_ids`` (this candidate's tokens) adds to ``trace``, with its text."""
        prompt_len, view = self._view(trace)
        context = view[max(prompt_len, len(view) - _DETOK_WINDOW) :]
        return Patch(
            author=author,
            token_ids=list(token_ids),
            text=self._continuation_text(context, token_ids),
            stop_reason=stop_reason,
            vocab=self.vocab,
            seconds=seconds,
        )

    def _continuation_text(self, context: Sequence[int], new: Sequence[int]) -> str:
        """The text ``new`` adds after ``context`` (decoding in context keeps spaces between words)."""
        before = self.tokenizer.decode(list(context), skip_special_tokens=True)
        return self.tokenizer.decode([*context, *new], skip_special_tokens=True)[len(before) :]

    def _finished(
        self, token_ids: Sequence[int], finish_reason: str | None, stop_reason: object = None
    ) -> tuple[list[int], StopReason | None]:
        """Written ids without a trailing EOS, and why the patch ended, from an engine's finish report.

        Engines report ``finish_reason`` "stop" for both EOS and stop strings; ``stop_reason`` is the
        matched stop string (vLLM) or None for EOS. "length" (the token limit) ends only the patch.
        """
        ids = [int(i) for i in token_ids]
        reason: StopReason | None = None
        if finish_reason == "stop":
            reason = "stop" if isinstance(stop_reason, str) and stop_reason in self.stop_strings else "eos"
        while ids and ids[-1] in self.stop_ids:
            ids.pop()
            reason = "eos"
        return ids, reason

    def _patch_seed(self, seed: int, trace: Trace) -> int:
        """The 31-bit engine seed of ``trace``'s next patch: from (seed, trace key, patch index, candidate)."""
        return derive_seed(seed, trace.key, len(trace.patches), self.name) % 2**31

    def _patch_limits(self, traces: Sequence[Trace], patch_tokens: int) -> list[int]:
        if patch_tokens <= 0:
            raise ValueError(f"patch_tokens must be > 0, got {patch_tokens}")
        return [min(patch_tokens, t.remaining_tokens) for t in traces]

    def prefill(self, traces: Sequence[Trace]) -> None:
        """Nothing to do: engines behind this class cache prefixes themselves (vLLM / server prefix caching)."""

    def fork(self, src_key: str, dst_keys: Sequence[str]) -> None:
        view = self._views.get(src_key)
        for key in dst_keys:
            if view is None:
                self._views.pop(key, None)
            else:
                self._views[key] = view

    def release(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._views.pop(key, None)


RowCallback = Callable[[int, list[int]], bool]


@dataclass
class _PatchRequest:
    """One candidate's share of a generate call: its rows, their new tokens, limits and callbacks."""

    keys: list[str]
    new_ids: list[list[int]]
    limits: list[int]
    generators: list[torch.Generator] | None
    should_stop: RowCallback | None
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
            should_stop=request.should_stop,
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
        should_stop = None
        if self.stop_strings:

            def should_stop(row: int, toks: list[int]) -> bool:
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                return any(s in text for s in self.stop_strings)

        may_stop = None
        if self.eos_after is not None:
            allowed = [self.eos_after.search(t.text) is not None for t in traces]

            def may_stop(row: int, toks: list[int]) -> bool:
                if not allowed[row]:
                    view = views[row]
                    context = view[max(prompt_lens[row], len(view) - _DETOK_WINDOW) :]
                    text = traces[row].text + self._continuation_text(context, toks)
                    allowed[row] = self.eos_after.search(text) is not None
                return allowed[row]

        return _PatchRequest([t.key for t in traces], new, limits, gens, should_stop, may_stop)

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


class FusedCandidates:
    """Transformers candidates of one architecture that write their patches in one forward per token.

    The candidates' models are fused into one :class:`~switchrl.backends.fused.FusedModel` (weights
    stacked, nothing copied) and each backend's ``lm`` becomes its view of the shared
    :class:`~switchrl.backends.fused.FusedCachedLM`, so a backend used on its own behaves as before,
    while :meth:`write_patches` lets several candidates write their rows of one step together.
    Members must agree on sampling, stop ids and padding (one generate call serves them all).
    """

    def __init__(self, backends: Sequence[TransformersBackend]):
        first = backends[0]
        for b in backends:
            if b.fused is not None or not isinstance(b.lm, CachedLM):
                raise NotFusable(f"candidate {b.name!r} is already fused")
            if len(b.lm):
                raise NotFusable(f"candidate {b.name!r} holds live traces")
            for what in ("vocab", "sampling", "stop_ids", "pad_token_id"):
                if getattr(b, what) != getattr(first, what):
                    raise NotFusable(f"candidates {first.name!r} and {b.name!r} differ in {what}")
        self.lm = FusedCachedLM(fuse_models([b.model for b in backends]), pad_token_id=first.pad_token_id)
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

    def write_patches(
        self, jobs: Sequence[tuple[TransformersBackend, Sequence[Trace], int]], patch_tokens: int, seed: int
    ) -> list[list[Patch]]:
        """For each ``(member, traces, author)`` job, the member's patches for ``traces``: one generate call."""
        start = time.perf_counter()
        requests = [b._request(traces, patch_tokens, seed) for b, traces, _ in jobs]
        index = {id(b): i for i, b in enumerate(self.members)}
        owner = [(j, r) for j, req in enumerate(requests) for r in range(len(req.keys))]

        def merged(fns: list[RowCallback | None], default: bool) -> RowCallback | None:
            if all(fn is None for fn in fns):
                return None

            def callback(row: int, toks: list[int]) -> bool:
                j, r = owner[row]
                return default if fns[j] is None else fns[j](r, toks)

            return callback

        first = self.members[0]
        results = self.lm.generate(
            [(index[id(b)], key) for (b, _, _), req in zip(jobs, requests) for key in req.keys],
            [ids for req in requests for ids in req.new_ids],
            [n for req in requests for n in req.limits],
            first.sampling,
            None if first.sampling.greedy else [g for req in requests for g in req.generators],
            stop_ids=first.stop_ids,
            should_stop=merged([req.should_stop for req in requests], False),
            may_stop=merged([req.may_stop for req in requests], True),
        )
        seconds = (time.perf_counter() - start) / max(1, len(results))
        out, at = [], 0
        for (b, traces, author), req in zip(jobs, requests):
            out.append(b._patches(traces, author, results[at : at + len(req.keys)], seconds))
            at += len(req.keys)
        return out


def _fusion_key(b: TransformersBackend) -> tuple:
    return (architecture_signature(b.model), b.vocab, b.sampling, b.stop_ids, b.pad_token_id)


def fuse_backends(backends: Sequence[object]) -> list[FusedCandidates]:
    """Fuse the transformers candidates among ``backends`` that share an architecture; returns the new groups.

    Candidates that cannot be fused (another architecture, a layer type :func:`fuse_models` does not
    know, live traces) keep their own model; the reason is logged.
    """
    groups: dict[tuple, list[TransformersBackend]] = {}
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

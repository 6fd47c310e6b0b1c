"""The tokenizer side that every candidate backend shares, whoever writes the tokens.

A candidate reads a trace as token ids in its own vocabulary: its prompt for the query, then every
patch (the ids themselves when the author shares its vocabulary, else the re-tokenized text). This
module holds that view (:class:`TokenizedCandidate`, the base of the transformers, vLLM and OpenAI
backends), how written ids become a :class:`~switchrl.backends.base.Patch` with its text, and how a
checkpoint's tokenizer, EOS ids and vocabulary fingerprint are read.

Checkpoints of one pipeline often share a vocabulary up to a few added tokens (Llama-3.1-8B: 128256
tokens; the Tulu-3 models add ``<pad>`` as id 128256). Their fingerprints differ, so the pool links
them once when it is built (:func:`link_vocabularies`): when every id both tokenizers define maps to
the same string, each reader records, for the author's fingerprint, the first id the two do not both
define (:func:`shared_id_limit`). A patch whose ids all lie below that limit is read as its ids;
any other patch (an id only the author knows) is re-tokenized from its text. Patches keep the
author's own fingerprint, so records of same-vocabulary pools are unchanged.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from switchrl.backends.base import CandidateSampling, Patch, StopReason, Trace
from switchrl.backends.stopping import RowStops, StopScan, complete, decode, find_stop, stop_prefix_length
from switchrl.errors import CheckpointError, PromptTooLongError
from switchrl.utils.seeding import derive_seed

_DETOK_WINDOW = 16  # tokens of left context used to detokenize a patch (keeps word boundaries)
_MAX_CHAR_TOKENS = 4  # a character spans at most 4 tokens (one per UTF-8 byte)


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Equal for tokenizers that map text to the same ids (then candidates exchange ids, not text)."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.blake2b(repr(items).encode(), digest_size=8).hexdigest()


def shared_id_limit(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> int | None:
    """The first id that ``a`` and ``b`` do not both define, when every id both define is the same
    token in each (ids below it then mean the same in both); None when some shared id differs."""
    strings = [{i: s for s, i in tok.get_vocab().items()} for tok in (a, b)]
    common = strings[0].keys() & strings[1].keys()
    if any(strings[0][i] != strings[1][i] for i in common):
        return None
    limit = 0
    while limit in common:
        limit += 1
    return limit


def link_vocabularies(candidates: Sequence[object]) -> None:
    """Let each :class:`TokenizedCandidate` read, as ids, the patches of the others whose vocabulary
    agrees with its own on the ids both define (see the module docstring); computed once per pair."""
    readers = [c for c in candidates if isinstance(c, TokenizedCandidate)]
    tokenizers = {c.vocab: c.tokenizer for c in readers}
    limits: dict[frozenset[str], int | None] = {}
    for reader in readers:
        for vocab, tokenizer in tokenizers.items():
            if vocab == reader.vocab:
                continue
            pair = frozenset((vocab, reader.vocab))
            if pair not in limits:
                limits[pair] = shared_id_limit(tokenizer, reader.tokenizer)
            if limits[pair]:
                reader.id_limits[vocab] = limits[pair]


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


def check_model_dir(path: str) -> None:
    """A checkpoint that holds a model: a hub id, or a local directory with a ``config.json``."""
    check_checkpoint(path)
    local = Path(path)
    if local.is_file():
        raise CheckpointError(f"checkpoint path {path} is a file; give the checkpoint's directory")
    if local.is_dir() and not (local / "config.json").is_file():
        raise CheckpointError(
            f"checkpoint directory {path} has no config.json, so it holds no saved model; point the path "
            "at a directory written by save_pretrained (config.json, weights, tokenizer files)"
        )


def load_from_checkpoint(what: str, loader: Callable[..., Any], path: str, **kwargs: Any) -> Any:
    """``loader(path, **kwargs)`` (e.g. ``AutoTokenizer.from_pretrained``), failing with a
    :class:`CheckpointError` that names ``what`` and ``path``."""
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
    return load_from_checkpoint("a tokenizer", AutoTokenizer.from_pretrained, path)


def single_bos(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[int]:
    """``ids`` with one BOS where they start with several: a chat template that writes ``{{ bos_token }}``,
    tokenised by a tokenizer that adds BOS itself (Llama-3's does), gives two."""
    bos, start = tokenizer.bos_token_id, 0
    while bos is not None and start + 1 < len(ids) and ids[start] == ids[start + 1] == bos:
        start += 1
    return list(ids[start:])


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
        # response tokens read before a patch when looking for stop strings: enough for a stop string
        # that starts in an earlier patch
        longest = max((len(x) for x in self.stop_strings), default=0)
        self._stop_window = max(_DETOK_WINDOW, _MAX_CHAR_TOKENS * longest)
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
        self.id_limits: dict[
            str, int
        ] = {}  # author vocab -> ids below this are read as ids (link_vocabularies)
        self.max_positions: int | None = None  # positions the candidate can read (set by each backend)
        self.truncate = "error"  # over-long prompts: "error" or "left" (generation.truncate, set by the pool)
        self._views: dict[str, tuple[int, int, list[int]]] = {}  # key -> (patches covered, prompt len, ids)

    # ------------------------------------------------------------------ token views
    def prompt_ids(self, query: str) -> list[int]:
        """The tokens this candidate reads before the response: its prompt for ``query`` (one BOS at most)."""
        if self.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": query}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return single_bos(self.tokenizer, ids)
        ids = self.tokenizer(self.prompt_template.format(query=query), add_special_tokens=True)["input_ids"]
        return single_bos(self.tokenizer, ids) or [self.pad_token_id]

    def fit_prompt(self, trace: Trace, ids: list[int]) -> list[int]:
        """``ids`` (the prompt of ``trace``) if it and the token budget fit :attr:`max_positions`; else
        its last tokens with ``truncate="left"``, or a :class:`PromptTooLongError` naming trace and limit.

        Checked once per trace, where its prompt is tokenised; the same rule for every backend."""
        limit, budget = self.max_positions, trace.max_new_tokens
        if limit is None or len(ids) + budget <= limit:
            return ids
        keep = limit - budget
        if self.truncate == "left" and keep > 0:
            return ids[-keep:]
        fix = (
            f"lower generation.max_new_tokens below {limit}"
            if keep <= 0
            else "shorten the query, lower generation.max_new_tokens, or set 'generation: {truncate: left}' "
            f"to keep the prompt's last {keep} tokens"
        )
        raise PromptTooLongError(
            f"trace {trace.key!r}: candidate {self.name!r} would read a {len(ids)}-token prompt plus "
            f"max_new_tokens={budget} = {len(ids) + budget} positions, over its limit of {limit}; {fix}"
        )

    def patch_ids(self, patch: Patch) -> list[int]:
        """``patch`` in this candidate's tokens: the ids themselves when the vocab matches, or when it
        agrees with the author's on the ids both define and the patch uses only those; else its text re-tokenized."""
        if patch.vocab == self.vocab:
            return list(patch.token_ids)
        limit = self.id_limits.get(patch.vocab)
        if limit is not None and all(0 <= i < limit for i in patch.token_ids):
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
            ids = self.fit_prompt(trace, self.prompt_ids(trace.query))
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
        """The :class:`Patch` that ``token_ids`` (this candidate's tokens) adds to ``trace``, with its text.

        The text is what the ids add to the response's text: the patches' texts of a response written
        in one vocabulary join to the decode of all its ids. A character whose bytes continue in the
        next patch is left to that patch's text (unless this patch ends the response), and so is a
        trailing start of a stop string (the scorer never reads part of one); a patch that ended on a
        stop string ends its text where the stop string starts (its ids keep its tokens).
        """
        prompt_len, view = self._view(trace)
        final = stop_reason is not None or trace.num_tokens + len(token_ids) >= trace.max_new_tokens
        written = trace.text
        whole = self._continuation_text((), [*view[prompt_len:], *token_ids], final)
        if whole.startswith(written):
            text = whole[len(written) :]
        else:  # earlier patches were re-tokenised from another vocabulary: continue from their tokens here
            text = self._continuation_text(self._context(prompt_len, view), token_ids, final)
        if stop_reason == "stop":
            tail = written[-max(len(x) for x in self.stop_strings) :] if self.stop_strings else ""
            found = find_stop(tail + text, self.stop_strings, len(tail))
            text = text[: max(0, found[0] - len(tail))] if found else text
        elif not final:  # a stop string may be under way: its start waits for the next patch's text
            text = text[: len(text) - stop_prefix_length(written + text, self.stop_strings, len(text))]
        return Patch(
            author=author,
            token_ids=list(token_ids),
            text=text,
            stop_reason=stop_reason,
            vocab=self.vocab,
            seconds=seconds,
        )

    @staticmethod
    def _context(prompt_len: int, view: Sequence[int], window: int = _DETOK_WINDOW) -> Sequence[int]:
        """The last tokens of the response so far (at most ``window``), decoded before new ones."""
        return view[max(prompt_len, len(view) - window) :]

    def _continuation_text(self, context: Sequence[int], new: Sequence[int], final: bool) -> str:
        """The text ``new`` adds after ``context`` (decoding in context keeps spaces between words and
        completes a character split between them); unless ``final``, without a trailing incomplete character."""
        before = complete(decode(self.tokenizer, context))
        after = decode(self.tokenizer, [*context, *new])
        return (after if final else complete(after))[len(before) :]

    def row_stops(self, trace: Trace) -> RowStops | None:
        """What a :class:`StopScan` needs to stop ``trace``'s next patch at this candidate's stop strings."""
        if not self.stop_strings:
            return None
        prompt_len, view = self._view(trace)
        return RowStops(
            self.tokenizer, self.stop_strings, list(self._context(prompt_len, view, self._stop_window))
        )

    def _cut_at_stop(
        self, trace: Trace, token_ids: list[int], reason: StopReason | None
    ) -> tuple[list[int], StopReason | None]:
        """An engine's patch ended at the first stop string in the response's text, as the in-process
        candidates end it: engines look only at the text of this patch, not one begun in an earlier patch."""
        scan = StopScan.of([self.row_stops(trace)])
        stop = scan.scan([token_ids]).get(0) if scan is not None else None
        return (token_ids, reason) if stop is None else (token_ids[:stop], "stop")

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

"""The switcher's single token sequence, shared by inference, SFT and RL.

``switchrl`` format (default)::

    [instruction + query + candidate list] <c_k> patch by c_k <c_j> patch by c_j ...

A decision is the token after the prompt or after a patch, restricted to the label tokens. In an
episode the label tokens are the policy's actions and the patch tokens the environment's
(``action_mask`` marks the labels). The prompt is a prefix of every later context, so an LM switcher
reads each new patch once (KV cache).

``reference`` format: the prompt of the released PFA switchers (Feng et al., 2025,
github.com/BunsenFeng/switch_generation): the query, each past segment wrapped as
``<model i begins> ... <model i ends>``, then "Which model should generate the next segment? Please
respond with a number from 0 to n-1. The answer is model ", as the user turn of the chat template;
the decision reads the digit tokens' logits at the first assistant position. The context is rebuilt
for every decision (the question follows the segments), so nothing is cached across decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from switchrl.backends.base import Patch
from switchrl.backends.stopping import decode, splits_character
from switchrl.backends.tokens import single_bos, vocab_fingerprint
from switchrl.errors import ConfigError

PromptFormat = Literal["switchrl", "reference"]
PROMPT_FORMATS: tuple[str, ...] = ("switchrl", "reference")

DEFAULT_INSTRUCTION = (
    "Several models take turns writing a response to the query, one patch at a time. "
    "Before each patch, choose the model that writes it."
)


def default_label_tokens(n_candidates: int) -> list[str]:
    """``["<c0>", "<c1>", ...]``."""
    return [f"<c{i}>" for i in range(n_candidates)]


@dataclass
class EncodedSequence:
    """A switcher sequence: ``input_ids``, ``action_mask`` (1 on label tokens), and per label its
    position in ``input_ids`` and its action (candidate index). ``prompt_length`` counts the prompt tokens."""

    input_ids: list[int]
    action_mask: list[int]
    label_positions: list[int]
    actions: list[int]
    prompt_length: int


class SwitchSequence:
    """Builds the switcher's token ids for (query, candidate names, patches).

    Args:
        tokenizer: the switcher's tokenizer; label tokens must already be single tokens of it
            (:class:`~switchrl.policies.LMSwitcher` adds them when missing).
        candidate_names: the candidates, in action order.
        label_tokens: one token per candidate (default ``<c0>``, ``<c1>``, ...); the ``reference``
            format always uses the digits ``0`` ... ``n-1``.
        prompt_format: ``"switchrl"`` or ``"reference"``.
        instruction: the ``switchrl`` format's instruction line.
        chat_template: ``switchrl`` format: wrap the prompt as the user turn of the tokenizer's chat
            template (the ``reference`` format always does).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        candidate_names: Sequence[str],
        label_tokens: Sequence[str] | None = None,
        prompt_format: PromptFormat = "switchrl",
        instruction: str | None = None,
        chat_template: bool = False,
    ):
        names = list(candidate_names)
        if not names or any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"candidate_names: expected unique non-empty names, got {names}")
        if prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        if prompt_format == "reference":
            if len(names) > 10:
                raise ConfigError(
                    "prompt_format 'reference' reads one digit, so at most 10 candidates are allowed"
                )
            if label_tokens is not None and list(label_tokens) != [str(i) for i in range(len(names))]:
                raise ConfigError("label_tokens: the 'reference' format uses the digits 0..n-1")
            label_tokens = [str(i) for i in range(len(names))]
        label_tokens = list(label_tokens) if label_tokens is not None else default_label_tokens(len(names))
        if len(label_tokens) != len(names) or len(set(label_tokens)) != len(label_tokens):
            raise ConfigError(f"label_tokens: expected {len(names)} distinct tokens, got {label_tokens}")
        if (chat_template or prompt_format == "reference") and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "the switcher's tokenizer has no chat template (needed by chat_template=True "
                "and by prompt_format='reference')"
            )
        self.tokenizer = tokenizer
        self.candidate_names = names
        self.label_tokens = label_tokens
        self.prompt_format: PromptFormat = prompt_format
        self.instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        self.chat_template = chat_template
        self.label_ids = [self._single_token_id(t) for t in label_tokens]
        self.vocab = vocab_fingerprint(tokenizer)

    def _single_token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ConfigError(
                f"label token {token!r} is not a single token of the switcher's tokenizer "
                f"(it encodes to {ids}); add it as a special token"
            )
        return int(ids[0])

    @property
    def n_candidates(self) -> int:
        return len(self.candidate_names)

    @property
    def incremental(self) -> bool:
        """True when every decision context extends the previous one (the ``switchrl`` format)."""
        return self.prompt_format == "switchrl"

    # ------------------------------------------------------------------ pieces
    def prompt_text(self, query: str) -> str:
        """The ``switchrl`` format's prompt before any patch (before the chat template)."""
        models = "\n".join(f"{label} {name}" for label, name in zip(self.label_tokens, self.candidate_names))
        return f"{self.instruction}\n\nQuery:\n{query}\n\nModels:\n{models}\n\nResponse:\n"

    def _encode_user_turn(self, text: str) -> list[int]:
        if self.prompt_format == "reference":
            # exactly the reference: the chat template as text, then tokenized with its default special tokens
            templated = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return single_bos(self.tokenizer, self.tokenizer(templated)["input_ids"])
        if self.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            return single_bos(self.tokenizer, ids["input_ids"] if hasattr(ids, "keys") else ids)
        return single_bos(self.tokenizer, self.tokenizer(text)["input_ids"])

    def prompt_ids(self, query: str) -> list[int]:
        """The ``switchrl`` prompt's ids (the start of every sequence)."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty string")
        if self.prompt_format == "reference":
            return self.context_ids(query, [])
        return self._encode_user_turn(self.prompt_text(query))

    def patch_ids(self, patch: Patch) -> list[int]:
        """``patch`` in the switcher's tokens, holding exactly its text (what the scorer reads): its own ids
        when the vocab matches and they hold just that text, else its text re-tokenized.

        Ids hold more than the text when the patch shares a character's bytes with a neighbour patch
        (the text keeps whole characters), ended on a stop string (the text stops before it) or ends
        with the start of one (that waits for the next patch's text).
        """
        if patch.vocab == self.vocab and patch.stop_reason != "stop":
            own = decode(self.tokenizer, patch.token_ids)
            if not splits_character(own) and own.strip() == patch.text.strip():
                return list(patch.token_ids)
        return list(self.tokenizer(patch.text, add_special_tokens=False)["input_ids"])

    def segment_ids(self, patch: Patch) -> list[int]:
        """``<c_author> patch``: what the ``switchrl`` sequence gains with one patch."""
        return [self.label_ids[self._author(patch)], *self.patch_ids(patch)]

    def reference_prompt(self, query: str, patches: Sequence[Patch]) -> str:
        """The reference's selector prompt text (before the chat template)."""
        text = query
        for p in patches:
            i = self._author(p)
            text += f" <model {i} begins> {p.text} <model {i} ends>"
        return (
            text + " Which model should generate the next segment? Please respond with a number from 0 to "
            f"{self.n_candidates - 1}. The answer is model "
        )

    def context_ids(self, query: str, patches: Sequence[Patch]) -> list[int]:
        """Everything the switcher reads before choosing the author of the next patch."""
        if self.prompt_format == "reference":
            if not isinstance(query, str) or not query.strip():
                raise ValueError("query must be a non-empty string")
            return self._encode_user_turn(self.reference_prompt(query, patches))
        ids = self.prompt_ids(query)
        for p in patches:
            ids.extend(self.segment_ids(p))
        return ids

    # ------------------------------------------------------------------ training sequences
    def encode(self, query: str, patches: Sequence[Patch], next_action: int | None = None) -> EncodedSequence:
        """The full sequence with its label positions.

        ``switchrl`` format: prompt, then ``<c_author> patch`` per patch (every label is an action), then
        ``<c_next_action>`` if given: an episode for RL, or (prefix -> label) for SFT with the last label
        as target. ``reference`` format: the context for the next decision plus the ``next_action`` digit
        (its only action; earlier choices are not tokens of this sequence).
        """
        if next_action is not None and not 0 <= next_action < self.n_candidates:
            raise ValueError(f"next_action must be in 0..{self.n_candidates - 1}, got {next_action}")
        if self.prompt_format == "reference":
            ids = self.context_ids(query, patches)
            prompt_len, positions, actions = len(ids), [], []
        else:
            ids = self.prompt_ids(query)
            prompt_len, positions, actions = len(ids), [], []
            for p in patches:
                positions.append(len(ids))
                actions.append(self._author(p))
                ids.extend(self.segment_ids(p))
        if next_action is not None:
            positions.append(len(ids))
            actions.append(next_action)
            ids.append(self.label_ids[next_action])
        mask = [0] * len(ids)
        for pos in positions:
            mask[pos] = 1
        return EncodedSequence(ids, mask, positions, actions, prompt_len)

    def _author(self, patch: Patch) -> int:
        if not 0 <= patch.author < self.n_candidates:
            raise ValueError(
                f"patch author {patch.author} is outside the candidates 0..{self.n_candidates - 1}"
            )
        return patch.author

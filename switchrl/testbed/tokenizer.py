"""The testbed's word-level tokenizer: every word of the world is one token, numbers included."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from switchrl.testbed.corpus import template_words
from switchrl.testbed.world import ATTRIBUTES, MAX_VALUE, World

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
LABEL_TOKENS = tuple(f"<c{i}>" for i in range(8))
"""Spare tokens an LM switcher built on these checkpoints can use as candidate labels."""


def vocabulary(world: World) -> list[str]:
    """Specials, label tokens, then every word of ``world`` (fixed words, numbers 0..2*max, towns)."""
    words = sorted(template_words() | set(ATTRIBUTES))
    numbers = [str(i) for i in range(0, 2 * MAX_VALUE + 1)]
    return [*SPECIAL_TOKENS, *LABEL_TOKENS, *words, *numbers, *world.towns]


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` that splits on whitespace and prepends ``<bos>``."""
    vocab = {w: i for i, w in enumerate(vocabulary(world))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(LABEL_TOKENS),
        padding_side="left",
    )

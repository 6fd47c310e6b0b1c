"""Patch text is derived from ids: no character is lost at a patch boundary, and the switcher reads
exactly the response's text (issue 17, fix 3)."""

from __future__ import annotations

import itertools

import pytest
from llama3_like import llama3_tokenizer

from switchrl.backends import Trace
from switchrl.backends.tokens import TokenizedCandidate
from switchrl.policies.sequence import SwitchSequence

RESPONSE = "It costs 12 €, né 日本語 🙂 café."


@pytest.fixture(scope="module")
def tokenizer():
    return llama3_tokenizer()


def _write(candidates, ids, cuts, max_new_tokens=64, authors=None) -> Trace:
    """A trace whose response ``ids`` are written in patches ending at ``cuts``, the last one ending it."""
    trace = Trace(f"t{cuts}{authors}", "what does it cost?", max_new_tokens=max_new_tokens)
    bounds = [0, *cuts, len(ids)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        author = authors[i] if authors else 0
        last = b == len(ids)
        trace.patches.append(
            candidates[author].patch_from_ids(trace, author, ids[a:b], "eos" if last else None)
        )
    return trace


def test_every_cut_point_keeps_every_character(tokenizer):
    candidate = TokenizedCandidate("c0", tokenizer)
    ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    whole = tokenizer.decode(ids)
    assert whole == RESPONSE
    split = [c for c in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:c])]
    assert len(split) >= 6  # the fixture does cut characters ("€" is 3 bytes in 2 tokens, ...)
    for cut in range(1, len(ids)):
        trace = _write([candidate], ids, [cut])
        assert trace.text == whole, cut
        assert "\ufffd" not in "".join(p.text for p in trace.patches)
    for cuts in itertools.combinations(split, 2):  # two boundaries, each inside a character
        assert _write([candidate], ids, list(cuts)).text == whole


def test_a_budget_end_inside_a_character_keeps_its_bytes(tokenizer):
    candidate = TokenizedCandidate("c0", tokenizer)
    ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    cut = next(c for c in range(1, len(ids)) if tokenizer.decode(ids[:c]).endswith("\ufffd"))
    trace = Trace("t", "q", max_new_tokens=cut)
    trace.patches.append(candidate.patch_from_ids(trace, 0, ids[:cut]))
    assert trace.done and trace.text == tokenizer.decode(ids[:cut])  # the response ends: nothing is held back


@pytest.mark.parametrize("same_vocab", [True, False], ids=["ids", "text"])
def test_the_switcher_reads_exactly_the_response_text(tokenizer, same_vocab):
    switcher_tok = llama3_tokenizer()
    switcher_tok.add_special_tokens({"additional_special_tokens": ["<c0>", "<c1>"]})
    candidate = TokenizedCandidate("c0", switcher_tok if same_vocab else tokenizer)
    sequence = SwitchSequence(switcher_tok, ["c0", "c1"])
    ids = candidate.tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    labels = set(sequence.label_ids)
    for cut in range(1, len(ids)):
        trace = _write([candidate, candidate], ids, [cut], authors=[0, 1])
        assert (trace.patches[0].vocab == sequence.vocab) == same_vocab
        read = []
        for p in trace.patches:
            segment = sequence.segment_ids(p)
            assert segment[0] in labels and labels.isdisjoint(segment[1:])
            assert switcher_tok.decode(segment[1:]) == p.text, cut  # each patch: exactly its text
            read.append(switcher_tok.decode(segment[1:]))
        assert "".join(read) == trace.text == RESPONSE

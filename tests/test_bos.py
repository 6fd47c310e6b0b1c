"""One BOS at the start of every prompt (issue 17, fix 4), with a tokenizer that adds BOS itself and a
chat template that writes ``{{ bos_token }}`` (as Llama-3's and Tulu-3's do)."""

from __future__ import annotations

import pytest
from llama3_like import llama3_tokenizer, tiny_llama

from switchrl.backends import Trace
from switchrl.backends.base import Patch
from switchrl.backends.tokens import TokenizedCandidate, single_bos
from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.policies.sequence import SwitchSequence

QUERY = "what is two plus two?"


@pytest.fixture(scope="module")
def tokenizer():
    tok = llama3_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<c0>", "<c1>"]})
    return tok


def _leading_bos(tokenizer, ids) -> int:
    n = 0
    while n < len(ids) and ids[n] == tokenizer.bos_token_id:
        n += 1
    return n


@pytest.mark.parametrize("chat_template", [True, False], ids=["chat", "prompt_template"])
def test_candidate_prompts_start_with_one_bos(tokenizer, chat_template):
    template = "Question: {query}\nAnswer:" if not chat_template else "{query}"
    candidate = TokenizedCandidate("c", tokenizer, chat_template=chat_template, prompt_template=template)
    ids = candidate.prompt_ids(QUERY)
    assert _leading_bos(tokenizer, ids) == 1 and ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize(
    "prompt_format, chat_template",
    [("switchrl", False), ("switchrl", True), ("reference", True)],
    ids=["plain", "chat", "reference"],
)
def test_switcher_sequences_start_with_one_bos(tokenizer, prompt_format, chat_template):
    sequence = SwitchSequence(tokenizer, ["a", "b"], prompt_format=prompt_format, chat_template=chat_template)
    patch = Patch(0, tokenizer("four", add_special_tokens=False)["input_ids"], "four", vocab=sequence.vocab)
    # what inference reads and what SFT / GRPO / PPO train on (encode builds their examples)
    for ids in (
        sequence.prompt_ids(QUERY),
        sequence.context_ids(QUERY, [patch]),
        sequence.encode(QUERY, [patch], next_action=1).input_ids,
    ):
        assert _leading_bos(tokenizer, ids) == 1 and ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("prompt_format", ["switchrl", "reference"])
def test_the_lm_switcher_reads_one_bos(tokenizer, prompt_format):
    switcher = LMSwitcher(
        tiny_llama(tokenizer), tokenizer, ["a", "b"], prompt_format=prompt_format, chat_template=True
    )
    trace = Trace("t", QUERY, max_new_tokens=8)
    ids = switcher.sequence.context_ids(trace.query, trace.patches)
    assert _leading_bos(tokenizer, ids) == 1
    assert switcher.label_logits([trace]).shape == (1, 2)


def test_single_bos_only_drops_repeats(tokenizer):
    bos = tokenizer.bos_token_id
    assert single_bos(tokenizer, [bos, bos, bos, 7]) == [bos, 7]
    assert single_bos(tokenizer, [7, bos, bos]) == [7, bos, bos]  # not at the start: text, left alone
    assert single_bos(tokenizer, [7]) == [7] and single_bos(tokenizer, [bos]) == [bos]

"""Packed reading (backends/packed.py): a batch's chunks of different lengths are read in ONE forward,
unpadded, and compute what the padded reading (length buckets, merged) computes."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from switchrl.backends.base import CandidateSampling
from switchrl.backends.cached_lm import CachedLM
from switchrl.backends.fused import FusedCachedLM, fuse_models
from tests.test_cached_lm_mask import SMALL, llama

GREEDY = CandidateSampling(temperature=0.0)
KEYS = ["a", "b", "c", "d", "e"]
PAST = {"a": list(range(4, 34)), "b": list(range(40, 45)), "e": list(range(3, 9))}  # "c", "d": no cache
CHUNKS = [[5], list(range(10, 30)), [6, 7, 8], list(range(50, 62)), [9]]  # 1, 20, 3, 12, 1 tokens


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def read(lm: CachedLM, packed: bool) -> tuple[list, torch.Tensor, int]:
    """Tokens written after reading ``CHUNKS`` on top of ``PAST``, the logits of one more read, and the
    number of forward passes the generate call's reading took."""
    lm._packable = packed
    for key, ids in PAST.items():
        lm.extend([key], [ids])
    forward, calls = lm._forward, []
    lm._forward = lambda rows, **kw: calls.append("logits_to_keep" in kw) or forward(rows, **kw)  # type: ignore[method-assign]
    out = lm.generate(KEYS, CHUNKS, [6, 4, 5, 3, 7], GREEDY)
    lm._forward = forward  # type: ignore[method-assign]
    logits = lm.extend(KEYS, [[g.token_ids[-1]] for g in out])
    return [(g.token_ids, g.stop_reason) for g in out], logits, sum(calls)


@pytest.mark.parametrize("model", [llama, gpt2])
def test_packed_reading_is_one_forward_and_equals_the_padded_reading(model) -> None:
    m = model().double()
    packed, padded = CachedLM(m), CachedLM(m)
    assert packed._packable  # a plain causal SDPA model that takes logits_to_keep
    got, got_logits, got_calls = read(packed, True)
    want, want_logits, want_calls = read(padded, False)
    assert got_calls == 1 and want_calls == 3  # the padded reading splits 1 / 3 / 12-20 tokens apart
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-10)
    assert [packed.cached_length(k) for k in KEYS] == [padded.cached_length(k) for k in KEYS]
    assert packed.model.config._attn_implementation == "sdpa"  # restored after each packed forward


def test_fused_reads_one_candidates_rows_packed_and_mixed_rows_padded() -> None:
    torch.manual_seed(1)  # candidate 1: other weights, 3 vocabulary rows more
    bigger = LlamaForCausalLM(
        LlamaConfig(**{**SMALL, "vocab_size": SMALL["vocab_size"] + 3}, num_key_value_heads=2)
    )
    models = [llama().double(), bigger.eval().double()]
    lm = FusedCachedLM(fuse_models(models))
    alone = [CachedLM(m) for m in models]
    assert lm._packs(lm._rows([(1, "x"), (1, "y")])) and not lm._packs(lm._rows([(0, "x"), (1, "y")]))
    keys, chunks = [(1, "x"), (1, "y")], [[5, 6, 7, 8, 9], [10]]
    logits = lm.extend(keys, chunks)
    assert logits.shape == (2, SMALL["vocab_size"] + 3)
    want = torch.cat([alone[1].extend([k], [ids]) for (_, k), ids in zip(keys, chunks)])
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-10)
    # candidate 0 has 3 vocabulary rows fewer: its packed rows never see those ids
    small = lm.extend([(0, "x"), (0, "y")], chunks)
    assert (
        torch.isinf(small[:, SMALL["vocab_size"] :]).all()
        and torch.isfinite(small[:, : SMALL["vocab_size"]]).all()
    )
    mixed = lm.extend([(0, "z"), (1, "z")], [[3, 4], [3, 4, 5]])
    torch.testing.assert_close(
        mixed[1], alone[1].extend(["z"], [[3, 4, 5]])[0], rtol=0, atol=1e-10
    )  # mixed candidates: the padded reading, as before


def test_packed_reading_is_for_cpu_models_only():
    """Packed reading was measured and tested on the CPU; a model elsewhere (here: no storage at all)
    keeps the padded chunks rather than an unmeasured path."""
    assert CachedLM(llama())._packable
    assert not CachedLM(llama().to("meta"))._packable

"""Fused candidates: one forward pass for rows of several same-architecture models, exactly as each model alone."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from switchrl.backends import CandidatePool, CandidateSampling, Trace
from switchrl.backends.fused import NotFusable, RowAssignment, fuse_models
from switchrl.backends.transformers_backend import TransformersBackend
from tests.conftest import make_word_tokenizer

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)
ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2)),
    "llama-tied": lambda: LlamaForCausalLM(
        LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    "qwen3": lambda: Qwen3ForCausalLM(
        Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=8)
    ),  # q/k norms on 4-D
    "gpt-neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL)),  # LayerNorm with bias, biased linears
}


def build(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch]().double().eval()
    for p in model.parameters():  # make every parameter differ between candidates (norms start at ones)
        p.data.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_forward_matches_each_model(arch):
    models = [build(arch, seed) for seed in range(3)]
    ids = torch.randint(0, 64, (6, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = [m(input_ids=ids).logits for m in models]
        first = [m(input_ids=ids[:, :1]).logits for m in models]
        fused = fuse_models(models)
        # uneven groups, a gap (candidate 1 absent), even groups, one candidate; with several tokens per
        # row (uneven groups: one matmul per candidate) and with one (one bmm over padded groups)
        for candidates in (
            [0, 1, 2, 1, 0, 0],
            [0, 0, 1, 2, 2, 2],
            [2, 0, 2, 0, 0, 2],
            [0, 1, 2, 2, 1, 0],
            [1, 1, 1, 1, 1, 1],
        ):
            rows = RowAssignment.of(candidates, "cpu")
            logits = fused(rows=rows, input_ids=ids).logits
            one = fused(rows=rows, input_ids=ids[:, :1]).logits
            for row, c in enumerate(candidates):
                torch.testing.assert_close(logits[row], ref[c][row])
                torch.testing.assert_close(one[row], first[c][row])
        # the originals still compute what they did, and their weights now live in the fused stacks
        torch.testing.assert_close(models[2](input_ids=ids).logits, ref[2])
    stacks = {p.untyped_storage().data_ptr() for p in fused.parameters()}
    assert all(p.untyped_storage().data_ptr() in stacks for m in models for p in m.parameters())
    if arch == "llama-tied":
        assert fused.template.lm_head.weight is fused.template.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gpt-neox"])
def test_fused_forward_pads_a_smaller_vocabulary_and_masks_its_missing_ids(arch):
    """A base with 64 rows fused with two models of 72 rows (Llama-3.1 vs Tulu-3): every row gets its own
    model's logits, and the base's rows get -inf for the 8 ids it lacks."""
    models = []
    for seed, rows in enumerate((64, 72, 72)):
        torch.manual_seed(seed)
        model = ARCHS[arch]()
        if rows != 64:
            model.resize_token_embeddings(rows)
        models.append(model.eval())
    ids = torch.randint(0, 64, (6, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = [m(input_ids=ids).logits for m in models]
        first = [m(input_ids=ids[:, :1]).logits for m in models]
        fused = fuse_models(models)
        for candidates in ([0, 1, 2, 1, 0, 0], [0, 0, 0, 0, 0, 0], [2, 1, 2, 1, 1, 2]):
            rows = RowAssignment.of(candidates, "cpu")
            for got, want in (
                (fused(rows=rows, input_ids=ids).logits, ref),
                (fused(rows=rows, input_ids=ids[:, :1]).logits, first),
            ):
                assert got.shape[-1] == 72
                for row, c in enumerate(candidates):
                    torch.testing.assert_close(got[row, :, : want[c].shape[-1]], want[c][row])
                    assert torch.all(got[row, :, want[c].shape[-1] :] == float("-inf"))
        assert models[0](input_ids=ids).logits.shape[-1] == 64  # the originals keep their own rows
    assert (
        models[0].get_input_embeddings().weight.shape[0]
        == models[0].get_output_embeddings().weight.shape[0]
        == 64
    )
    bigger = LlamaForCausalLM(LlamaConfig(**{**SMALL, "hidden_size": 64}, num_key_value_heads=2))
    bigger.resize_token_embeddings(72)
    with pytest.raises(NotFusable, match="differs from model 0"):  # other shapes are still refused
        fuse_models([ARCHS["llama"](), bigger])


def test_not_fusable_is_explained_and_leaves_models_alone():
    llama = build("llama", 0)
    bigger = LlamaForCausalLM(LlamaConfig(**{**SMALL, "hidden_size": 64}, num_key_value_heads=2)).double()
    with pytest.raises(NotFusable, match="differs from model 0"):
        fuse_models([llama, bigger])
    gpt2 = [GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4)) for _ in range(2)]
    before = gpt2[0].transformer.h[0].attn.c_attn.weight
    with pytest.raises(NotFusable, match="Conv1D"):
        fuse_models(gpt2)
    assert gpt2[0].transformer.h[0].attn.c_attn.weight is before
    with pytest.raises(NotFusable, match="at least two"):
        fuse_models([llama])


def _pool(models, tokenizer, fuse: bool) -> CandidatePool:
    backends = [
        TransformersBackend(
            f"c{i}",
            m,
            tokenizer,
            sampling=CandidateSampling(temperature=1.0),
            stop_strings=("red",) if i == 1 else (),
            eos_after="blue" if i == 2 else None,
        )
        for i, m in enumerate(models)
    ]
    return CandidatePool(backends, patch_tokens=3, seed=7, fuse=fuse)


def test_fused_pool_writes_what_separate_calls_write():
    tokenizer = make_word_tokenizer()
    paths = []
    for fuse in (False, True):
        models = []
        for seed in range(3):
            torch.manual_seed(seed)
            models.append(
                LlamaForCausalLM(
                    LlamaConfig(
                        **{**SMALL, "vocab_size": len(tokenizer)},
                        num_key_value_heads=2,
                        eos_token_id=tokenizer.eos_token_id,
                    )
                )
                .double()
                .eval()
            )
        pool = _pool(models, tokenizer, fuse)
        assert (pool.backends[0].fused is not None) == fuse
        calls = []
        if fuse:
            engine = pool.backends[0].fused.lm
            generate = engine.generate
            engine.generate = lambda *a, _calls=calls, _generate=generate, **k: (
                _calls.append(1) or _generate(*a, **k)
            )
        traces = [
            Trace(f"q{i}", q, max_new_tokens=14)
            for i, q in enumerate(["the red town", "one two", "a blue river in the park", "it was", "we"])
        ]
        rng = random.Random(0)
        while live := [t for t in traces if not t.done]:
            pool.step(live, [rng.randrange(3) for _ in live])
            if fuse:
                assert len(calls) == 1  # one call for every candidate of the step
                calls.clear()
        if fuse:  # fork / release go through the views
            pool.fork("q0", ["q0/a"])
            lengths = [(b.lm.cached_length("q0"), b.lm.cached_length("q0/a")) for b in pool.backends]
            assert all(n == m for n, m in lengths) and any(n > 0 for n, _ in lengths)
            pool.release(["q0", "q0/a"])
            assert all(b.lm.cached_length("q0") == b.lm.cached_length("q0/a") == 0 for b in pool.backends)
            assert len(pool.backends[0].fused.lm) == sum(len(b.lm) for b in pool.backends) > 0
        paths.append([(t.authors, [p.token_ids for p in t.patches], t.stop_reason) for t in traces])
    assert paths[0] == paths[1]
    assert len({a for authors, _, _ in paths[1] for a in authors}) == 3


def test_prefill_reads_once_and_changes_nothing(tiny_family):
    """``pool.prefill`` (fused Llama pair + a GPT-2 alone) leaves each cache one token short and the tokens unchanged."""
    from tests.conftest import make_pool

    written = []
    for prefill in (False, True):
        pool = make_pool(tiny_family, patch_tokens=3, seed=1)
        traces = [
            Trace(f"q{i}", q, max_new_tokens=12) for i, q in enumerate(["the red town", "one two three"])
        ]
        pool.step(traces, [0, 1])
        if prefill:
            pool.prefill(traces)
            for b in pool.backends:
                assert [b.lm.cached_length(t.key) for t in traces] == [len(b.view(t)) - 1 for t in traces]
        pool.step(traces, [2, 2])
        pool.step(traces, [1, 0])
        written.append([[p.token_ids for p in t.patches] for t in traces])
    assert written[0] == written[1]


def test_fusing_frees_the_original_weights():
    """Fusing keeps one copy of the weights: every original tensor is released (tied ones included)."""
    import gc
    import weakref

    models = [build("llama-tied", seed) for seed in range(3)]
    originals = [weakref.ref(p) for m in models for p in m.parameters()]
    fused = fuse_models(models)
    gc.collect()
    assert originals and all(ref() is None for ref in originals)
    assert models[0].lm_head.weight is models[0].model.embed_tokens.weight  # still tied, now a view
    assert sum(p.numel() for p in fused.parameters()) == 3 * sum(p.numel() for p in models[0].parameters())

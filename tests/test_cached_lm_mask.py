"""A padded decoding step hands the model its padding mask, prepared, and computes exactly what
Hugging Face's own mask functions would have it compute."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from switchrl.backends.base import CandidateSampling
from switchrl.backends.cached_lm import CachedLM, _plain_causal_sdpa

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def llama(**extra: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, **extra)).eval()


def decode(lm: CachedLM, masks: list[torch.Tensor]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of three rows of different lengths (so padded), recording each forward's mask and logits."""
    forward, logits = lm._forward, []

    def spy(rows: object, **kwargs: torch.Tensor) -> object:
        if "logits_to_keep" not in kwargs:  # a decoding step, not a prefill
            masks.append(kwargs["attention_mask"])
        out = forward(rows, **kwargs)
        logits.append(out.logits[:, -1].clone())
        return out

    lm._forward = spy  # type: ignore[method-assign]
    lm.extend(["a", "b"], [[5, 6, 7, 8, 9, 10, 11], [12, 13]])
    out = lm.generate(["a", "b", "c"], [[3], [4, 5, 6], [7]], [6, 6, 3], CandidateSampling(temperature=0.0))
    lm.release(["a", "b", "c"])
    return [g.token_ids for g in out], logits


def test_padded_step_passes_the_padding_mask_and_computes_what_hf_masks_compute() -> None:
    model = llama()
    prepared, built = CachedLM(model), CachedLM(model)
    built._step_mask_is_padding = False  # Hugging Face builds every mask from the 2-D padding mask
    masks: list[torch.Tensor] = []
    tokens, logits = decode(prepared, masks)
    ref_tokens, ref_logits = decode(built, [])
    assert len(masks) == 5 and all(
        m.dim() == 4 and m.dtype == torch.bool and m.shape[1:3] == (1, 1) for m in masks
    )
    assert tokens == ref_tokens
    assert all(torch.equal(x, y) for x, y in zip(logits, ref_logits, strict=True))


def test_unpadded_step_keeps_the_plain_mask() -> None:
    lm, masks = CachedLM(llama()), []
    forward = lm._forward

    def spy(rows: object, **kw: torch.Tensor) -> object:
        if "switchrl_packed" not in kw:  # a decoding step (the prefill reads packed, without a mask)
            masks.append(kw["attention_mask"])
        return forward(rows, **kw)

    lm._forward = spy  # type: ignore[method-assign]
    lm.generate(["a", "b"], [[1, 2, 3], [4, 5, 6]], [4, 4], CandidateSampling(temperature=0.0))
    assert [m.dim() for m in masks] == [2] * 3  # three steps


@pytest.mark.parametrize(
    "model, plain",
    [
        (lambda: llama(), True),
        (lambda: llama(attn_implementation="eager"), False),  # eager adds a float mask: not a boolean one
        (lambda: MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4)), False),
    ],
)
def test_only_plain_causal_sdpa_models_take_the_prepared_mask(model, plain: bool) -> None:
    assert _plain_causal_sdpa(model()) is plain

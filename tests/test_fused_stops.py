"""Fused candidates with different EOS ids and sampling (issue 17, fix 2 follow-up): a base whose
generation config lists one EOS id and two fine-tunes listing three (Llama-3.1-8B vs Tulu-3) share one
engine, each row stops on its own candidate's ids only and samples with its own settings."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from switchrl.backends import CandidatePool, CandidateSampling, Trace
from switchrl.backends.cached_lm import CachedLM
from switchrl.backends.transformers_backend import TransformersBackend
from tests.conftest import make_word_tokenizer

TOKENIZER = make_word_tokenizer(extra=("<eot>", "<eom>"))
EOS = TOKENIZER.eos_token_id
EOT, EOM = TOKENIZER.convert_tokens_to_ids(["<eot>", "<eom>"])
QUERIES = ["the river runs", "one two three", "a blue road", "she was at the park"]


def _model(seed: int, eos_ids: list[int], force: float) -> LlamaForCausalLM:
    """A tiny Llama whose generation config lists ``eos_ids``; ``force`` scales the <eot>/<eom> rows of
    the output layer so they win often (1e4: one of them always has the largest logit)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=EOS,
        pad_token_id=TOKENIZER.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = eos_ids
    with torch.no_grad():
        rows = model.lm_head.weight
        if force >= 1e4:
            rows[[EOT, EOM]] = 0.0
            rows[EOT, 0], rows[EOM, 0] = force, -force
        else:
            rows[EOT] = force * rows[EOT]
            rows[EOM] = -rows[EOT]
    return model


def _trio(
    fuse: bool, sampling: CandidateSampling | list[CandidateSampling], force: float = 3.0
) -> CandidatePool:
    """Base (one EOS id) + two fine-tunes (three); ``sampling``: for all three or for each."""
    eos_lists = [[EOS], [EOS, EOT, EOM], [EOS, EOT, EOM]]  # the base's config names one id, the others three
    each = sampling if isinstance(sampling, list) else [sampling] * 3
    backends = [
        TransformersBackend(f"c{i}", _model(i, ids, force), TOKENIZER, sampling=s)
        for i, (ids, s) in enumerate(zip(eos_lists, each))
    ]
    return CandidatePool(backends, patch_tokens=3, seed=7, fuse=fuse)


def _run(pool: CandidatePool, schedule_seed: int) -> list[tuple]:
    traces = [Trace(f"q{i}", q, max_new_tokens=18) for i, q in enumerate(QUERIES)]
    rng = random.Random(schedule_seed)
    while live := [t for t in traces if not t.done]:
        pool.step(live, [rng.randrange(3) for _ in live])
    return [
        (
            t.authors,
            [p.token_ids for p in t.patches],
            [p.text for p in t.patches],
            [p.stop_reason for p in t.patches],
        )
        for t in traces
    ]


def test_a_trio_with_different_eos_ids_fuses_into_one_engine():
    pool = _trio(fuse=True, sampling=CandidateSampling(temperature=0))
    assert [b.stop_ids for b in pool.backends] == [frozenset({EOS})] + [frozenset({EOS, EOT, EOM})] * 2
    assert len(pool.engines) == 1
    assert all(b.fused is pool.backends[0].fused is not None for b in pool.backends)


MIXED = [CandidateSampling(0.0), CandidateSampling(0.7, top_p=0.9), CandidateSampling(1.0, top_k=5)]


@pytest.mark.parametrize(
    "sampling", [CandidateSampling(0.0), CandidateSampling(1.0), MIXED], ids=["greedy", "sampled", "mixed"]
)
def test_each_member_stops_on_its_own_eos_ids_as_it_does_alone(sampling):
    by_author: dict[int, list[int]] = {0: [], 1: [], 2: []}
    eos_ends = 0
    for schedule_seed in range(3):
        fused = _trio(fuse=True, sampling=sampling)
        assert len(fused.engines) == 1
        alone = _run(_trio(fuse=False, sampling=sampling), schedule_seed)
        assert _run(fused, schedule_seed) == alone
        for authors, ids, _, reasons in alone:
            for a, p, reason in zip(authors, ids, reasons):
                by_author[a] += p
                eos_ends += a > 0 and reason == "eos"
    # what makes the comparison meaningful: the base wrote <eot>/<eom> as tokens (it does not stop on
    # them), the fine-tunes never did, and some of their patches ended on them
    assert {EOT, EOM} & set(by_author[0])
    assert not {EOT, EOM} & set(by_author[1] + by_author[2])
    assert eos_ends > 0


def test_rows_of_one_generate_call_stop_on_and_ban_their_own_ids():
    """One model, three rows: the base's stop set, the fine-tunes', and none; <eot> or <eom> always wins."""
    lm = CachedLM(_model(0, [EOS], force=1e4), pad_token_id=TOKENIZER.pad_token_id)
    prompt = TOKENIZER("the river runs", add_special_tokens=False)["input_ids"]
    own = [frozenset({EOS}), frozenset({EOS, EOT, EOM}), frozenset()]
    greedy = CandidateSampling(temperature=0)
    out = lm.generate(["a", "b", "c"], [prompt] * 3, [5, 5, 5], greedy, stop_ids=own)
    assert [g.stop_reason for g in out] == [None, "eos", None]
    assert len(out[0].token_ids) == 5 and set(out[0].token_ids) <= {EOT, EOM}
    assert out[1].token_ids == []
    assert out[2].token_ids == out[0].token_ids
    # while may_stop says no, each row's own stop ids are banned: only the fine-tune row loses <eot>/<eom>
    banned = lm.generate(
        ["d", "e"], [prompt] * 2, [4, 4], greedy, stop_ids=own[:2], may_stop=lambda row, toks: False
    )
    assert banned[0].token_ids == out[0].token_ids[:4]
    assert banned[1].stop_reason is None and len(banned[1].token_ids) == 4
    assert not {EOS, EOT, EOM} & set(banned[1].token_ids)
    with pytest.raises(ValueError, match="sets of stop ids"):
        lm.generate(["f"], [prompt], [2], greedy, stop_ids=own)


def test_rows_of_one_generate_call_sample_with_their_own_settings():
    """Per-row settings give each row the tokens of a call with its setting alone (same generator seed)."""
    lm = CachedLM(_model(1, [EOS], force=3.0), pad_token_id=TOKENIZER.pad_token_id)
    prompts = [TOKENIZER(q, add_special_tokens=False)["input_ids"] for q in QUERIES[:3]]

    def gens(rows):
        return [None if MIXED[r].greedy else torch.Generator().manual_seed(r) for r in rows]

    together = lm.generate(
        ["a0", "a1", "a2"], prompts, [6, 6, 6], MIXED, gens(range(3)), stop_ids=frozenset({EOS})
    )
    apart = [
        lm.generate([f"b{r}"], [prompts[r]], [6], MIXED[r], gens([r]), stop_ids=frozenset({EOS}))[0]
        for r in range(3)
    ]
    assert together == apart
    assert len({tuple(g.token_ids) for g in together}) == 3
    with pytest.raises(ValueError, match="one generator per key"):
        lm.generate(["c0", "c1"], prompts[:2], [2, 2], MIXED[:2], [None, None])

"""A base with N vocabulary rows and two fine-tunes with N + 8 (an added ``<pad>`` and reserved
specials), like Llama-3.1-8B and the Tulu-3 models (issue 17, fix 2): ids pass between them, the
three fuse into one engine, and the base never writes an id it has no row for."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from switchrl.backends import CandidatePool, CandidateSampling, Trace
from switchrl.backends.base import Patch
from switchrl.backends.tokens import shared_id_limit
from switchrl.backends.transformers_backend import TransformersBackend

CORPUS = [
    "the river runs under the old bridge in the town",
    "one two three four five six seven eight nine ten",
    "the answer is 42 and the price is 5 € or 7 £",
    "a blue road goes from the school to the park",
    "naïve café owners serve crème brûlée at noon",
] * 4
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]
EXTRA = 8  # the fine-tunes' extra rows: <pad> and 7 reserved specials


@pytest.fixture(scope="module")
def tokenizers_pair() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """A byte-level BPE base tokenizer (N ids) and the fine-tunes' copy with 8 added specials (N + 8)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    kw = dict(bos_token=SPECIALS[0], eos_token=SPECIALS[1])
    base = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), **kw)
    sft = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), pad_token="<pad>", **kw)
    sft.add_special_tokens({"additional_special_tokens": [f"<|reserved_{i}|>" for i in range(EXTRA - 1)]})
    assert len(sft) == len(base) + EXTRA and sft.pad_token_id == len(base)
    return base, sft


def _model(rows: int, seed: int, eos: int, pad: int | None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return LlamaForCausalLM(cfg).eval()


def _huge(rows: torch.Tensor) -> None:
    """Rows +-1e4 along the first hidden dimensions: one of them has a huge logit for any hidden state."""
    rows.zero_()
    for k in range(rows.shape[0]):
        rows[k, k // 2] = 1e4 * (-1) ** k


def _trio(tokenizers_pair, fuse: bool, sampling: CandidateSampling, huge_extra: bool = False):
    """Pool of base (N rows) + sft and aligned (N + 8 rows); ``huge_extra``: the extra ids dominate their logits."""
    base_tok, sft_tok = tokenizers_pair
    n, eos = len(base_tok), base_tok.eos_token_id
    backends = []
    for i, (tok, rows) in enumerate([(base_tok, n), (sft_tok, n + EXTRA), (sft_tok, n + EXTRA)]):
        model = _model(rows, seed=i, eos=eos, pad=tok.pad_token_id)
        if huge_extra and rows > n:
            with torch.no_grad():
                _huge(model.lm_head.weight[n:])
        backends.append(TransformersBackend(f"c{i}", model, tok, sampling=sampling))
    return CandidatePool(backends, patch_tokens=3, seed=5, fuse=fuse)


def _run(pool, schedule_seed: int = 0) -> list[tuple]:
    queries = ["the river runs", "the price is 5 €", "naïve café", "one two three four"]
    traces = [Trace(f"q{i}", q, max_new_tokens=15) for i, q in enumerate(queries)]
    rng = random.Random(schedule_seed)
    while live := [t for t in traces if not t.done]:
        pool.step(live, [rng.randrange(3) for _ in live])
    return [(t.authors, [p.token_ids for p in t.patches], t.text, t.stop_reason) for t in traces]


def test_the_shared_range_is_the_base_vocabulary(tokenizers_pair):
    base, sft = tokenizers_pair
    assert shared_id_limit(base, sft) == shared_id_limit(sft, base) == len(base)
    extended = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()))
    extended.add_tokens(["zeta"])
    assert shared_id_limit(base, extended) == len(base)
    swapped = {s: i for s, i in base.get_vocab().items()}
    a, b = sorted(swapped)[10:12]
    swapped[a], swapped[b] = swapped[b], swapped[a]
    other = Tokenizer(models.WordLevel(vocab=swapped, unk_token=a))
    assert shared_id_limit(base, PreTrainedTokenizerFast(tokenizer_object=other)) is None


def test_readers_take_the_authors_ids_within_the_shared_range(tokenizers_pair):
    base_tok, sft_tok = tokenizers_pair
    pool = _trio(tokenizers_pair, fuse=False, sampling=CandidateSampling(temperature=0))
    base, sft = pool.backends[0], pool.backends[1]
    assert base.vocab != sft.vocab
    # a merged token written as two pieces: re-tokenizing its text would give the merged id back
    vocab = base_tok.get_vocab()
    merged = next(s for s in sorted(vocab, key=len, reverse=True) if s[:1] in vocab and s[1:] in vocab)
    pieces = [vocab[merged[:1]], vocab[merged[1:]]]
    text = base_tok.decode(pieces)
    assert base_tok(text, add_special_tokens=False)["input_ids"] != pieces
    for reader, author in ((base, sft), (sft, base)):
        patch = Patch(author=1, token_ids=pieces, text=text, vocab=author.vocab)
        assert reader.patch_ids(patch) == pieces  # read as ids, not re-tokenized
    # an id the base has no token for (the fine-tunes' <pad>): its text is re-tokenized
    pad = Patch(author=1, token_ids=[*pieces, sft_tok.pad_token_id], text=text, vocab=sft.vocab)
    assert base.patch_ids(pad) == base_tok(text, add_special_tokens=False)["input_ids"]
    # through the pool: each reader's view holds exactly the ids the others wrote
    traces = [Trace("q", "the river runs", max_new_tokens=12)]
    for author in (1, 0, 2, 1):
        pool.step(traces, [author])
    response = [i for p in traces[0].patches for i in p.token_ids]
    for b in pool.backends:
        assert b.view(traces[0])[-len(response) :] == response


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_trio_fuses_and_writes_what_each_writes_alone(tokenizers_pair, temperature):
    sampling = CandidateSampling(temperature=temperature)
    fused_pool = _trio(tokenizers_pair, fuse=True, sampling=sampling)
    assert len(fused_pool.engines) == 1 and fused_pool.backends[0].fused is not None
    assert (
        fused_pool.backends[0].fused.lm.model.vocab_rows
        == (len(tokenizers_pair[0]),) + (len(tokenizers_pair[0]) + EXTRA,) * 2
    )
    alone = _run(_trio(tokenizers_pair, fuse=False, sampling=sampling))
    assert _run(fused_pool) == alone
    assert len({a for authors, *_ in alone for a in authors}) == 3


def test_the_base_never_writes_an_id_it_has_no_row_for(tokenizers_pair):
    """The fine-tunes' extra ids get huge logits, and so does the base's padding in the fused stack."""
    n = len(tokenizers_pair[0])
    pool = _trio(tokenizers_pair, fuse=True, sampling=CandidateSampling(temperature=1.0), huge_extra=True)
    with torch.no_grad():
        _huge(pool.backends[0].fused.lm.model.template.lm_head.weight[0, n:])  # the base's padding
    traces = [Trace(f"q{i}", q, max_new_tokens=9) for i, q in enumerate(["the river", "one two", "café"])]
    pool.step(traces, [1, 0, 2])  # one fused call with rows of all three
    pool.step(traces, [0, 0, 1])
    by_author = [
        [i for t in traces for p in t.patches if p.author == a for i in p.token_ids] for a in (0, 1, 2)
    ]
    assert by_author[0] and all(i < n for i in by_author[0])
    assert by_author[1] and all(i >= n for i in by_author[1])  # the fine-tunes do write them


def test_bench_arch_with_more_rows_for_the_fine_tunes_fuses(monkeypatch):
    """The ``8b`` bench arch models the trio's row counts; the same on ``tiny`` (2048 vs 2056 rows)."""
    from switchrl.bench import archs
    from switchrl.bench.setup import build_setup

    assert [archs.candidate_rows("8b", i) for i in range(3)] == [128256, 128264, 128264]
    monkeypatch.setitem(archs.CANDIDATE_ROWS, "tiny", (2048, 2056))
    setup = build_setup("tiny", 3, device="cpu", dtype="float32")
    assert [b.model.config.vocab_size for b in setup.backends] == [2048, 2056, 2056]
    pool = CandidatePool(setup.backends, patch_tokens=3)
    assert len(pool.engines) == 1
    assert setup.backends[0].id_limits == {setup.backends[1].vocab: 2048}
    traces = [Trace(f"t{i}", q, max_new_tokens=9) for i, q in enumerate(setup.queries(4, 5, seed=0))]
    for authors in ([0, 1, 2, 1], [1, 0, 0, 2], [2, 2, 1, 0]):
        pool.step(traces, authors)
    assert all(len(t.patches) == 3 and t.num_tokens == 9 for t in traces)  # EOS stays out of reach

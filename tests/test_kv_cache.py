"""The KV-reuse path is exact: switched generation equals re-encoding the whole prefix every patch."""

from __future__ import annotations

import torch

from switchrl.backends import CandidatePool, CandidateSampling, Trace
from switchrl.backends.tokens import load_tokenizer
from switchrl.backends.transformers_backend import TransformersBackend, load_causal_lm
from tests.conftest import make_word_tokenizer, save_tiny_model

QUERIES = ["the town of red river", "one two three", "the answer is", "a blue bridge in the park"]


def reencode_reference(models, tokenizers, queries, schedule, patch_tokens, max_new_tokens):
    """Naive switching: every patch re-encodes the full prompt + response with ``generate`` (greedy)."""
    outs = []
    for q in queries:
        views = [tok(q)["input_ids"] for tok in tokenizers]
        text, n_tokens, authors, patches = "", 0, [], []
        for a in schedule:
            if n_tokens >= max_new_tokens:
                break
            model, tok = models[a], tokenizers[a]
            ids = torch.tensor([views[a]])
            limit = min(patch_tokens, max_new_tokens - n_tokens)
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=limit,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            new = gen[0, ids.shape[1] :].tolist()
            ended = tok.eos_token_id in new
            if ended:
                new = new[: new.index(tok.eos_token_id)]
            response = views[a][len(tok(q)["input_ids"]) :]
            patch_text = tok.decode(response + new, skip_special_tokens=True)[
                len(tok.decode(response, skip_special_tokens=True)) :
            ]
            for j, other in enumerate(tokenizers):
                views[j] = views[j] + (
                    new
                    if j == a or other is tok
                    else other(patch_text, add_special_tokens=False)["input_ids"]
                )
            text += patch_text
            n_tokens += len(new)
            authors.append(a)
            patches.append(new)
            if ended:
                break
        outs.append((authors, text, patches))
    return outs


def run_switched(paths, queries, schedule, patch_tokens, max_new_tokens, dtype="float64"):
    backends = [
        TransformersBackend.from_pretrained(
            f"c{i}", str(p), dtype=dtype, sampling=CandidateSampling(temperature=0)
        )
        for i, p in enumerate(paths)
    ]
    pool = CandidatePool(backends, patch_tokens=patch_tokens)
    traces = [Trace(key=f"q{i}", query=q, max_new_tokens=max_new_tokens) for i, q in enumerate(queries)]
    for a in schedule:
        live = [t for t in traces if not t.done]
        if not live:
            break
        pool.step(live, [a] * len(live))
    return [(t.authors, t.text, [p.token_ids for p in t.patches]) for t in traces], pool


def test_kv_reuse_matches_reencode_shared_tokenizer(tiny_family):
    schedule = [0, 1, 2, 2, 0, 1, 0, 2]
    got, pool = run_switched(tiny_family, QUERIES, schedule, patch_tokens=5, max_new_tokens=37)
    models = [load_causal_lm(str(p), "float64") for p in tiny_family]
    toks = [load_tokenizer(str(p)) for p in tiny_family]
    want = reencode_reference(models, toks, QUERIES, schedule, 5, 37)
    assert got == want
    # each candidate holds at most one cache per trace
    for b in pool.backends:
        assert 0 < len(b.lm) <= len(QUERIES)


def test_kv_reuse_matches_reencode_different_tokenizers(tmp_path, tiny_family):
    """Candidates with different vocabularies exchange text; each re-tokenizes only the new text."""
    other_tok = make_word_tokenizer(
        words=list(reversed(__import__("tests.conftest").conftest.WORDS)), extra=["zeta"]
    )
    other = save_tiny_model(tmp_path / "other", "gpt2", other_tok, seed=7)
    paths = [tiny_family[0], other, tiny_family[2]]
    schedule = [1, 0, 1, 2, 1, 0]
    got, _ = run_switched(paths, QUERIES, schedule, patch_tokens=4, max_new_tokens=30)
    models = [load_causal_lm(str(p), "float64") for p in paths]
    toks = [load_tokenizer(str(p)) for p in paths]
    toks[2] = toks[0]  # same vocabulary: the reference passes ids between them, like the pool does
    want = reencode_reference(models, toks, QUERIES, schedule, 4, 30)
    assert got == want


def test_batch_of_very_different_chunk_lengths_equals_one_trace_at_a_time(tiny_family):
    """Rows prefilled in separate length buckets and merged for decoding give the single-row results."""
    from switchrl.backends.cached_lm import CachedLM

    model = load_causal_lm(str(tiny_family[0]), "float64")
    batched, alone = CachedLM(model), CachedLM(model)
    for lm in (batched, alone):
        lm.extend(["a"], [list(range(4, 34))])
    keys, new = (
        ["a", "b", "c"],
        [[5], list(range(10, 30)), [6, 7, 8]],
    )  # chunk lengths 1, 20, 3: three buckets
    got = batched.generate(keys, new, [6, 4, 5], CandidateSampling(temperature=0))
    want = [
        alone.generate([k], [ids], [n], CandidateSampling(temperature=0))[0]
        for k, ids, n in zip(keys, new, [6, 4, 5])
    ]
    assert [(g.token_ids, g.stop_reason) for g in got] == [(w.token_ids, w.stop_reason) for w in want]
    assert [batched.cached_length(k) for k in keys] == [alone.cached_length(k) for k in keys]
    last = [[g.token_ids[-1]] for g in got]
    torch.testing.assert_close(
        batched.extend(keys, last), torch.cat([alone.extend([k], [ids]) for k, ids in zip(keys, last)])
    )

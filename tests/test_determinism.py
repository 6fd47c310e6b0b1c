"""What is identical in which dtype (docs/determinism.md): float32 tokens do not depend on batching,
fusion or threads; bfloat16 is identical only for a rerun (or resume) that keeps every batch as it was."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from switchrl.backends import CandidatePool, CandidateSampling, Trace
from switchrl.backends.cached_lm import CachedLM
from switchrl.backends.transformers_backend import TransformersBackend
from switchrl.run_config import load_config
from switchrl.trainers.simulate import simulate
from tests.conftest import make_word_tokenizer
from tests.test_simulate_run import CRASH_ENV, config_file  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
QUERIES = [
    "the red town",
    "one two",
    "a blue river in the park",
    "it was",
    "we",
    "the answer is",
    "she was in the school",
    "ten nine eight seven",
]
TOKENIZER = make_word_tokenizer()


def candidates(dtype: torch.dtype, hidden: int = 64) -> list[torch.nn.Module]:
    """Three Llamas of one shape (so they fuse) with different random weights."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(TOKENIZER),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            eos_token_id=TOKENIZER.eos_token_id,
        )
        models.append(LlamaForCausalLM(config).to(dtype).eval())
    return models


def write(dtype: torch.dtype, temperature: float, fuse: bool = True, together: bool = True) -> list:
    """The patches the pool writes for :data:`QUERIES` under one fixed schedule of authors: all traces in
    one batch per step (``together``) or each trace on its own."""
    backends = [
        TransformersBackend(f"c{i}", m, TOKENIZER, sampling=CandidateSampling(temperature=temperature))
        for i, m in enumerate(candidates(dtype))
    ]
    pool = CandidatePool(backends, patch_tokens=4, seed=7, fuse=fuse)
    rng = random.Random(0)
    schedule = [[rng.randrange(3) for _ in QUERIES] for _ in range(4)]
    traces = [Trace(f"q{i}", q, max_new_tokens=16) for i, q in enumerate(QUERIES)]
    for batch in [traces] if together else [[t] for t in traces]:
        for authors in schedule:
            live = [t for t in batch if not t.done]
            if live:
                pool.step(live, [authors[int(t.key[1:])] for t in live])
    return [(t.authors, [p.token_ids for p in t.patches], t.stop_reason) for t in traces]


@pytest.fixture()
def threads():
    """Restores torch's thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_float32_tokens_do_not_depend_on_batching_fusion_or_threads(temperature, threads):
    torch.set_num_threads(1)
    reference = write(torch.float32, temperature)
    assert len({tuple(a) for a, _, _ in reference}) > 1 and all(p for _, p, _ in reference)  # real work
    assert write(torch.float32, temperature, fuse=False) == reference
    assert write(torch.float32, temperature, together=False) == reference
    assert write(torch.float32, temperature, fuse=False, together=False) == reference
    torch.set_num_threads(2)
    assert write(torch.float32, temperature) == reference


def test_float32_logits_of_a_row_change_with_its_batch_by_rounding_only():
    """Why float32 token identity is near-certain rather than guaranteed: a row's logits depend, in the
    last bits, on the rows it shares a batch with (padding, kernel blocking)."""
    model = candidates(torch.float32, hidden=256)[0]
    ids = [TOKENIZER(q)["input_ids"] for q in QUERIES]
    together = CachedLM(model).extend([f"k{i}" for i in range(len(ids))], ids)
    alone = torch.cat([CachedLM(model).extend(["k"], [row]) for row in ids])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_bfloat16_rerun_with_the_same_batches_is_bit_identical():
    ids = [TOKENIZER(q)["input_ids"] for q in QUERIES]
    logits = [
        CachedLM(candidates(torch.bfloat16, hidden=256)[0]).extend([f"k{i}" for i in range(len(ids))], ids)
        for _ in range(2)
    ]
    assert logits[0].dtype == torch.bfloat16 and torch.equal(logits[0], logits[1])
    for temperature in (0.0, 1.0):
        assert write(torch.bfloat16, temperature) == write(torch.bfloat16, temperature)


def test_bfloat16_simulate_resumed_after_a_crash_writes_the_records_of_an_uninterrupted_run(
    config_file,  # noqa: F811
    tmp_path,
):
    """Resume redoes whole chunks, each with the batches it had: bf16 records are the same bytes."""

    def config(out: str):
        cfg = load_config(config_file)
        cfg.candidates = [c.model_copy(update={"dtype": "bfloat16"}) for c in cfg.candidates]
        cfg.simulate = cfg.simulate.model_copy(update={"out_dir": str(tmp_path / out)})
        return cfg

    reference = simulate(config("full"), progress=False).records()
    float32 = simulate(load_config(config_file), progress=False).records()
    assert reference != float32  # the candidates did run in bfloat16
    os.environ[CRASH_ENV] = str(2 * 3 * 3 + 5)  # inside the second shard
    try:
        with pytest.raises(KeyboardInterrupt):
            simulate(config("crashed"), progress=False)
    finally:
        del os.environ[CRASH_ENV]
    manifest = json.loads((tmp_path / "crashed" / "manifest.json").read_text())
    assert 0 < sum(len(s["item_ids"]) for s in manifest["shards"]) < len(reference)
    assert simulate(config("crashed"), progress=False).records() == reference


def test_the_promise_names_its_dtypes_and_every_test_the_doc_cites_exists():
    """README's determinism sentence says which dtype it holds for and points to docs/determinism.md,
    whose table cites, for every claim, tests that exist."""
    readme = (ROOT / "README.md").read_text()
    [promise] = [p for p in readme.split("\n\n") if "same records" in p]
    assert "float32" in promise and "bfloat16" in promise and "docs/determinism.md" in promise
    doc = (ROOT / "docs" / "determinism.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", doc)
    assert len(cited) >= 8
    for path, name in cited:
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"docs/determinism.md cites {path}::{name}"
    claims = doc.split("## Claims and their tests")[1].split("\n## ")[0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in claims.splitlines()
        if line.startswith("| ")
    ]
    assert rows[0] == ["claim", "dtype", "holds", "tested by"]
    for claim, dtype, holds, tested_by in rows[2:]:
        assert dtype in ("float32", "bfloat16", "float32, bfloat16"), claim
        if "yes" in holds:  # every promise is tested
            assert re.search(r"`tests/\S+::\w+`", tested_by), f"{claim} ({dtype}) has no test"

"""Each benchmark runs on the tiny architecture with tiny sizes and prints well-formed JSON lines."""

from __future__ import annotations

import json

import pytest

from switchrl.bench.cli import run as main
from switchrl.bench.setup import build_setup

TINY = [
    "--arch",
    "tiny",
    "--prompt-len",
    "6",
    "--max-new-tokens",
    "8",
    "--patch-tokens",
    "3",
    "--repeats",
    "1",
]


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_switch_vs_single_and_reencode(capsys):
    assert main(["switch_vs_single", "--batch-sizes", "1,3", *TINY]) == 0
    single = _lines(capsys)
    assert [r["batch"] for r in single] == [1, 3]
    assert all(
        r["ratio"] > 0 and r["single_tok_s"] > 0 and r["switched_mem"]["peak_rss_mb"] > 0 for r in single
    )
    # the fused engine writes exactly what one call per candidate writes
    assert all(r["same_tokens_unfused"] == 1.0 and r["unfused_ratio"] > 0 for r in single)
    assert all(r["read_tokens_per_response"]["single"] == 6 for r in single)
    # the baseline: candidate 0 alone through one batched transformers `generate`, the same greedy tokens
    assert all(
        r["same_tokens_hf_generate"] == 1.0 and r["hf_generate_tok_s"] > 0 and r["single_vs_hf_generate"] > 0
        for r in single
    )
    # switching reads more than one model does, which caps the ratio below 1
    assert all(r["prefill_tok_s"] > 0 and 0 < r["ratio_cap_from_reading"] <= 1 for r in single)

    assert main(["switch_vs_reencode", "--batch-sizes", "2", *TINY]) == 0
    [reencode] = _lines(capsys)
    # greedy: the KV-reuse path and the re-encode-every-patch path write the same tokens
    assert reencode["same_tokens"] == 1.0 and reencode["ratio"] > 0


def test_simulate_throughput(capsys):
    assert main(["simulate_throughput", "--states", "1", "--k", "2", *TINY]) == 0
    [record] = _lines(capsys)
    assert record["finishes"] == 1 * 3 * 2 and record["finishes_per_s"] > 0
    # the scheduler, lock-step and one model over the same rows, in one run; same records
    assert record["same_records"] is True and record["rows_in_flight"] in (2, 4, 6)
    assert record["speedup_vs_lockstep"] > 0 and record["lockstep_finishes_per_s"] > 0
    assert record["single_tok_s_same_rows"] > 0 and record["ratio_single"] > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_setup("huge")
    with pytest.raises(SystemExit):
        main(["switch_vs_single", "--batch-sizes", "0,2"])

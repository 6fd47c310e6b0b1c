"""``benchmarks/gpu_check.sh``: the GPU check runs end to end on the CPU (``--tiny``) and fails loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args: str) -> tuple[int, list[dict], str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


@pytest.mark.slow
def test_tiny_gpu_check_runs_every_check_and_prints_only_json_lines():
    rc, lines, stderr = _run("--tiny")
    assert rc == 0, stderr[-3000:]
    machine, *rest = lines
    assert machine["check"] == "machine" and machine["torch"] and machine["trl"] and machine["peft"]
    assert not any(line.get("ok") is False for line in lines)
    single = [r for r in rest if r.get("bench") == "switch_vs_single"]
    assert [r["batch"] for r in single] == [1, 4]
    for r in single:  # bf16: switched, single, unfused and the batched transformers generate baseline
        assert r["dtype"] == "bfloat16" and r["hf_generate_tok_s"] > 0 and r["switched_tok_s"] > 0
    [reencode] = [r for r in rest if r.get("bench") == "switch_vs_reencode"]
    assert reencode["kv_reuse_tok_s"] > 0
    memory = [r for r in rest if r["check"] == "simulate_memory"]
    assert [(r["states_per_batch"], r["fits"]) for r in memory] == [(2, True), (8, True)]
    determinism = {(r["dtype"], r["temperature"]): r["differ"] for r in rest if r["check"] == "determinism"}
    assert len(determinism) == 4 and determinism[("bfloat16", 1.0)]["rerun"] == 0
    assert all(
        n == 0 for (dtype, _), differ in determinism.items() if dtype == "float32" for n in differ.values()
    )
    [grpo] = [r for r in rest if r["check"] == "grpo"]
    assert grpo["dtype"] == "bfloat16" and grpo["lora_trainable_params"] > 0 and grpo["grad_norm"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the full 8B check")
def test_without_a_gpu_the_full_check_says_so_and_exits_non_zero():
    rc, lines, stderr = _run()
    assert rc == 1
    assert lines[0]["ok"] is False and "no CUDA device" in lines[0]["error"]
    assert lines[-1] == {"check": "gpu_check", "ok": False, "exit": 1, "error": "failed"}
    assert "gpu_check: failed" in stderr


def test_a_failing_check_is_reported_and_the_others_still_run(capsys, monkeypatch):
    gpu_check = load_script(ROOT / "benchmarks" / "gpu_check.py")
    ran = []

    def broken(arch: str, device: str) -> None:
        raise RuntimeError("out of order")

    monkeypatch.setattr(gpu_check, "CHECKS", {"bench": broken, "grpo": lambda arch, device: ran.append(arch)})
    monkeypatch.setattr(gpu_check, "STDOUT", sys.stdout)
    assert gpu_check.run_checks(["bench", "grpo"], "tiny", "cpu") == ["bench"]
    assert ran == ["tiny"]
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out == [{"check": "bench", "ok": False, "error": "RuntimeError: out of order"}]

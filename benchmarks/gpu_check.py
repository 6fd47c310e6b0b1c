"""The checks of ``benchmarks/gpu_check.sh``, in one process: one JSON line per measurement on stdout.

Random-weight Llama models of ``--arch`` (``8b``: Llama-3.1-8B's shapes; ``tiny``: the CPU rehearsal)
are built in bfloat16 on the device (nothing is downloaded). The checks, in order:

* ``machine``: GPU name, torch / CUDA / transformers / trl / peft versions (always the first line);
* ``simulate_memory``: one batch of ``SimulateWorker`` at ``states_per_batch`` 2 and 8 (k finishes per
  candidate and state); peak memory (``torch.cuda.max_memory_allocated``) over the weights. Running
  out of memory is a measurement here (``"fits": false``), not a failure;
* ``grpo``: one GRPO step of TRL's trainer on a fresh LoRA switcher of ``--arch`` (candidates of
  ``--arch`` too; a switch cost makes the rewards of a group differ, so the step has a gradient);
* ``determinism``: in float32 and bfloat16, greedy and sampled, how many of 8 traces change tokens
  between a rerun, candidates run apart instead of fused, and each trace alone instead of all in
  one batch (docs/determinism.md; the ``1b`` shapes for ``--arch 8b``);
* ``bench``: ``switch_vs_single`` (switched, single, unfused and a batched transformers ``generate``
  baseline) and ``switch_vs_reencode``, as ``switchrl bench`` prints them.

A check that raises prints ``{"check": ..., "ok": false, "error": ...}`` (traceback on stderr), the
others still run, and the process exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from switchrl.backends.pool import CandidatePool
    from switchrl.rollout import SwitchPolicy

SIZES: dict[str, dict] = {
    "8b": dict(
        single=dict(batch_sizes=(1, 8, 32), prompt_len=128, max_new_tokens=150, patch_tokens=50),
        reencode=dict(batch_sizes=(1, 8), prompt_len=128, max_new_tokens=100, patch_tokens=50),
        simulate=dict(prompt_len=64, k=32, max_new_tokens=256, patch_tokens=50),
        grpo=dict(prompt_len=64, max_new_tokens=150, patch_tokens=50, queries_per_step=2, num_generations=4),
    ),
    "tiny": dict(
        single=dict(batch_sizes=(1, 4), prompt_len=8, max_new_tokens=12, patch_tokens=4),
        reencode=dict(batch_sizes=(2,), prompt_len=8, max_new_tokens=8, patch_tokens=4),
        simulate=dict(prompt_len=8, k=2, max_new_tokens=12, patch_tokens=4),
        grpo=dict(prompt_len=8, max_new_tokens=16, patch_tokens=4, queries_per_step=2, num_generations=4),
    ),
}
STATES_PER_BATCH = (2, 8)
DETERMINISM = {"8b": dict(arch="1b", prompt_len=32, max_new_tokens=48, patch_tokens=16)}
DETERMINISM["tiny"] = dict(arch="tiny", prompt_len=8, max_new_tokens=12, patch_tokens=4)


STDOUT = sys.stdout  # JSON lines only: whatever else prints (TRL's log dicts) goes to stderr


def emit(record: dict) -> None:
    print(json.dumps(record), file=STDOUT, flush=True)


def free(device: str) -> None:
    """Release what the previous check left, so each check's peak is its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def machine(device: str) -> dict:
    import peft
    import transformers
    import trl

    cuda = device.startswith("cuda")
    return {
        "check": "machine",
        "device": device,
        "gpu": torch.cuda.get_device_name(torch.device(device)) if cuda else None,
        "gpu_memory_gb": round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 1)
        if cuda
        else None,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def bench(arch: str, device: str) -> None:
    from switchrl.bench.measures import switch_vs_reencode, switch_vs_single
    from switchrl.bench.setup import build_setup

    setup = build_setup(arch, 3, device, "bfloat16")
    out = lambda line: emit({"check": "bench", **json.loads(line)})  # noqa: E731
    switch_vs_single(setup, repeats=1, out=out, **SIZES[arch]["single"])
    switch_vs_reencode(setup, repeats=1, out=out, **SIZES[arch]["reencode"])


def simulate_memory(arch: str, device: str) -> None:
    from switchrl.backends.pool import CandidatePool
    from switchrl.bench.setup import build_setup, memory_stats, sync
    from switchrl.tasks.base import TaskInstance
    from switchrl.trainers.simulate import SimulateWorker, make_items

    sizes = dict(SIZES[arch]["simulate"])
    prompt_len, patch_tokens = sizes.pop("prompt_len"), sizes.pop("patch_tokens")
    setup = build_setup(arch, 3, device, "bfloat16")
    pool = CandidatePool(setup.backends, patch_tokens=patch_tokens, seed=0)
    weights = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    for spb in STATES_PER_BATCH:
        queries = setup.queries(spb, prompt_len, seed=spb)
        instances = [
            TaskInstance(id=f"s{spb}q{i}", query=q, reference=q.split()[-1]) for i, q in enumerate(queries)
        ]
        worker = SimulateWorker(
            pool, {"*": lambda q, r, ref, **m: float(ref in r)}, states_per_batch=spb, **sizes
        )
        record = {"check": "simulate_memory", "arch": arch, "states_per_batch": spb, **sizes}
        record.update(candidates=3, prompt_len=prompt_len, patch_tokens=patch_tokens)
        free(device)
        start = time.perf_counter()
        try:
            records = worker.process(make_items(instances, states_per_query=1))
            sync(device)
        except torch.cuda.OutOfMemoryError as exc:
            record.update(fits=False, error=str(exc).splitlines()[0])
        else:
            if len(records) != spb or any(len(r["utilities"]) != 3 for r in records):
                raise RuntimeError(f"simulate wrote {len(records)} records for {spb} states: {records}")
            record.update(fits=True, seconds=round(time.perf_counter() - start, 2))
        record.update(memory_stats(device), weights_mb=round(weights / 2**20, 1))
        if "cuda_peak_mb" in record:
            record["peak_over_weights_mb"] = round(record["cuda_peak_mb"] - record["weights_mb"], 1)
        emit(record)


def grpo(arch: str, device: str) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from switchrl.backends.pool import CandidatePool
    from switchrl.bench.archs import ARCHS
    from switchrl.bench.setup import build_setup, memory_stats, synthetic_tokenizer
    from switchrl.config import CandidateConfig, SwitchGenerationConfig, TaskSourceConfig
    from switchrl.policies.factory import LoraSettings
    from switchrl.policies.lm_switcher import LMSwitcher
    from switchrl.run_config import RLSection, RunConfig
    from switchrl.trainers.grpo import train_grpo
    from switchrl.trainers.rl_setup import prepare

    sizes = SIZES[arch]["grpo"]
    setup = build_setup(arch, 3, device, "bfloat16")
    pool = CandidatePool(setup.backends, patch_tokens=sizes["patch_tokens"], seed=0)
    spec = ARCHS[arch]
    torch.manual_seed(0)
    shape = LlamaConfig(**spec, max_position_embeddings=8192, bos_token_id=1, pad_token_id=0)
    with torch.device(device):  # built in bf16: no float32 copy of 8B weights beside the candidates
        model = AutoModelForCausalLM.from_config(shape, dtype=torch.bfloat16)
    base = f"random-{arch}-switcher"  # a name, not a directory: the weights are built here
    switcher = LMSwitcher(
        model,
        synthetic_tokenizer(spec["vocab_size"]),
        pool.names,
        seed=0,
        patch_tokens=sizes["patch_tokens"],
        base_model_path=base,
    )
    switcher.attach_adapter(None, LoraSettings().peft_kwargs())
    trainable = sum(p.numel() for p in switcher.model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks.jsonl"
        queries = setup.queries(sizes["queries_per_step"], sizes["prompt_len"], seed=1)
        tasks.write_text(
            "".join(
                json.dumps({"id": f"q{i}", "query": q, "reference": q.split()[-1]}) + "\n"
                for i, q in enumerate(queries)
            )
        )
        config = RunConfig(
            candidates=[CandidateConfig(name=n, path=f"random-{arch}-{n}") for n in pool.names],
            generation=SwitchGenerationConfig(
                patch_tokens=sizes["patch_tokens"], max_new_tokens=sizes["max_new_tokens"], seed=0
            ),
            tasks=[TaskSourceConfig(source="jsonl", path=str(tasks), task="check", split="train")],
            reward="token_f1",
        )
        rl = RLSection(
            base=base,
            out_dir=str(Path(tmp) / "rl"),
            steps=1,
            queries_per_step=sizes["queries_per_step"],
            num_generations=sizes["num_generations"],
            save_steps=1,
            switch_cost=0.1,  # rewards differ within a group (random weights score ~0): a real gradient
        )
        free(device)
        start = time.perf_counter()
        result = train_grpo(prepare(config, rl, pool=pool), switcher)
        seconds = time.perf_counter() - start
    if len(result.history) != 1:
        raise RuntimeError(f"expected one logged GRPO step, got {result.history}")
    grad_norm = result.history[0].get("grad_norm")
    if grad_norm is None or not math.isfinite(grad_norm):
        raise RuntimeError(f"the GRPO step's gradient norm is {grad_norm} (bf16 overflow?)")
    emit(
        {
            "check": "grpo",
            "arch": arch,
            "dtype": str(next(switcher.model.parameters()).dtype).removeprefix("torch."),
            "lora_trainable_params": trainable,
            "episodes": sizes["queries_per_step"] * sizes["num_generations"],
            "seconds": round(seconds, 2),
            "reward": result.history[0].get("reward"),
            "grad_norm": grad_norm,
            **memory_stats(device),
        }
    )


def _tokens(
    pool: CandidatePool,
    *,
    policy: SwitchPolicy,
    queries: list[str],
    keys: list[str],
    max_new_tokens: int,
    together: bool = True,
) -> list:
    """Authors and patch tokens of switched generation over ``queries``: in one batch, or one at a time."""
    from switchrl.rollout import run_switch_generation

    batches = [list(range(len(queries)))] if together else [[i] for i in range(len(queries))]
    return [
        (t.authors, [p.token_ids for p in t.patches])
        for rows in batches
        for t in run_switch_generation(
            pool,
            policy,
            [queries[i] for i in rows],
            max_new_tokens,
            keys=[keys[i] for i in rows],
            batch_size=len(rows),
        )
    ]


def determinism(arch: str, device: str) -> None:
    from switchrl.backends.base import CandidateSampling
    from switchrl.backends.pool import CandidatePool
    from switchrl.backends.transformers_backend import TransformersBackend
    from switchrl.bench.setup import build_setup
    from switchrl.policies.baselines import RandomSwitcher

    sizes = DETERMINISM[arch]
    for dtype in ("float32", "bfloat16"):
        for temperature in (0.0, 1.0):
            setup = build_setup(sizes["arch"], 3, device, dtype, sampling=CandidateSampling(temperature))
            queries = setup.queries(8, sizes["prompt_len"], seed=5)
            keys = [f"det/q{i}" for i in range(len(queries))]  # one set of keys: the same draws in every run
            policy = RandomSwitcher(3, seed=0)
            apart = [
                TransformersBackend(b.name, b.model, b.tokenizer, sampling=b.sampling) for b in setup.backends
            ]
            pools = {
                "unfused": CandidatePool(apart, patch_tokens=sizes["patch_tokens"], seed=0, fuse=False),
                "fused": CandidatePool(setup.backends, patch_tokens=sizes["patch_tokens"], seed=0),
            }

            write = partial(
                _tokens, policy=policy, queries=queries, keys=keys, max_new_tokens=sizes["max_new_tokens"]
            )
            reference = write(pools["fused"])
            runs = {
                "rerun": write(pools["fused"]),
                "unfused": write(pools["unfused"]),
                "one_at_a_time": write(pools["fused"], together=False),
            }
            emit(
                {
                    "check": "determinism",
                    "arch": sizes["arch"],
                    "dtype": dtype,
                    "temperature": temperature,
                    "traces": len(queries),
                    "differ": {
                        name: sum(a != b for a, b in zip(run, reference)) for name, run in runs.items()
                    },
                }
            )
            del setup, pools, apart
            free(device)


CHECKS: dict[str, Callable[[str, str], None]] = {
    "simulate_memory": simulate_memory,
    "grpo": grpo,
    "determinism": determinism,
    "bench": bench,
}
"""In this order: the longest (``bench``) last, its lines printed as they come (a timeout keeps them)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(SIZES), default="8b")
    p.add_argument("--device", default=None, help="default: cuda for 8b (required), cpu for tiny")
    p.add_argument("--only", choices=sorted(CHECKS), action="append", help="run only these checks")
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.arch == "tiny" else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        emit(
            {
                "check": "machine",
                "ok": False,
                "error": f"device {device}: no CUDA device (use --tiny on a CPU)",
            }
        )
        return 1
    emit(machine(device))
    with contextlib.redirect_stdout(sys.stderr):
        failed = run_checks(args.only or list(CHECKS), args.arch, device)
    return 1 if failed else 0


def run_checks(names: list[str], arch: str, device: str) -> list[str]:
    """Run ``names`` in order, each whatever the others did; the names of those that raised."""
    failed = []
    for name in names:
        try:
            CHECKS[name](arch, device)
        except Exception as exc:  # every check runs; the exit status says one failed
            traceback.print_exc()
            emit({"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            failed.append(name)
        free(device)
    return failed


if __name__ == "__main__":
    sys.exit(main())

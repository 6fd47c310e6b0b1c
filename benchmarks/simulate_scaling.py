"""Simulated-rollout throughput (finishes/s) in-process and with 1..N Ray actors.

Each work item is one state (a query with an empty response so far); the worker runs ``estimate_utilities``
(|C| candidates x k finishes per state, batched, KV-forked), so finishes = states x |C| x k.
Prints one JSON line per setting with the speed-up over one actor. Actor start-up (model loading)
is excluded: each setting first runs a warm-up chunk on the same actors.

    python benchmarks/simulate_scaling.py --actors 1 2                 # tiny random models, CPU
    python benchmarks/simulate_scaling.py --models a b c --actors 1 2 4 --gpus-per-candidate 1 --placement spread
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from switchrl.executors import ExecutorConfig, WorkerContext, WorkerSpec, make_executor, run


@dataclass(frozen=True)
class State:
    id: str
    query: str


class UtilityWorker:
    """A candidate pool (one replica) that scores k random-switching finishes per candidate and state."""

    def __init__(self, config: dict, context: WorkerContext):
        from switchrl.backends import CandidatePool, CandidateSampling
        from switchrl.backends.transformers_backend import TransformersBackend

        devices = context.devices or ("cpu",) * len(config["models"])
        backends = [
            TransformersBackend.from_pretrained(
                f"c{i}", path, device=device, sampling=CandidateSampling(temperature=1.0)
            )
            for i, (path, device) in enumerate(zip(config["models"], devices))
        ]
        self.pool = CandidatePool(backends, patch_tokens=config["patch_tokens"], seed=config["seed"])
        self.k, self.max_new_tokens = config["k"], config["max_new_tokens"]

    def process(self, items: list[State]) -> list[dict]:
        from switchrl.backends import Trace
        from switchrl.policies import RandomSwitcher
        from switchrl.rollout import estimate_utilities

        states = [Trace(key=it.id, query=it.query, max_new_tokens=self.max_new_tokens) for it in items]
        est = estimate_utilities(
            self.pool,
            states,
            ["river"] * len(items),
            lambda q, r, ref, **m: float(ref in r),
            k=self.k,
            finisher=RandomSwitcher(len(self.pool), seed=self.pool.seed),
        )
        self.pool.release([s.key for s in states])
        return [
            {"id": it.id, "utilities": e.utilities, "finishes": sum(e.counts)} for it, e in zip(items, est)
        ]


def make_worker(config: dict, context: WorkerContext) -> UtilityWorker:
    return UtilityWorker(config, context)


def tiny_models(root: Path, n: int, hidden: int) -> list[str]:
    """``n`` random Llama checkpoints sharing the testbed tokenizer (no training, no downloads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from switchrl.testbed.tokenizer import build_tokenizer
    from switchrl.testbed.world import World

    tok = build_tokenizer(World(seed=0))
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        LlamaForCausalLM(cfg).save_pretrained(root / f"m{i}")
        tok.save_pretrained(root / f"m{i}")
        paths.append(str(root / f"m{i}"))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", help="candidate checkpoints (default: 3 tiny random Llamas)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny random models")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--local", action="store_true", help="also measure the in-process executor")
    ap.add_argument("--states", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--patch-tokens", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=2)
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    ap.add_argument("--gpus-per-candidate", type=float, default=0.0)
    ap.add_argument("--placement", choices=["pack", "spread"], default="pack")
    args = ap.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = args.models or tiny_models(root / "models", 3, args.hidden)
        spec = WorkerSpec(
            make_worker,
            {
                "models": models,
                "k": args.k,
                "patch_tokens": args.patch_tokens,
                "max_new_tokens": args.max_new_tokens,
                "seed": 0,
            },
            num_models=len(models),
        )
        words = ["the town", "a red river", "one two three", "the answer is"]
        items = [State(f"s{i}", words[i % len(words)]) for i in range(args.states)]
        if args.ray_address is None:
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        settings = (["local"] if args.local else []) + list(args.actors)
        base = None
        for setting in settings:
            config = (
                ExecutorConfig(executor="local")
                if setting == "local"
                else ExecutorConfig(
                    executor="ray",
                    ray_address=args.ray_address,
                    replicas=setting,
                    placement=args.placement,
                    gpus_per_candidate=args.gpus_per_candidate,
                )
            )
            with make_executor(config) as executor:
                warm = [State(f"warm{i}", "the town") for i in range(1 if setting == "local" else setting)]
                run(warm, spec, root / f"warm-{setting}", executor=executor, chunk_size=1, progress=False)
                start = time.perf_counter()
                store = run(
                    items,
                    spec,
                    root / f"run-{setting}",
                    executor=executor,
                    chunk_size=args.chunk_size,
                    progress=False,
                )
                seconds = time.perf_counter() - start
            finishes = sum(r["finishes"] for r in store.records())
            rate = finishes / seconds
            if setting == 1:
                base = rate
            print(
                json.dumps(
                    {
                        "executor": "local" if setting == "local" else "ray",
                        "actors": 1 if setting == "local" else setting,
                        "states": len(items),
                        "finishes": finishes,
                        "seconds": round(seconds, 3),
                        "finishes_per_s": round(rate, 2),
                        "speedup_vs_1_actor": round(rate / base, 3) if base else None,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()

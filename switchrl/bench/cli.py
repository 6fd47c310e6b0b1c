"""``switchrl bench`` / ``python -m switchrl.bench``: the options, parsed without importing torch."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from switchrl.bench.archs import ARCHS

BENCHMARKS = ("switch_vs_single", "switch_vs_reencode", "simulate_throughput", "dataset_throughput")
VLLM_BENCHMARKS = ("vllm_throughput",)  # need vLLM (its own environment), so not part of "all"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchrl bench", description=__doc__.splitlines()[0], add_help=add_help)
    p.add_argument("benchmark", choices=[*BENCHMARKS, *VLLM_BENCHMARKS, "all"])
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=None,
        help="switch_vs_single: 1,8,32; switch_vs_reencode: 1,8",
    )
    p.add_argument(
        "--queries", type=int, default=64, help="dataset_throughput, vllm_throughput: responses per path"
    )
    p.add_argument(
        "--max-batch",
        type=_int_list,
        default=[8],
        help="dataset_throughput: rows per forward pass (e.g. 8,32)",
    )
    p.add_argument("--states", type=_int_list, default=[1, 2, 4], help="simulate_throughput: states per call")
    p.add_argument("--k", type=int, default=32, help="simulate_throughput: finishes per candidate and state")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--patch-tokens", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per path; each path's best run is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(args: argparse.Namespace) -> int:
    """``switchrl bench NAME [options]``: prints one JSON line per measurement to stdout."""
    from switchrl.bench.dataset import dataset_throughput
    from switchrl.bench.measures import simulate_throughput, switch_vs_reencode, switch_vs_single
    from switchrl.bench.setup import build_setup

    if args.threads is not None:
        if args.threads <= 0:
            raise SystemExit(f"--threads must be > 0, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    setup = build_setup(args.arch, args.candidates, args.device, args.dtype, args.seed)
    names = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    common = dict(
        prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens,
        patch_tokens=args.patch_tokens,
        seed=args.seed,
        repeats=args.repeats,
    )
    if "switch_vs_single" in names:
        switch_vs_single(setup, batch_sizes=args.batch_sizes or (1, 8, 32), **common)
    if "switch_vs_reencode" in names:
        switch_vs_reencode(setup, batch_sizes=args.batch_sizes or (1, 8), **common)
    if "simulate_throughput" in names:
        simulate_throughput(setup, states=args.states, k=args.k, **common)
    if "dataset_throughput" in names:
        dataset_throughput(setup, queries=args.queries, batch_sizes=args.max_batch, **common)
    if "vllm_throughput" in names:
        from switchrl.bench.vllm_throughput import vllm_throughput

        vllm_throughput(setup, queries=args.queries, device=args.device, **common)
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m switchrl.bench`` and ``benchmarks/*.py``: parse ``argv`` (default: ``sys.argv``) and run."""
    return main(build_parser().parse_args(argv))

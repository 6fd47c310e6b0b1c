"""The ``switchrl`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML run config (see configs/)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from switchrl.generate import main

    return main(args)


def _cmd_testbed(args: argparse.Namespace) -> int:
    from switchrl.testbed import build_family, check_family, format_check

    family = build_family(seed=args.seed, out=args.out, force=getattr(args, "force", False))
    if args.testbed_cmd == "build":
        took = ", ".join(f"{k} {v:.0f} s" for k, v in family.build_seconds.items()) or "reused"
        print(f"testbed family (seed {family.seed}) at {family.root} ({took})")
        return 0
    metrics = check_family(family, n=args.n, n_label=args.n_label, k=args.k, n_schedule=args.n_schedule)
    print(format_check(metrics))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from switchrl.demo import run_demo

    return run_demo(seed=args.seed, out=args.out, n=args.n, quick=args.quick)


def _cmd_module(module: str, func: str = "main"):
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), func)(args)

    return run


def _add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["local", "ray"], help="override the config's executor")
    p.add_argument("--ray-address", help="auto, ray://host:port, or empty for a local Ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchrl", description="Switch Generation as reinforcement learning."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write switched responses and print who wrote each patch")
    _add_config(p)
    p.add_argument("--query", action="append", help="a query (repeatable)")
    p.add_argument("--jsonl", help="read queries from a JSONL task file instead")
    p.add_argument("--out", help="write the responses as JSONL here")
    p.add_argument("--switcher", help="override: random | round_robin | fixed:NAME | a saved switcher dir")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("testbed", help="build or check the small pretrained -> finetuned -> aligned family")
    tsub = p.add_subparsers(dest="testbed_cmd", required=True)
    for name in ("build", "check"):
        tp = tsub.add_parser(name)
        tp.add_argument("--seed", type=int, default=0)
        tp.add_argument("--out", help="family directory (default ~/.cache/switchrl/testbed/<seed>)")
        if name == "build":
            tp.add_argument("--force", action="store_true", help="rebuild even if a family is present")
        else:
            tp.add_argument("--n", type=int, default=300, help="test queries per task")
            tp.add_argument("--n-label", type=int, default=60, help="queries for the label policy")
            tp.add_argument(
                "--k", type=int, default=8, help="random finishes per candidate and state (label schedule)"
            )
            tp.add_argument(
                "--n-schedule", type=int, default=120, help="training queries for the label schedule"
            )
            tp.add_argument("--json", help="also write the metrics as JSON here")
        tp.set_defaults(func=_cmd_testbed)

    p = sub.add_parser(
        "demo", help="build the testbed, train the SFT switcher and print the comparison table"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--n", type=int, default=200, help="test queries per task")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for smoke tests)")
    p.set_defaults(func=_cmd_demo)

    for name, help_ in [
        ("simulate", "simulated rollouts: utilities and labels per state"),
        ("sft", "train the switcher on simulated rollouts (TRL SFTTrainer + LoRA)"),
        ("eval", "the comparison table: single models, random, untuned, SFT (and RL) switchers"),
        ("report", "an HTML page of an eval run: who wrote what"),
    ]:
        p = sub.add_parser(name, help=help_)
        _add_config(p, required=name != "report")
        if name in ("simulate", "eval"):
            _add_executor(p)
        if name == "report":
            p.add_argument("run_dir", help="an eval output directory")
        if name in ("sft",):
            p.add_argument("--report-to", choices=["none", "wandb", "tensorboard"], default=None)
        p.set_defaults(
            func=_cmd_module(
                f"switchrl.trainers.{name}" if name in ("simulate", "sft") else f"switchrl.{name}"
            )
        )

    p = sub.add_parser("rl", help="refine the switcher with RL (grpo | ppo | sb3-ppo)")
    _add_config(p)
    p.add_argument("--algo", choices=["grpo", "ppo", "sb3-ppo"], required=True)
    p.add_argument("--reward", action="append", help="a scorer: builtin name or module:function (repeatable)")
    p.add_argument("--report-to", choices=["none", "wandb", "tensorboard"], default=None)
    _add_executor(p)
    p.set_defaults(func=_cmd_module("switchrl.trainers.rl"))

    p = sub.add_parser("bench", help="throughput benchmarks (prints JSON lines with ratios)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("switchrl.bench", fromlist=["main"]).main(a.bench_args))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from switchrl.errors import SwitchRLError

    try:
        return int(args.func(args) or 0)
    except SwitchRLError as err:
        print(f"switchrl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

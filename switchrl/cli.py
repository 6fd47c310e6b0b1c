"""The ``switchrl`` command line: one sub-command per module, each module's ``main(args) -> int``.

Modules are imported only when their command runs, so ``switchrl --help`` stays fast. A
:class:`~switchrl.errors.SwitchRLError` (bad config, missing checkpoint, ...) prints one line and
exits 2; a run that fails its own checks exits non-zero from its ``main``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, str] = {
    "generate": "switchrl.generate",
    "testbed": "switchrl.testbed.cli",
    "demo": "switchrl.demo",
    "simulate": "switchrl.trainers.simulate",
    "sft": "switchrl.trainers.sft",
    "eval": "switchrl.eval",
    "report": "switchrl.report",
    "rl": "switchrl.trainers.rl",
    "plan": "switchrl.plan.cli",
    "bench": "switchrl.bench.cli",
}
"""Sub-command -> the module whose ``main(args: argparse.Namespace) -> int`` runs it."""


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML run config (see configs/)")


def _add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["local", "ray"], help="override the config's executor")
    p.add_argument("--ray-address", help="auto, ray://host:port, or empty for a local Ray")


def build_parser() -> argparse.ArgumentParser:
    from switchrl.bench.cli import build_parser as bench_parser

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

    p = sub.add_parser(
        "testbed",
        help="build or check the small pretrained -> finetuned -> aligned family, or the look-alike trio",
    )
    tsub = p.add_subparsers(dest="testbed_cmd", required=True)
    for name in ("build", "check"):
        tp = tsub.add_parser(name)
        tp.add_argument("--seed", type=int, default=0)
        tp.add_argument("--out", help="family directory (default: the cache, else the shipped family)")
        if name == "build":
            tp.add_argument("--force", action="store_true", help="rebuild even if a family is present")
            tp.add_argument(
                "--workers",
                type=int,
                default=None,
                help="SFT tries run at once on Ray, one core each (default: the free cores when Ray is "
                "installed, else 1); the weights do not depend on it",
            )
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
    tp = tsub.add_parser("lookalike", help="tiny checkpoints with the Llama-3.1 -> Tulu-3 trio's interfaces")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--out", help="build directory (default: ~/.cache/switchrl/lookalike/<seed>)")
    tp.add_argument("--force", action="store_true", help="rebuild even if a build is present")

    p = sub.add_parser("demo", help="the paper's recipe on the testbed family: prints the comparison table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--n", type=int, default=200, help="test queries per task")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for smoke tests)")

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
            again = p.add_mutually_exclusive_group()
            again.add_argument("--overwrite", action="store_true", help="start over in an existing out_dir")
            again.add_argument("--repair", action="store_true", help="recompute only corrupted shards' items")
        if name == "report":
            p.add_argument("run_dir", help="an eval output directory")
        if name == "sft":
            p.add_argument("--report-to", choices=["none", "wandb", "tensorboard"], default=None)

    p = sub.add_parser("rl", help="refine the switcher with RL (grpo | ppo | sb3-ppo)")
    _add_config(p)
    p.add_argument("--algo", choices=["grpo", "ppo", "sb3-ppo"], required=True)
    p.add_argument("--reward", action="append", help="a scorer: builtin name or module:function (repeatable)")
    p.add_argument("--report-to", choices=["none", "wandb", "tensorboard"], default=None)
    p.add_argument("--overwrite", action="store_true", help="delete rl.out_dir's previous run and start over")
    _add_executor(p)

    p = sub.add_parser("plan", help="memory per device of simulate / eval / rl, before loading any weights")
    _add_config(p)
    p.add_argument("--devices", help="device sizes, e.g. cuda:0=80GiB,cuda:1=80GiB (default: detect here)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--only", action="append", choices=["simulate", "eval", "rl"], help="plan only this command"
    )
    p.add_argument("--algo", choices=["grpo", "ppo", "sb3-ppo"], default="grpo", help="rl's algorithm")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default: from the longest task query)")
    p.add_argument("--hub-cache", help="look hub ids up in this Hugging Face cache (default: the hub's own)")

    sub.add_parser(
        "bench", parents=[bench_parser(add_help=False)], help="throughput benchmarks (JSON lines with ratios)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from switchrl.errors import CheckpointError, SwitchRLError, with_restart_hint
    from switchrl.utils.environment import offline_defaults

    offline_defaults()
    try:
        return int(importlib.import_module(COMMANDS[args.command]).main(args) or 0)
    except SwitchRLError as err:
        err = with_restart_hint(err) if isinstance(err, CheckpointError) else err
        print(f"switchrl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

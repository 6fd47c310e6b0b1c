"""Issue 18, item 3: a testbed task with headroom for RL over the paper's SFT, one command, one table.

    OMP_NUM_THREADS=1 python configs/experiments/headroom.py --task compositional --seed 0
    OMP_NUM_THREADS=1 python configs/experiments/headroom.py --task compositional --seed 0 --probe

The full run: simulate (k = 32 random finishes per candidate) -> SFT on those labels (this task's
states only) -> GRPO from the SFT switcher (cost 0) -> eval of the single models, the reference-patch
oracle, SFT and GRPO on 200 test queries x eval seeds 0 and 1. ``--probe`` is the cheap look before
investing in training: the single models, the oracle and random switching on 100 validation queries.
The table ends with the verdict against the target: SFT <= oracle - 10 (headroom), then GRPO >= SFT + 5
with non-overlapping 95% CIs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from switchrl.config import parse
from switchrl.experiments import Run, metric, table, timed_cpu
from switchrl.run_config import RunConfig
from switchrl.utils.threads import torch_threads

HERE = Path(__file__).resolve().parent
HEADROOM = 10.0  # SFT must sit this many points under the oracle for the task to count as having room
GAIN = 5.0  # and GRPO must beat SFT by this many points, CIs apart


def config_for(base: dict, task: str, seed: int, out: Path) -> RunConfig:
    """The experiment config for ``task`` on world ``seed``, every output under ``out``."""
    data = json.loads(json.dumps(base))
    data["testbed"]["seed"] = seed
    data["tasks"] = [{"source": "testbed", "task": task}]
    data["simulate"]["out_dir"] = str(out / "simulate")
    data["sft"]["out_dir"] = str(out / "sft")
    data["rl"].update(init=str(out / "sft"), out_dir=str(out / "rl"))
    data["eval"].update(
        out_dir=str(out / "eval"), sft_path=str(out / "sft"), rl_path=str(out / "rl" / "switcher")
    )
    return parse(RunConfig, data, str(HERE / "headroom.yaml"))


def verdict(rows: list[dict]) -> list[str]:
    """The target read off the rows (system -> accuracy, ci95): headroom, then GRPO's gain over SFT."""
    by = {r["system"]: r for r in rows}
    lines = []
    if "oracle" in by and "sft" in by:
        room = by["oracle"]["accuracy"] - by["sft"]["accuracy"]
        lines.append(
            f"headroom (oracle - sft) {room:+.1f}: {'met' if room >= HEADROOM else 'NOT met'} (>= {HEADROOM:g})"
        )
    if "sft" in by and "rl" in by:
        sft, rl = by["sft"], by["rl"]
        gain = rl["accuracy"] - sft["accuracy"]
        apart = rl["accuracy"] - rl["ci95"] > sft["accuracy"] + sft["ci95"]
        met = gain >= GAIN and apart
        lines.append(
            f"gain (rl - sft) {gain:+.1f}, CIs {'apart' if apart else 'overlap'}: "
            f"{'met' if met else 'NOT met'} (>= {GAIN:g}, CIs apart)"
        )
    return lines


def _rows(result, task: str, seconds: dict[str, float]) -> list[dict]:
    return [
        {"task": task, "system": s, **metric(m), "seconds": seconds.get(s)}
        for s, m in result.metrics[task].items()
    ]


def probe(task: str, seed: int, out: Path, n: int = 100) -> tuple[list[dict], dict]:
    """Singles, oracle and random switching on ``n`` validation queries: is there room, is there signal?"""
    from switchrl.eval import evaluate

    config = config_for(yaml.safe_load((HERE / "headroom.yaml").read_text()), task, seed, out)
    config.eval = config.eval.model_copy(
        update={
            "split": "validation",
            "limit": n,
            "seeds": [0],
            "systems": ["singles", "oracle", "random"],
            "out_dir": str(out / "probe"),
        }
    )
    result, wall, cpu = timed_cpu(evaluate, config, progress=False, overwrite=True)
    return _rows(result, task, {}), {"eval": (wall, cpu)}


def pipeline(task: str, seed: int, out: Path, quick: bool = False) -> tuple[list[dict], dict]:
    """Simulate -> SFT -> GRPO from SFT -> eval: the rows (seconds = simulate + the training a system
    needed, wall clock) and each stage's (wall, CPU) seconds."""
    from switchrl.eval import evaluate
    from switchrl.trainers.rl import train
    from switchrl.trainers.sft import train_sft
    from switchrl.trainers.simulate import simulate

    base = yaml.safe_load((HERE / "headroom.yaml").read_text())
    if quick:  # a smoke run of the whole pipeline (seconds, not a measurement)
        base["simulate"].update(limit=6, k=4)
        base["sft"].update(max_steps=4, drop_all_equal=False)
        base["rl"].update(steps=2, queries_per_step=2)
        base["eval"].update(limit=4, seeds=[0])
    config = config_for(base, task, seed, out)
    stages: dict[str, tuple[float, float]] = {}
    store, *stages["simulate"] = timed_cpu(simulate, config, progress=False, overwrite=True)
    _, *stages["sft"] = timed_cpu(train_sft, config, store.records())
    _, *stages["grpo"] = timed_cpu(train, config, "grpo", overwrite=True)
    result, *stages["eval"] = timed_cpu(evaluate, config, progress=False, overwrite=True)
    t_sim, t_sft, t_rl = (stages[s][0] for s in ("simulate", "sft", "grpo"))
    return _rows(result, task, {"sft": t_sim + t_sft, "rl": t_sim + t_sft + t_rl}), stages


def stage_table(stages: dict) -> str:
    lines = ["| stage | wall s | CPU s |", "| --- | --- | --- |"]
    lines += [f"| {name} | {wall:.0f} | {cpu:.0f} |" for name, (wall, cpu) in stages.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="compositional", help="testbed task")
    parser.add_argument("--seed", type=int, default=0, help="testbed world seed")
    parser.add_argument("--out", default=None, help="default: runs/experiments/headroom/<task>/seed<S>")
    parser.add_argument("--probe", action="store_true", help="singles, oracle, random on validation only")
    parser.add_argument("--n-probe", type=int, default=100, help="validation queries of --probe")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run with tiny sizes (not a measurement)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    out = Path(args.out or f"runs/experiments/headroom/{args.task}/seed{args.seed}")
    with Run(out, vars(args)) as run, torch_threads(args.threads):
        if args.probe:
            rows, stages = probe(args.task, args.seed, out, args.n_probe)
        else:
            rows, stages = pipeline(args.task, args.seed, out, args.quick)
    what = (
        f"probe, {args.n_probe} validation queries" if args.probe else "test, 200 queries x eval seeds 0, 1"
    )
    run.finish(
        rows,
        "\n\n".join([table(rows, key="task"), stage_table(stages), "\n".join(verdict(rows))]),
        f"world seed {args.seed}, task {args.task}, {what}, torch threads {args.threads}",
        record="probe.json" if args.probe else "headroom.json",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

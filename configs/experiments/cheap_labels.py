"""Issue 18, item 2: cheap labels + RL on the testbed, one command, one table and one figure.

    OMP_NUM_THREADS=1 python configs/experiments/cheap_labels.py --seed 0

SFT from labels of k = 4, 8 and 32 random finishes per candidate and state, GRPO from SFT(k = 4) and
GRPO from the untuned switcher, each against the seconds it cost: simulate + every training it needed
(GRPO from SFT(4): simulate(4) + SFT(4) + GRPO). Each k gets its own simulate run, timed: the
finishes are nested (finish j of a state and candidate is seeded by its key ``.../c<i>/f<j>``, not by
k, so a k = 4 run's finishes are the first 4 of a k = 32 run's; tests/test_cheap_labels.py checks it),
so one simulate at k = 32 could give every k's labels, but not every k's seconds. Seconds are wall-clock
and CPU (``time.process_time``, one torch thread): the machine is shared, CPU seconds compare fairly.

The target: SFT(4) + GRPO within 2 points of SFT(32) at <= 60% of its (CPU) seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import yaml

from switchrl.config import parse
from switchrl.experiments import Run, add_cpu_column, metric, table, timed, timed_cpu
from switchrl.run_config import RunConfig
from switchrl.utils.threads import torch_threads

HERE = Path(__file__).resolve().parent
TASK = "compositional"
MARGIN, SHARE = 2.0, 0.6  # the target: within 2 points of SFT(k_max) at <= 60% of its seconds


def config_for(base: dict, seed: int, out: Path, k: int) -> RunConfig:
    """The experiment config with this world seed, ``simulate.k = k`` and SFT(k)'s directories."""
    data = json.loads(json.dumps(base))
    data["testbed"]["seed"] = seed
    data["simulate"].update(out_dir=str(out / f"simulate-k{k}"), k=k)
    data["sft"]["out_dir"] = str(out / f"sft-k{k}")
    data["eval"]["out_dir"] = str(out / "eval")
    return parse(RunConfig, data, str(HERE / "cheap_labels.yaml"))


def seconds(stages: dict[str, tuple[float, float]], ks: list[int]) -> dict[str, tuple[float, float]]:
    """Per trained system, (wall, CPU) seconds of every stage it needed, from the stages' own times
    (``sim-k<k>``, ``sft-k<k>``, ``grpo-sft-k<k_min>``, ``grpo-untuned``)."""

    def total(*names: str) -> tuple[float, float]:
        return sum(stages[n][0] for n in names), sum(stages[n][1] for n in names)

    out = {f"sft-k{k}": total(f"sim-k{k}", f"sft-k{k}") for k in ks}
    k0 = min(ks)
    out[f"grpo-sft-k{k0}"] = total(f"sim-k{k0}", f"sft-k{k0}", f"grpo-sft-k{k0}")
    out["grpo-untuned"] = total("grpo-untuned")
    return out


def verdict(rows: list[dict], ks: list[int]) -> dict:
    """GRPO from SFT(k_min) against SFT(k_max): points behind, share of seconds, and whether the target
    holds (on CPU seconds; the wall-clock share is reported beside it)."""
    by = {r["system"]: r for r in rows}
    rl, ref = by[f"grpo-sft-k{min(ks)}"], by[f"sft-k{max(ks)}"]
    behind = ref["accuracy"] - rl["accuracy"]
    cpu_share = rl["cpu_seconds"] / ref["cpu_seconds"]
    return {
        "points_behind": behind,
        "cpu_share": cpu_share,
        "wall_share": rl["seconds"] / ref["seconds"],
        "met": behind <= MARGIN and cpu_share <= SHARE,
    }


def experiment(
    seed: int, out: Path, ks: list[int], quick: bool = False, rl_steps: int | None = None
) -> tuple[list[dict], dict]:
    """The table's rows (baselines, SFT per k, both GRPO runs of ``rl_steps``, default the config's)."""
    from switchrl.eval import evaluate
    from switchrl.trainers.rl import train
    from switchrl.trainers.sft import train_sft
    from switchrl.trainers.simulate import simulate

    base = yaml.safe_load((HERE / "cheap_labels.yaml").read_text())
    if rl_steps is not None:
        base["rl"]["steps"] = rl_steps
    if quick:  # a smoke run of the whole pipeline (seconds, not a measurement)
        base["simulate"]["limit"] = 6
        base["sft"].update(max_steps=4, drop_all_equal=False)
        base["rl"].update(steps=2, queries_per_step=2)
        base["eval"].update(limit=4, seeds=[0])
    stages: dict[str, tuple[float, float]] = {}
    for k in ks:
        config = config_for(base, seed, out, k)
        store, *stages[f"sim-k{k}"] = timed_cpu(simulate, config, progress=False, overwrite=True)
        _, *stages[f"sft-k{k}"] = timed_cpu(train_sft, config, store.records())
        print(
            f"k = {k}: simulate {stages[f'sim-k{k}'][0]:.0f} s, sft {stages[f'sft-k{k}'][0]:.0f} s",
            flush=True,
        )
    k0 = min(ks)
    config = config_for(base, seed, out, k0)
    for name, init in ((f"grpo-sft-k{k0}", out / f"sft-k{k0}"), ("grpo-untuned", None)):
        config.rl = config.rl.model_copy(
            update={"init": init and str(init), "out_dir": str(out / "rl" / name)}
        )
        _, *stages[name] = timed_cpu(train, config, "grpo", overwrite=True)
        link = out / name  # eval names a switcher directory by its basename: one per GRPO run
        link.unlink(missing_ok=True)
        link.symlink_to(Path("rl") / name / "switcher")
        print(f"{name}: {stages[name][0]:.0f} s", flush=True)
    trained = [f"sft-k{k}" for k in ks] + [f"grpo-sft-k{k0}", "grpo-untuned"]
    config.eval.systems = [*config.eval.systems, *(str(out / s) for s in trained)]
    result, _ = timed(evaluate, config, progress=False, overwrite=True)
    cost = seconds(stages, ks)
    rows = []
    for system, m in result.metrics[TASK].items():
        wall, cpu = cost.get(system, (None, None))
        k = int(system.rsplit("k", 1)[1]) if system.startswith(("sft-k", "grpo-sft-k")) else None
        rows.append({"k": k, "system": system, **metric(m), "seconds": wall, "cpu_seconds": cpu})
    return rows, {"stages": stages, "metrics": result.metrics[TASK]}


def figure(metrics: dict, rows: list[dict], path: Path) -> None:
    """Accuracy against CPU seconds of the trained systems (switchrl.report_figures' chart) as a PNG."""
    from switchrl.report_figures import seconds_chart

    cpu = {(TASK, r["system"]): r["cpu_seconds"] for r in rows if r["cpu_seconds"] is not None}
    png = seconds_chart({TASK: metrics}, cpu, xlabel="CPU seconds (simulate + training)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(png))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="testbed world seed")
    parser.add_argument(
        "--ks", default="4,8,32", help="comma-separated label budgets k (GRPO from the least)"
    )
    parser.add_argument("--out", default=None, help="default: runs/experiments/cheap_labels/seed<S>")
    parser.add_argument("--figure", default=None, help="default: <out>/accuracy_vs_seconds.png")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run with tiny sizes (not a measurement)"
    )
    parser.add_argument("--rl-steps", type=int, default=None, help="GRPO steps (default: the config's, 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    ks = sorted(int(k) for k in args.ks.split(","))
    out = Path(args.out or f"runs/experiments/cheap_labels/seed{args.seed}")
    with (
        Run(out, {"seed": args.seed, "ks": ks, "rl_steps": args.rl_steps}) as run,
        torch_threads(args.threads),
    ):
        rows, extra = experiment(args.seed, out, ks, args.quick, args.rl_steps)
    v = verdict(rows, ks)
    figure(extra["metrics"], rows, Path(args.figure or out / "accuracy_vs_seconds.png"))
    run.finish(
        [*rows, {"stages": extra["stages"], "verdict": v}],
        add_cpu_column(table(rows, key="k", key_title="labels k"), rows),
        f"world seed {args.seed}, task {TASK}, k {ks}, GRPO steps {args.rl_steps or 'as configured'}, "
        f"torch threads {args.threads}; "
        f"GRPO from SFT(k={min(ks)}) is {v['points_behind']:.1f} points behind SFT(k={max(ks)}) at "
        f"{100 * v['cpu_share']:.0f}% of its CPU seconds ({100 * v['wall_share']:.0f}% wall): "
        f"target {'met' if v['met'] else 'NOT met'}",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

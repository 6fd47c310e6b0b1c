"""Issue 18, item 1: the cost-aware switching sweep on the testbed, one command, one table.

    OMP_NUM_THREADS=1 python configs/experiments/cost_sweep.py --costs 0,0.05,0.1 --seed 0

For each cost c: SFT on cost-aware labels (utilities = mean over the k finishes of score - c x
author changes), GRPO from that SFT switcher with ``rl.switch_cost: c``, eval of both; the
candidates alone and the reference-patch oracle are evaluated once. Simulate runs ONCE, at the
largest cost: ``simulate.switch_cost`` only changes the label arithmetic (the random finishes are
the same), and each record keeps per candidate its mean author changes, so the utilities of any
other cost are ``u(c) = u(c_sim) + (c_sim - c) x switches`` (rounded to 12 digits so exact ties stay
ties) and its labels follow with the same seeded tie-break as ``switchrl simulate``.

The paper's SFT switcher (cost 0 labels) is trained and evaluated once, with the baselines. Two
variants found necessary by the measurements in docs/rl-experiments.md: ``--labels decisive`` trains
the cost-aware SFT only on states whose scores differ, ``--rl-from paper`` starts GRPO from the paper's
SFT switcher instead of the cost's own.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from switchrl.config import parse
from switchrl.experiments import Run, metric, table, timed_cpu
from switchrl.run_config import ResolvedRun, RunConfig
from switchrl.trainers.simulate import argmax_label
from switchrl.utils.threads import torch_threads

HERE = Path(__file__).resolve().parent
PAPER_SFT = "sft-cost0"  # the paper's SFT switcher: GRPO's start with --rl-from paper
COLLAPSED = 0.1  # switches per response below this: the run writes with one checkpoint (measured 0.00-0.06)
DIGITS = 12  # utilities are means of k numbers of a few decimals: 12 digits keep ties, drop float noise


def relabel(records: list[dict], cost: float, seed: int) -> list[dict]:
    """``records`` (simulated at some cost > 0, so ``switches`` is recorded) labelled at ``cost``."""
    out = []
    for r in records:
        if r.get("switches") is None:
            raise ValueError(f"record {r['id']}: no switches recorded (simulate with a switch_cost > 0)")
        base = r["switch_cost"]
        utilities = [round(u + (base - cost) * w, DIGITS) for u, w in zip(r["utilities"], r["switches"])]
        label, tie = argmax_label(utilities, seed, r["id"])
        out.append(
            {
                **r,
                "utilities": utilities,
                "label": label,
                "label_name": r["candidates"][label],
                "tie": tie,
                "all_equal": len(set(utilities)) == 1,
                "switch_cost": cost,
            }
        )
    return out


def config_for(base: dict, seed: int, out: Path, cost: float, sim_cost: float, rl_from: str) -> RunConfig:
    """The experiment config with this seed, these output directories and both switch costs."""
    data = json.loads(json.dumps(base))
    d = out / f"cost{cost:g}"
    data["testbed"]["seed"] = seed
    data["simulate"].update(out_dir=str(out / "simulate"), switch_cost=sim_cost)
    data["sft"]["out_dir"] = str(d / "sft")
    init = out / PAPER_SFT if rl_from == "paper" else d / "sft"
    data["rl"].update(init=str(init), switch_cost=cost, out_dir=str(d / "rl"))
    data["eval"].update(out_dir=str(d / "eval"), sft_path=str(d / "sft"), rl_path=str(d / "rl" / "switcher"))
    return parse(RunConfig, data, str(HERE / "cost_sweep.yaml"))


def rl_variant(config: RunConfig, algo: str, rl_seed: int, overrides: dict, split: str) -> RunConfig:
    """``config`` for one RL run: ``algo`` with GRPO/PPO seed ``rl_seed`` and the ``rl.*`` overrides, in
    its own directory (named by all three), evaluated alone on ``split``."""
    cost_dir = Path(config.rl.out_dir).parent
    name = variant_name(algo, overrides) + f"-seed{rl_seed}"
    data = config.model_dump(mode="json")
    data["rl"].update(overrides, seed=rl_seed, out_dir=str(cost_dir / name))
    data["eval"].update(
        split=split,
        systems=["rl"],
        rl_path=str(cost_dir / name / "switcher"),
        out_dir=str(cost_dir / f"eval-{name}-{split}"),
    )
    return parse(RunConfig, data, str(HERE / "cost_sweep.yaml"))


def variant_name(algo: str, overrides: dict) -> str:
    """``grpo``, ``grpo-switch_cost_warmup_steps20``, ...: the algorithm and its ``rl.*`` overrides."""
    return "-".join([algo, *(f"{k}{v}" for k, v in sorted(overrides.items()))])


class Stages:
    """Each stage's (wall, CPU) seconds, kept in ``<out>/stages.json``. With ``resume`` a stage recorded
    there keeps the seconds of the run that did its work (the rerun only reloads its outputs), and one
    with a ``done`` directory already there is not run again (retraining would change its files)."""

    def __init__(self, out: Path, resume: bool):
        self.path, self.resume, self.overwrite = out / "stages.json", resume, not resume
        self.times = json.loads(self.path.read_text()) if resume and self.path.is_file() else {}

    def run(self, name: str, fn: Callable[..., Any], *args: Any, done: Path | None = None, **kw: Any):
        """``(result, wall, cpu)`` of the stage (``result`` None when skipped as done)."""
        if self.resume and name in self.times and done is not None and done.exists():
            return (None, *self.times[name])
        result, wall, cpu = timed_cpu(fn, *args, **kw)
        self.times.setdefault(name, [wall, cpu])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.times, indent=1))
        return (result, *self.times[name])


def decisive(records: list[dict], seed: int) -> list[dict]:
    """The records whose scores alone (cost 0) tell the candidates apart: any cost > 0 makes nearly every
    state unequal (a candidate that continues the prefix's author saves a switch), measured 209 of 240."""
    return [r for r, free in zip(records, relabel(records, 0.0, seed)) if not free["all_equal"]]


def sweep(
    costs: list[float],
    seed: int,
    out: Path,
    labels: str = "cost",
    rl_from: str = "sft",
    quick: bool = False,
    algos: Sequence[str] = ("grpo",),
    rl_seeds: Sequence[int] | None = None,
    variants: Sequence[dict] = ({},),
    splits: Sequence[str] = ("test",),
    resume: bool = False,
    sim_cost: float | None = None,
) -> list[dict]:
    """The table's rows. ``labels``: cost (every state, as `switchrl simulate` labels it), decisive (only
    states whose scores differ) or none (no cost-aware SFT); ``rl_from``: sft (the cost's own SFT
    switcher) or paper (cost 0); per cost, each of ``algos`` (grpo, ppo, sb3-ppo: SB3 trains its own
    policy, from no SFT) once per seed of ``rl_seeds`` and per ``variants`` (``rl.*`` overrides); every system is
    evaluated on each of ``splits`` (the baselines' singles and oracle on test only)."""
    from switchrl.eval import evaluate
    from switchrl.trainers.rl import train
    from switchrl.trainers.sft import train_sft
    from switchrl.trainers.simulate import simulate

    base = yaml.safe_load((HERE / "cost_sweep.yaml").read_text())
    if quick:  # a smoke run of the whole pipeline (seconds, not a measurement)
        base["simulate"].update(limit=6, k=4)
        base["sft"].update(max_steps=4, drop_all_equal=False)
        base["rl"].update(steps=2, queries_per_step=2)
        base["rl"]["sb3"] = {"total_timesteps": 16, "n_steps": 8, "batch_size": 8, "num_envs": 2}
        base["eval"]["limit"] = 4
    rl_seeds = list(rl_seeds) if rl_seeds is not None else [base["rl"]["seed"]]
    stages = Stages(out, resume)
    sim_cost = sim_cost or (max(costs) if max(costs) > 0 else 0.05)  # any cost > 0 records the switches
    first = config_for(base, seed, out, 0.0, sim_cost, rl_from)
    store, t_sim, c_sim = stages.run("simulate", simulate, first, progress=False, overwrite=stages.overwrite)
    records = store.records()
    gen_seed = ResolvedRun(first).generation.seed
    paper = first.model_copy(deep=True)  # the paper's SFT (cost 0 labels), evaluated with the baselines
    paper.sft.out_dir = paper.eval.sft_path = str(out / PAPER_SFT)
    _, t_paper, c_paper = stages.run(
        PAPER_SFT, train_sft, paper, relabel(records, 0.0, gen_seed), done=out / PAPER_SFT
    )
    rows: list[dict] = []

    def add(
        split: str, cost: float | None, system: str, m: dict, wall: float | None, cpu: float | None
    ) -> None:
        rows.append(
            {"split": split, "cost": cost, "system": system, **metric(m), "seconds": wall, "cpu": cpu}
        )

    for split in splits:
        paper.eval.split = split
        paper.eval.systems = ["singles", "oracle", "sft"] if split == "test" else ["sft"]
        paper.eval.out_dir = str(out / "baselines" / ("eval" if split == "test" else f"eval-{split}"))
        result, _, _ = stages.run(
            f"eval-baselines-{split}", evaluate, paper, progress=False, overwrite=stages.overwrite
        )
        for s, m in result.metrics["compositional"].items():
            sft = s == "sft"
            add(
                split,
                None,
                "sft (cost 0)" if sft else s,
                m,
                t_sim + t_paper if sft else None,
                c_sim + c_paper if sft else None,
            )
    try:  # Ctrl-C: the table of the runs finished so far
        for cost in costs:
            config = config_for(base, seed, out, cost, sim_cost, rl_from)
            t_start, c_start = (t_sim + t_paper, c_sim + c_paper) if rl_from == "paper" else (0.0, 0.0)
            if labels != "none":
                labelled = relabel(records, cost, gen_seed)
                train_on = decisive(labelled, gen_seed) if labels == "decisive" else labelled
                _, t_sft, c_sft = stages.run(
                    f"sft-cost{cost:g}", train_sft, config, train_on, done=Path(config.sft.out_dir)
                )
                if rl_from == "sft":
                    t_start, c_start = t_sim + t_sft, c_sim + c_sft
                for split in splits:
                    config.eval.split, config.eval.systems = split, ["sft"]
                    config.eval.out_dir = str(Path(config.rl.out_dir).parent / f"eval-sft-{split}")
                    result, _, _ = stages.run(
                        f"eval-sft-cost{cost:g}-{split}",
                        evaluate,
                        config,
                        progress=False,
                        overwrite=stages.overwrite,
                    )
                    add(
                        split,
                        cost,
                        "sft",
                        result.metrics["compositional"]["sft"],
                        t_sim + t_sft,
                        c_sim + c_sft,
                    )
            for algo, overrides, rl_seed in itertools.product(algos, variants, rl_seeds):
                run = rl_variant(config, algo, rl_seed, overrides, splits[0])
                name = f"cost{cost:g}/{Path(run.rl.out_dir).name}"
                done = Path(run.rl.out_dir) / "rl_log.json"  # written last, by every trainer
                _, t_rl, c_rl = stages.run(name, train, run, algo, done=done, overwrite=stages.overwrite)
                wall, cpu = (t_rl, c_rl) if algo == "sb3-ppo" else (t_start + t_rl, c_start + c_rl)
                print(f"{name}: {t_rl:.0f} s wall, {c_rl:.0f} s CPU", flush=True)
                for split in splits:
                    run = rl_variant(config, algo, rl_seed, overrides, split)
                    result, _, _ = stages.run(
                        f"{name}-eval-{split}", evaluate, run, progress=False, overwrite=stages.overwrite
                    )
                    label = f"{variant_name(algo, overrides)} (seed {rl_seed})"
                    add(split, cost, label, result.metrics["compositional"]["rl"], wall, cpu)
    except KeyboardInterrupt:
        print("interrupted: the table holds the runs finished so far", flush=True)
    print(f"simulate (once, at cost {sim_cost:g}, {len(records)} states): {t_sim:.0f} s", flush=True)
    return rows


def summary(rows: Sequence[dict]) -> list[dict]:
    """Per split, cost and RL variant run with several seeds: mean and sd (n - 1) of accuracy and switches,
    and how many runs collapsed onto one checkpoint (fewer than ``COLLAPSED`` switches per response)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if " (seed " in r["system"]:
            groups.setdefault((r["split"], r["cost"], r["system"].split(" (seed ")[0]), []).append(r)
    out = []
    for (split, cost, variant), runs in groups.items():
        if len(runs) < 2:
            continue
        acc, sw = [r["accuracy"] for r in runs], [r["switches"] for r in runs]
        out.append(
            {
                "split": split,
                "cost": cost,
                "variant": variant,
                "seeds": len(runs),
                "accuracy": statistics.mean(acc),
                "accuracy_sd": statistics.stdev(acc),
                "switches": statistics.mean(sw),
                "switches_sd": statistics.stdev(sw),
                "collapsed": sum(s < COLLAPSED for s in sw),
            }
        )
    return out


def select(summaries: Sequence[dict], sft_switches: float, fewer: float = 0.4) -> dict | None:
    """The validation summary to report: the most accurate (mean) of those with at least ``fewer`` x
    fewer switches than the paper's SFT on validation; None when none has."""
    ok = [s for s in summaries if s["split"] == "validation" and s["switches"] <= (1 - fewer) * sft_switches]
    return max(ok, key=lambda s: s["accuracy"], default=None)


def report(rows: Sequence[dict]) -> str:
    """The printed text: per split the rows' table and the CPU seconds, then the seed summaries and the
    validation choice."""
    parts = []
    for split in dict.fromkeys(r["split"] for r in rows):
        mine = [r for r in rows if r["split"] == split]
        parts += [
            f"split {split}:",
            table(mine),
            "",
            "| cost | system | wall s | CPU s |",
            "| --- | --- | --- | --- |",
        ]
        parts += [
            f"| {'–' if r['cost'] is None else format(r['cost'], 'g')} | {r['system']} | {r['seconds']:.0f} | {r['cpu']:.0f} |"
            for r in mine
            if r["seconds"] is not None
        ]
        parts.append("")
    sums = summary(rows)
    if sums:
        parts += [
            "| split | cost | variant | seeds | accuracy mean ± sd | switches mean ± sd | collapsed |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        parts += [
            f"| {s['split']} | {s['cost']:g} | {s['variant']} | {s['seeds']} | {s['accuracy']:.1f} ± {s['accuracy_sd']:.1f} "
            f"| {s['switches']:.2f} ± {s['switches_sd']:.2f} | {s['collapsed']} |"
            for s in sums
        ]
        sft = [r["switches"] for r in rows if r["split"] == "validation" and r["system"] == "sft (cost 0)"]
        if sft:
            chosen = select(sums, sft[0])
            parts.append(
                "\nselected on validation (most accurate with >= 40% fewer switches than SFT): "
                + (f"cost {chosen['cost']:g} {chosen['variant']}" if chosen else "none")
            )
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", default="0,0.05,0.1", help="comma-separated switch costs")
    parser.add_argument("--seed", type=int, default=0, help="testbed world seed")
    parser.add_argument("--out", default=None, help="default: runs/experiments/cost_sweep/seed<S>")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run with tiny sizes (not a measurement)"
    )
    parser.add_argument(
        "--labels", choices=["cost", "decisive", "none"], default="cost", help="SFT states: see sweep()"
    )
    parser.add_argument(
        "--rl-from", choices=["sft", "paper"], default="sft", help="GRPO's start: see sweep()"
    )
    parser.add_argument("--algos", default="grpo", help="comma-separated: grpo, ppo, sb3-ppo")
    parser.add_argument(
        "--rl-seeds", default=None, help="comma-separated RL seeds (default: the config's, 0)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="KEY=VALUE,...",
        help="RL variant: rl.KEY overrides (YAML values); repeat for several, '' = none (default)",
    )
    parser.add_argument("--splits", default="test", help="comma-separated eval splits, e.g. validation,test")
    parser.add_argument("--resume", action="store_true", help="reuse the finished stages of a run in --out")
    parser.add_argument(
        "--sim-cost",
        type=float,
        default=None,
        help="simulate's switch cost (default: the largest of --costs)",
    )
    parser.add_argument(
        "--figure", default=None, help="write the accuracy-switches frontier (test) as this PNG"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    costs = [float(c) for c in args.costs.split(",")]
    if args.labels == "none" and args.rl_from != "paper":
        parser.error("--labels none trains no cost-aware SFT: RL must start from --rl-from paper")
    variants = [
        {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in spec.split(",") if o)}
        for spec in args.variant or [""]
    ]
    rl_seeds = [int(s) for s in args.rl_seeds.split(",")] if args.rl_seeds else None
    out = Path(args.out or f"runs/experiments/cost_sweep/seed{args.seed}")
    record = {"seed": args.seed, "costs": costs, "argv": sys.argv[1:]}
    with Run(out, record) as run, torch_threads(args.threads):
        rows = sweep(
            costs,
            args.seed,
            out,
            args.labels,
            args.rl_from,
            args.quick,
            args.algos.split(","),
            rl_seeds,
            variants,
            args.splits.split(","),
            args.resume,
            args.sim_cost,
        )
    if args.figure:
        write_frontier(rows, Path(args.figure), f"compositional, world seed {args.seed}, test")
    run.finish(
        rows,
        report(rows),
        f"world seed {args.seed}, task compositional, costs {costs}, labels {args.labels}, "
        f"RL from {args.rl_from} SFT, algos {args.algos}, RL seeds {rl_seeds or 'config'}, RL variants "
        f"{variants}, torch threads {args.threads}",
    )
    return 0


def write_frontier(rows: Sequence[dict], path: Path, title: str) -> None:
    """The accuracy-switches frontier of the test rows (``switchrl.report_figures``) as a PNG."""
    from switchrl.report_figures import frontier_chart

    metrics = {
        title: {
            r["system"] if r["cost"] is None else f"{r['system']} c={r['cost']:g}": {
                "accuracy": r["accuracy"] / 100,
                "ci95": r["ci95"] / 100,
                "switches": r["switches"],
            }
            for r in rows
            if r["split"] == "test"
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(frontier_chart(metrics)))


if __name__ == "__main__":
    raise SystemExit(main())

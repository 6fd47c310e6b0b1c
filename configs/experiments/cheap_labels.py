"""Issue 18, item 2: cheap labels + RL on the testbed, one command, one table and one figure.

    OMP_NUM_THREADS=1 python configs/experiments/cheap_labels.py --seed 0 \
        --curve 2,4,6,8,12,16,24,32,50 --splits validation,test --variant learning_rate=0.005

SFT from labels of k = 4, 8 and 32 random finishes per candidate and state, GRPO from SFT(k = 4) and
GRPO from the untuned switcher, each against the seconds it cost: simulate + every training it needed
(GRPO from SFT(4): simulate(4) + SFT(4) + GRPO). Each k gets its own simulate run, timed: the
finishes are nested (finish j of a state and candidate is seeded by its key ``.../c<i>/f<j>``, not by
k, so a k = 4 run's finishes are the first 4 of a k = 32 run's; tests/test_cheap_labels.py checks it),
so one simulate at k = 32 could give every k's labels, but not every k's seconds. Seconds are wall-clock
and CPU (``time.process_time``, one torch thread): the machine is shared, CPU seconds compare fairly.

GRPO's learning curve: one run from SFT(4) to the last ``--curve`` step, each listed step's checkpoint
made a switcher and charged the seconds up to that step (the run's per-step clock). ``--variant``
(``rl.*`` overrides) adds GRPO runs evaluated on validation only; the GRPO point chosen on validation
within the budget is the one evaluated on test.

The target: SFT(4) + GRPO within 2 points of SFT(32) at <= 60% of its (CPU) seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
from pathlib import Path

import yaml

from switchrl.config import parse
from switchrl.experiments import (
    Run,
    add_cpu_column,
    metric,
    quick_sizes,
    seconds_table,
    table,
    timed,
    timed_cpu,
)
from switchrl.run_config import RLSection, RunConfig
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
    """(wall, CPU) seconds of every stage SFT(k) needed (``sim-k<k>`` + ``sft-k<k>``) and of GRPO from
    untuned (its stage alone), from the stages' own times; GRPO from SFT(k) adds SFT(k)'s to its curve's."""
    out = {f"sft-k{k}": tuple(a + b for a, b in zip(stages[f"sim-k{k}"], stages[f"sft-k{k}"])) for k in ks}
    return {**out, "grpo-untuned": stages["grpo-untuned"]} if "grpo-untuned" in stages else out


def curve_seconds(
    stage: tuple[float, float], clock: list[dict], steps: list[int]
) -> dict[int, tuple[float, float]]:
    """(wall, CPU) seconds of a GRPO stage up to the end of each step in ``steps``: the whole stage less
    what its clock (``rl_log.json``) measured after that step, so set-up and saving stay charged."""
    by, last = {c["step"]: c for c in clock}, clock[-1]
    return {
        n: (stage[0] - last["wall"] + by[n]["wall"], stage[1] - last["cpu"] + by[n]["cpu"]) for n in steps
    }


def verdict(rows: list[dict], system: str, ref: str) -> dict:
    """``system`` against ``ref`` (rows of one split): points behind, share of seconds, and whether the
    target holds (on CPU seconds; the wall-clock share is reported beside it)."""
    by = {r["system"]: r for r in rows}
    rl, base = by[system], by[ref]
    behind = base["accuracy"] - rl["accuracy"]
    cpu_share = rl["cpu_seconds"] / base["cpu_seconds"]
    return {
        "system": system,
        "points_behind": behind,
        "cpu_share": cpu_share,
        "wall_share": rl["seconds"] / base["seconds"],
        "met": behind <= MARGIN and cpu_share <= SHARE,
    }


def first_within(rows: list[dict], curve: list[str], ref: str) -> str | None:
    """The first point of ``curve`` (systems in step order) within ``MARGIN`` points of ``ref``."""
    by = {r["system"]: r for r in rows}
    return next((s for s in curve if by[s]["accuracy"] >= by[ref]["accuracy"] - MARGIN), None)


def select(rows: list[dict], points: list[str], budget: float) -> str | None:
    """The GRPO point chosen on validation rows: the most accurate of ``points`` whose CPU seconds fit
    ``budget`` (ties: the cheaper); None when none fits."""
    fits = [r for r in rows if r["system"] in points and r["cpu_seconds"] <= budget]
    return min(fits, key=lambda r: (-r["accuracy"], r["cpu_seconds"]))["system"] if fits else None


def variant_name(run: str, overrides: dict) -> str:
    """A GRPO run's name: ``run`` and its ``rl.*`` overrides (``grpo-sft-k4-learning_rate0.01``)."""
    return "-".join([run, *(f"{k}{v}" for k, v in overrides.items())])


def parse_variant(text: str) -> dict:
    """``KEY=VALUE,...`` (rl.* overrides, YAML values) as a dict; '' is the config's own setting."""
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    return {k.strip(): yaml.safe_load(v) for k, v in pairs}


def rl_settings(rl: RLSection, update: dict) -> RLSection:
    """``rl`` with ``update`` validated (a ``--variant`` value such as ``5e-3``, a string to YAML, becomes
    the float; an unknown key is a ConfigError naming it)."""
    return parse(RLSection, {**rl.model_dump(), **update}, "--variant")


def experiment(
    seed: int,
    out: Path,
    ks: list[int],
    curve: list[int],
    splits: list[str],
    variants: list[dict],
    variant_max: int | None = None,
    quick: bool = False,
) -> tuple[list[dict], dict]:
    """Every system's rows per split. GRPO from SFT(k_min) runs once to ``max(curve)`` steps, each step of
    ``curve`` a checkpoint made a switcher (``<run>-s<N>``, charged its seconds up to N); each of
    ``variants`` (``rl.*`` overrides) the same up to ``variant_max`` steps, evaluated on validation only
    (on test: the point chosen on validation within the budget); GRPO from untuned runs ``max(curve)``."""
    from switchrl.eval import evaluate
    from switchrl.trainers.rl import train
    from switchrl.trainers.rl_setup import checkpoint_switcher
    from switchrl.trainers.sft import train_sft
    from switchrl.trainers.simulate import simulate

    base = yaml.safe_load((HERE / "cheap_labels.yaml").read_text())
    if quick:  # a smoke run of the whole pipeline (seconds, not a measurement)
        quick_sizes(base)
        base["rl"]["num_generations"] = 2
        base["simulate"]["k"] = None  # set per k below
    stages: dict[str, tuple[float, float]] = {}
    for k in ks:
        config = config_for(base, seed, out, k)
        store, *stages[f"sim-k{k}"] = timed_cpu(simulate, config, progress=False, overwrite=True)
        _, *stages[f"sft-k{k}"] = timed_cpu(train_sft, config, store.records())
        print(
            f"k = {k}: simulate {stages[f'sim-k{k}'][1]:.1f} CPU s, sft {stages[f'sft-k{k}'][1]:.1f} CPU s",
            flush=True,
        )
    k0, top = min(ks), max(curve)
    config = config_for(base, seed, out, k0)
    prefix = seconds(stages, ks)[f"sft-k{k0}"]
    points: dict[str, dict] = {}  # GRPO checkpoint switcher -> its run, step and seconds
    runs = [(f"grpo-sft-k{k0}", {}, curve)]
    runs += [
        (variant_name(f"grpo-sft-k{k0}", v), v, [n for n in curve if n <= (variant_max or top)])
        for v in variants
        if v
    ]
    rl = config.rl
    for name, overrides, steps in runs:
        rl_dir = out / "rl" / name
        config.rl = rl_settings(
            rl,
            {
                "init": str(out / f"sft-k{k0}"),
                "out_dir": str(rl_dir),
                "steps": max(steps),
                "save_steps": math.gcd(*steps),
                **overrides,
            },
        )
        _, *stages[name] = timed_cpu(train, config, "grpo", overwrite=True)
        print(f"{name}: {stages[name][1]:.1f} CPU s", flush=True)
        clock = json.loads((rl_dir / "rl_log.json").read_text())["clock"]
        for n, (wall, cpu) in curve_seconds(stages[name], clock, steps).items():
            system = f"{name}-s{n}"
            checkpoint_switcher(rl_dir, n, out / system)
            points[system] = {"run": name, "steps": n, "seconds": (prefix[0] + wall, prefix[1] + cpu)}
    config.rl = rl.model_copy(
        update={"init": None, "out_dir": str(out / "rl" / "grpo-untuned"), "steps": top}
    )
    _, *stages["grpo-untuned"] = timed_cpu(train, config, "grpo", overwrite=True)
    link = out / "grpo-untuned"  # eval names a switcher directory by its basename
    link.unlink(missing_ok=True)
    link.symlink_to(Path("rl") / "grpo-untuned" / "switcher")
    cost = {**seconds(stages, ks), **{s: p["seconds"] for s, p in points.items()}}
    main_curve = [s for s, p in points.items() if p["run"] == f"grpo-sft-k{k0}"]
    trained = [f"sft-k{k}" for k in ks] + main_curve + ["grpo-untuned"]
    budget = SHARE * cost[f"sft-k{max(ks)}"][1]
    rows: list[dict] = []
    chosen = None
    for split in sorted(splits, key=lambda s: s != "validation"):  # validation first: it chooses
        systems = [*base["eval"]["systems"], *trained] if split == "test" else list(trained)
        if split == "validation":
            systems += [s for s in points if s not in main_curve]
        elif chosen is not None and chosen not in systems:
            systems.append(chosen)
        config.eval = config.eval.model_copy(
            update={
                "split": split,
                "out_dir": str(out / f"eval-{split}"),
                "systems": [s if s in base["eval"]["systems"] else str(out / s) for s in systems],
            }
        )
        result, _ = timed(evaluate, config, progress=False, overwrite=True)
        mine = []
        for system, m in result.metrics[TASK].items():
            wall, cpu = cost.get(system, (None, None))
            k = int(system.split("-k")[1].split("-")[0]) if "-k" in system else None
            steps = points[system]["steps"] if system in points else None
            mine.append(
                {
                    "split": split,
                    "k": k,
                    "system": system,
                    "steps": steps,
                    **metric(m),
                    "seconds": wall,
                    "cpu_seconds": cpu,
                }
            )
        rows += mine
        if split == "validation":
            chosen = select(mine, list(points), budget)
    return rows, {
        "stages": stages,
        "chosen": chosen,
        "budget": budget,
        "main_curve": main_curve,
        "metrics": {},
    }


def figure(rows: list[dict], main_curve: list[str], budget: float, title: str, path: Path) -> None:
    """Test accuracy against CPU seconds: GRPO's curve from SFT(k_min), the SFT(k) points, the other GRPO
    points evaluated on test, and the budget (60% of SFT(k_max)'s CPU seconds) as a PNG."""
    from switchrl.report_figures import learning_curve_chart

    test = [r for r in rows if r["split"] == "test" and r["cpu_seconds"] is not None]

    def xy(r: dict) -> tuple[float, float, float]:
        return r["cpu_seconds"], r["accuracy"] / 100, r["ci95"] / 100

    curve = [xy(r) for r in test if r["system"] in main_curve]
    label = "GRPO from " + main_curve[0].rsplit("-s", 1)[0].removeprefix("grpo-")
    others = {r["system"]: xy(r) for r in test if r["system"] not in main_curve}
    png = learning_curve_chart({label: curve}, others, "CPU seconds (simulate + training)", budget, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(png))


def curve_table(rows: list[dict], ref_cpu: float) -> str:
    """One line per GRPO checkpoint: steps, CPU and wall seconds, share of SFT(k_max)'s CPU seconds, and
    its accuracy on each split evaluated."""
    splits = list(dict.fromkeys(r["split"] for r in rows))
    points: dict[str, dict] = {}
    for r in rows:
        if r["steps"] is not None:
            points.setdefault(r["system"], {"row": r})[r["split"]] = f"{r['accuracy']:.1f} ± {r['ci95']:.1f}"
    head = " | ".join(f"{s} accuracy" for s in splits)
    lines = [
        f"| GRPO checkpoint | steps | CPU s | wall s | share of SFT(k_max) CPU s | {head} |",
        "| --- " * (5 + len(splits)) + "|",
    ]
    for system, p in points.items():
        r = p["row"]
        cells = " | ".join(p.get(s, "–") for s in splits)
        lines.append(
            f"| {system} | {r['steps']} | {r['cpu_seconds']:.1f} | {r['seconds']:.1f} | "
            f"{100 * r['cpu_seconds'] / ref_cpu:.0f}% | {cells} |"
        )
    return "\n".join(lines)


def verdict_lines(
    rows: list[dict], main_curve: list[str], chosen: str | None, ref: str
) -> tuple[dict, list[str]]:
    """On test: the curve's last point, its first point within the margin, and the point chosen on
    validation, each against ``ref``; and the lines that say so."""
    test = [r for r in rows if r["split"] == "test"]
    if not test:
        return {}, []
    verdicts = {"last": verdict(test, main_curve[-1], ref)}
    first = first_within(test, main_curve, ref)
    if first:
        verdicts["first within the margin"] = verdict(test, first, ref)
    if chosen:
        verdicts["chosen on validation"] = verdict(test, chosen, ref)
    lines = [
        f"{name}: {v['system']} is {v['points_behind']:.1f} points behind {ref} (test) at "
        f"{100 * v['cpu_share']:.0f}% of its CPU seconds ({100 * v['wall_share']:.0f}% wall): "
        f"target {'met' if v['met'] else 'NOT met'}"
        for name, v in verdicts.items()
    ]
    if not first:
        lines.append(f"no point of the curve comes within {MARGIN:g} points of {ref}")
    return verdicts, lines


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
    parser.add_argument(
        "--curve", default="50", help="GRPO steps to evaluate GRPO from SFT(k_min) at, e.g. 2,4,50"
    )
    parser.add_argument("--splits", default="test", help="comma-separated eval splits, e.g. validation,test")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="a GRPO variant from SFT(k_min): rl.KEY=VALUE,... (repeat for several); chosen on validation",
    )
    parser.add_argument("--variant-max-steps", type=int, default=None, help="the variants' last curve step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    ks = sorted(int(k) for k in args.ks.split(","))
    curve = [1, 2] if args.quick else sorted(int(n) for n in args.curve.split(","))
    splits = args.splits.split(",")
    variants = [parse_variant(v) for v in args.variant]
    if any(variants) and "validation" not in splits:
        parser.error("--variant needs --splits with validation (a variant is chosen on it)")
    out = Path(args.out or f"runs/experiments/cheap_labels/seed{args.seed}")
    record = {"seed": args.seed, "ks": ks, "curve": curve, "splits": splits, "variants": variants}
    with Run(out, record) as run, torch_threads(args.threads):
        rows, extra = experiment(
            args.seed, out, ks, curve, splits, variants, args.variant_max_steps, args.quick
        )
    ref = f"sft-k{max(ks)}"
    ref_cpu = next(r["cpu_seconds"] for r in rows if r["system"] == ref)
    main_curve, chosen = extra["main_curve"], extra["chosen"]
    verdicts, lines = verdict_lines(rows, main_curve, chosen, ref)
    lines.append(
        f"budget: {100 * SHARE:.0f}% of {ref}'s CPU s = {extra['budget']:.1f}; chosen on validation: {chosen}"
    )
    if "test" in splits:
        title = f"world seed {args.seed}, {TASK}, test split"
        figure(rows, main_curve, extra["budget"], title, Path(args.figure or out / "accuracy_vs_seconds.png"))
    texts = [
        f"split {split}:\n" + add_cpu_column(table(mine, key="k", key_title="labels k"), mine)
        for split in splits
        for mine in [[r for r in rows if r["split"] == split]]
    ]
    texts += [curve_table(rows, ref_cpu), seconds_table(extra["stages"]), "\n".join(lines)]
    decisive = verdicts.get("chosen on validation") or verdicts.get("last")
    run.finish(
        [
            *rows,
            {"stages": extra["stages"], "verdicts": verdicts, "chosen": chosen, "budget": extra["budget"]},
        ],
        "\n\n".join(texts),
        f"world seed {args.seed}, task {TASK}, k {ks}, GRPO curve {curve}, variants {variants}, "
        f"torch threads {args.threads}; target (within {MARGIN:g} points of {ref} at <= {100 * SHARE:.0f}% "
        f"of its CPU seconds) by {decisive['system'] if decisive else '-'}: "
        f"{'met' if decisive and decisive['met'] else 'NOT met'}",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

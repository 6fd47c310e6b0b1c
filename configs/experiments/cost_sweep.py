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
import json
from pathlib import Path

import yaml

from switchrl.config import parse
from switchrl.experiments import Run, metric, table, timed
from switchrl.run_config import ResolvedRun, RunConfig
from switchrl.trainers.simulate import argmax_label
from switchrl.utils.threads import torch_threads

HERE = Path(__file__).resolve().parent
PAPER_SFT = "sft-cost0"  # the paper's SFT switcher: GRPO's start with --rl-from paper
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
    rl_seed: int | None = None,
) -> list[dict]:
    """The table's rows. ``labels``: cost (every state, as `switchrl simulate` labels it) or decisive
    (only states whose scores differ); ``rl_from``: sft (the cost's own SFT switcher) or paper (cost 0)."""
    from switchrl.eval import evaluate
    from switchrl.trainers.rl import train
    from switchrl.trainers.sft import train_sft
    from switchrl.trainers.simulate import simulate

    base = yaml.safe_load((HERE / "cost_sweep.yaml").read_text())
    if rl_seed is not None:
        base["rl"]["seed"] = rl_seed
    if quick:  # a smoke run of the whole pipeline (seconds, not a measurement)
        base["simulate"].update(limit=6, k=4)
        base["sft"].update(max_steps=4, drop_all_equal=False)
        base["rl"].update(steps=2, queries_per_step=2)
        base["eval"]["limit"] = 4
    sim_cost = max(costs) if max(costs) > 0 else 0.05
    first = config_for(base, seed, out, 0.0, sim_cost, rl_from)
    store, t_sim = timed(simulate, first, progress=False, overwrite=True)
    records = store.records()
    gen_seed = ResolvedRun(first).generation.seed
    paper = first.model_copy(deep=True)  # the paper's SFT (cost 0 labels), evaluated with the baselines
    paper.sft.out_dir = paper.eval.sft_path = str(out / PAPER_SFT)
    paper.eval.systems = ["singles", "oracle", "sft"]
    paper.eval.out_dir = str(out / "baselines" / "eval")
    _, t_paper = timed(train_sft, paper, relabel(records, 0.0, gen_seed))
    result, _ = timed(evaluate, paper, progress=False, overwrite=True)
    rows = [
        {"cost": None, "system": "sft (cost 0)" if s == "sft" else s, **metric(m), "seconds": None}
        for s, m in result.metrics["compositional"].items()
    ]
    rows[-1]["seconds"] = t_sim + t_paper
    for cost in costs:
        config = config_for(base, seed, out, cost, sim_cost, rl_from)
        labelled = relabel(records, cost, gen_seed)
        _, t_sft = timed(
            train_sft, config, decisive(labelled, gen_seed) if labels == "decisive" else labelled
        )
        _, t_rl = timed(train, config, "grpo", overwrite=True)
        result, _ = timed(evaluate, config, progress=False, overwrite=True)
        seconds = {"sft": t_sim + t_sft, "rl": t_sim + (t_paper if rl_from == "paper" else t_sft) + t_rl}
        for system, m in result.metrics["compositional"].items():
            rows.append({"cost": cost, "system": system, **metric(m), "seconds": seconds[system]})
        print(f"cost {cost:g} done: sft {t_sft:.0f} s, grpo {t_rl:.0f} s", flush=True)
    print(f"simulate (once, at cost {sim_cost:g}, {len(records)} states): {t_sim:.0f} s", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", default="0,0.05,0.1", help="comma-separated switch costs")
    parser.add_argument("--seed", type=int, default=0, help="testbed world seed")
    parser.add_argument("--out", default=None, help="default: runs/experiments/cost_sweep/seed<S>")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run with tiny sizes (not a measurement)"
    )
    parser.add_argument(
        "--labels", choices=["cost", "decisive"], default="cost", help="SFT states: see sweep()"
    )
    parser.add_argument(
        "--rl-from", choices=["sft", "paper"], default="sft", help="GRPO's start: see sweep()"
    )
    parser.add_argument("--rl-seed", type=int, default=None, help="GRPO's seed (default: the config's, 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    costs = [float(c) for c in args.costs.split(",")]
    out = Path(args.out or f"runs/experiments/cost_sweep/seed{args.seed}")
    with Run(out, {"seed": args.seed, "costs": costs}) as run, torch_threads(args.threads):
        rows = sweep(costs, args.seed, out, args.labels, args.rl_from, args.quick, args.rl_seed)
    run.finish(
        rows,
        table(rows),
        f"world seed {args.seed}, task compositional, costs {costs}, labels {args.labels}, "
        f"GRPO from {args.rl_from} SFT, torch threads {args.threads}",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Issue 18, item 4: on-policy labels (SFT round 2) against GRPO from the same round-1 switcher.

    OMP_NUM_THREADS=1 python configs/experiments/on_policy.py --seed 0

Round 1 is the paper's recipe: simulate (random prefixes, k random finishes per candidate), SFT on the
states whose utilities differ. Round 2 simulates the same states again with ``simulate.finisher`` =
the round-1 switcher (its finishes sampled, top-p), so the labels are one step of policy improvement
over round 1 instead of over random switching, and trains SFT on them twice: from scratch and from
round 1 (``sft.init``). GRPO from round 1 (``rl:``) is the RL alternative; all are evaluated together.

Round 2 keeps only the *informative* states, those where the candidates do not all write the same
next patch: a random finisher shares one set of finishes between identical patches (their utilities
tie exactly and ``drop_all_equal`` drops the state), an on-policy finisher reads the authors and never
shares, so those states get labels from finish noise alone.

Two controls train round 1's labels for as many optimiser steps as each round-2 switcher took in all
(:func:`controls`): the paper's SFT on ~30 states is a handful of steps, so more states alone (more
batches per epoch) or a second run from round 1 could explain a gain the labels did not bring.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from switchrl.config import parse
from switchrl.experiments import Run, Stages, metric, quick_sizes, seconds_table, table
from switchrl.run_config import RunConfig
from switchrl.utils.threads import torch_threads

HERE = Path(__file__).resolve().parent
R1, R2_SCRATCH, R2_FROM_R1 = "sft-r1", "sft-r2-scratch", "sft-r2-from-r1"
# the controls: round 1's labels, as many optimiser steps as round 2 (from scratch; from round 1)
CONTROLS = {
    "sft-r1-steps-of-r2": "sft, round 1 labels, round 2's steps",
    "sft-r1-steps-of-r1-plus-r2": "sft, round 1 labels, round 1 + round 2's steps",
}


def informative(records: list[dict]) -> list[dict]:
    """The records whose candidates do not all write the same next patch (the others carry no label)."""
    return [r for r in records if len(set(r["next_patches"])) > 1]


def config_for(base: dict, seed: int, out: Path, quick: bool = False) -> RunConfig:
    """Round 1's config: this world seed, every output under ``out``; round 2 is derived from it."""
    data = json.loads(json.dumps(base))
    if quick:
        quick_sizes(data)
    data["testbed"]["seed"] = seed
    data["simulate"]["out_dir"] = str(out / "simulate-r1")
    data["sft"]["out_dir"] = str(out / R1)
    data["rl"].update(init=str(out / R1), out_dir=str(out / "grpo"))
    data["eval"].update(
        out_dir=str(out / "eval"), sft_path=str(out / R1), rl_path=str(out / "grpo" / "switcher")
    )
    return parse(RunConfig, data, str(HERE / "on_policy.yaml"))


def round2(config: RunConfig, out: Path, init: str | None, name: str) -> RunConfig:
    """Round 2's SFT config: labels of the on-policy simulate, from scratch or from ``init``."""
    cfg = config.model_copy(deep=True)
    cfg.simulate.out_dir = str(out / "simulate-r2")
    cfg.simulate.finisher = str(out / R1)
    cfg.sft.out_dir, cfg.sft.init = str(out / name), init
    return cfg


def sft_steps(examples: int, epochs: float, batch_size: int) -> int:
    """The optimiser steps of an SFT run (TRL's count: epochs x batches per epoch, rounded up)."""
    return math.ceil(epochs * math.ceil(examples / batch_size))


def controls(config: RunConfig, out: Path) -> list[RunConfig]:
    """Round 1's labels trained for as many optimiser steps as round 2 from scratch took, and as round
    1 + round 2 from round 1: more informative states mean more batches per epoch (31 states are 1
    batch of 32, 34 are 2), which alone could explain a gain of round 2."""

    def steps(name: str) -> int:
        examples = json.loads((out / name / "sft_log.json").read_text())["examples"]
        return sft_steps(examples, config.sft.epochs, config.sft.batch_size)

    out_configs = []
    for name, n in zip(CONTROLS, (steps(R2_SCRATCH), steps(R1) + steps(R2_SCRATCH))):
        cfg = config.model_copy(deep=True)
        cfg.sft.out_dir, cfg.sft.max_steps = str(out / name), n
        out_configs.append(cfg)
    return out_configs


def experiment(seed: int, out: Path, quick: bool = False) -> tuple[list[dict], Stages, dict]:
    """The table's rows, each stage's (wall, CPU) seconds and each system's (simulate + training)."""
    from switchrl.eval import evaluate
    from switchrl.trainers.rl import train
    from switchrl.trainers.sft import train_sft
    from switchrl.trainers.simulate import simulate

    config = config_for(yaml.safe_load((HERE / "on_policy.yaml").read_text()), seed, out, quick)
    stage = Stages()
    stage("simulate, random finishes", simulate, config, progress=False, overwrite=True)
    stage("SFT round 1", train_sft, config)
    cont, scratch = round2(config, out, str(out / R1), R2_FROM_R1), round2(config, out, None, R2_SCRATCH)
    store = stage("simulate, round-1 finishes", simulate, scratch, progress=False, overwrite=True)
    labels = informative(store.records())
    print(f"round 2: {len(labels)} of {len(store.records())} states informative", flush=True)
    stage("SFT round 2 (scratch)", train_sft, scratch, labels)
    stage("SFT round 2 (from round 1)", train_sft, cont, labels)
    for cfg, title in zip(controls(config, out), CONTROLS.values()):
        stage(title, train_sft, cfg)
    stage("GRPO from round 1", train, config, "grpo", overwrite=True)
    config.eval.systems = [*config.eval.systems, *(str(out / d) for d in (R2_SCRATCH, R2_FROM_R1, *CONTROLS))]
    result = stage("eval", evaluate, config, progress=False, overwrite=True)

    r1 = ("simulate, random finishes", "SFT round 1")
    r2 = (*r1, "simulate, round-1 finishes")
    spent = {
        "sft": stage.total(*r1),
        R2_SCRATCH: stage.total(*r2, "SFT round 2 (scratch)"),
        R2_FROM_R1: stage.total(*r2, "SFT round 2 (from round 1)"),
        "rl": stage.total(*r1, "GRPO from round 1"),
        **{name: stage.total(r1[0], title) for name, title in CONTROLS.items()},
    }
    names = {
        "sft": (1, "sft, round 1"),
        R2_SCRATCH: (2, "sft, round 2 from scratch"),
        R2_FROM_R1: (2, "sft, round 2 from round 1"),
        "rl": (1, "GRPO from round 1"),
        **{name: (1, title) for name, title in CONTROLS.items()},
    }
    rows = []
    for system, m in result.metrics["compositional"].items():
        round_, title = names.get(system, (None, system))
        wall, cpu = spent.get(system, (None, None))
        rows.append({"round": round_, "system": title, **metric(m), "seconds": wall, "cpu_seconds": cpu})
    totals = {names[s][1]: spent[s] for s in spent}
    return rows, stage, totals


def control_only(seed: int, out: Path, quick: bool = False) -> tuple[list[dict], Stages]:
    """The controls alone, for a run of :func:`experiment` made before they existed (same ``out``)."""
    from switchrl.eval import evaluate
    from switchrl.trainers.sft import train_sft

    config = config_for(yaml.safe_load((HERE / "on_policy.yaml").read_text()), seed, out, quick)
    stages = Stages()
    for cfg, title in zip(controls(config, out), CONTROLS.values()):
        stages(title, train_sft, cfg)
    config.eval.systems, config.eval.out_dir = (
        [str(out / name) for name in CONTROLS],
        str(out / "eval-control"),
    )
    result = stages("eval", evaluate, config, progress=False, overwrite=True)
    metrics = result.metrics["compositional"]
    rows = [{"round": 1, "system": t, **metric(metrics[n]), "seconds": None} for n, t in CONTROLS.items()]
    return rows, stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="testbed world seed")
    parser.add_argument("--out", default=None, help="default: runs/experiments/on_policy/seed<S>")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run with tiny sizes (not a measurement)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--control-only",
        action="store_true",
        help="only the control, for an earlier run in --out (table in --out/control)",
    )
    args = parser.parse_args()
    out = Path(args.out or f"runs/experiments/on_policy/seed{args.seed}")
    if args.control_only:
        with Run(out / "control", {"seed": args.seed}) as run, torch_threads(args.threads):
            rows, stages = control_only(args.seed, out, args.quick)
        text = table(rows, key="round") + "\n\n" + stages.markdown()
        run.finish([*rows, {"stages": stages}], text, f"world seed {args.seed}: the control")
        return 0
    with Run(out, {"seed": args.seed, "quick": args.quick}) as run, torch_threads(args.threads):
        rows, stages, totals = experiment(args.seed, out, args.quick)
    run.finish(
        [*rows, {"stages": stages, "totals": totals}],
        "\n\n".join([table(rows, key="round"), stages.markdown(), seconds_table(totals, "system")]),
        f"world seed {args.seed}, task compositional, round 1 = the paper's SFT, round 2 = SFT on "
        f"labels from round-1 finishes, GRPO from round 1; torch threads {args.threads}",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

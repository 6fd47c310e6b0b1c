"""Issue 18, item 5: GRPO credit ``episode`` against ``fork`` from one SFT switcher, at equal CPU seconds.

    OMP_NUM_THREADS=1 python configs/experiments/credit.py --seed 0 \
        --init runs/experiments/on_policy/seed0/sft-r1

``episode``: a group is ``num_generations`` independent episodes of a query, every decision trained.
``fork``: the group branches from a shared state at a random decision, so its advantage credits that
decision and the ones after it. Both start from the same SFT switcher (``--init``, else the paper's
recipe is simulated and trained here) with the same seed and steps; CPU seconds (``time.process_time``,
one torch thread) are the fair measure on a shared machine. When fork's CPU seconds differ from
episode's by more than ``TOLERANCE``, fork runs again with the step count that matches them
(:func:`equal_cpu_steps`), and both fork runs are reported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from switchrl.config import parse
from switchrl.experiments import Run, Stages, metric, quick_sizes, table
from switchrl.run_config import RunConfig
from switchrl.utils.threads import torch_threads

HERE = Path(__file__).resolve().parent
TOLERANCE = 0.1  # CPU seconds within 10% count as equal


def equal_cpu_steps(steps: int, cpu_target: float, cpu_run: float) -> int:
    """The step count at which a run that took ``cpu_run`` CPU seconds for ``steps`` steps would take
    ``cpu_target`` (per-step cost taken as constant), at least 1."""
    if cpu_run <= 0:
        raise ValueError(f"cpu_run must be > 0, got {cpu_run}")
    return max(1, round(steps * cpu_target / cpu_run))


def zero_std_share(history: list[dict]) -> float | None:
    """The mean share of GRPO groups whose episodes all got the same reward (no gradient), over steps."""
    shares = [h["frac_reward_zero_std"] for h in history if "frac_reward_zero_std" in h]
    return sum(shares) / len(shares) if shares else None


def config_for(seed: int, out: Path, init: str | None, quick: bool) -> RunConfig:
    """The experiment config with this world seed, its SFT switcher and every output under ``out``."""
    data = yaml.safe_load((HERE / "credit.yaml").read_text())
    if quick:
        quick_sizes(data)
    sft = init or str(out / "sft")
    data["testbed"]["seed"] = seed
    data["simulate"]["out_dir"] = str(out / "simulate")
    data["sft"]["out_dir"] = sft
    data["rl"]["init"] = sft
    data["eval"].update(sft_path=sft, out_dir=str(out / "eval-sft"))
    return parse(RunConfig, data, str(HERE / "credit.yaml"))


def experiment(seed: int, out: Path, init: str | None, quick: bool) -> tuple[list[dict], Stages]:
    """The table's rows (the SFT switcher, then each GRPO run) and each stage's seconds."""
    from switchrl.eval import evaluate
    from switchrl.trainers.rl import train
    from switchrl.trainers.sft import train_sft
    from switchrl.trainers.simulate import simulate

    config = config_for(seed, out, init, quick)
    stages = Stages()
    if init is None:
        stages("simulate", simulate, config, progress=False, overwrite=True)
        stages("SFT", train_sft, config)
    steps = config.rl.steps
    runs = [("episode", steps), ("fork", steps)]
    results = {}
    for i, (credit, n) in enumerate(runs):  # grows by one run when fork's CPU seconds miss episode's
        name = f"{credit}, {n} steps"
        rl = config.rl.model_copy(
            update={"credit": credit, "steps": n, "out_dir": str(out / f"{credit}-{n}")}
        )
        results[name] = stages(f"GRPO {name}", train, config, "grpo", rl=rl, overwrite=True)
        if i == 1:
            cpu_episode, cpu_fork = stages[f"GRPO episode, {steps} steps"][1], stages[f"GRPO {name}"][1]
            if abs(cpu_fork - cpu_episode) > TOLERANCE * cpu_episode:
                runs.append(("fork", equal_cpu_steps(steps, cpu_episode, cpu_fork)))
    rows = []
    if init is None:  # a given SFT switcher was evaluated where it was trained (on_policy.py: round 1)
        config.eval.systems = ["sft"]
        evaluated = stages("eval sft", evaluate, config, progress=False, overwrite=True)
        rows.append({"credit": None, "system": "sft", **metric(evaluated.metrics["compositional"]["sft"])})
    for name, result in results.items():
        config.eval.systems, config.eval.rl_path = ["rl"], str(result.policy_dir)
        config.eval.out_dir = str(result.out_dir / "eval")
        evaluated = stages(f"eval {name}", evaluate, config, progress=False, overwrite=True)
        wall, cpu = stages[f"GRPO {name}"]
        rows.append(
            {
                "credit": name,
                "system": "GRPO",
                **metric(evaluated.metrics["compositional"]["rl"]),
                "zero_std_share": zero_std_share(result.history),
                "grpo_seconds": wall,
                "grpo_cpu_seconds": cpu,
            }
        )
    for r in rows:
        r["seconds"] = r.get("grpo_seconds")
    return rows, stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="testbed world seed")
    parser.add_argument("--init", default=None, help="the SFT switcher (default: trained here)")
    parser.add_argument("--out", default=None, help="default: runs/experiments/credit/seed<S>")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run with tiny sizes (not a measurement)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    out = Path(args.out or f"runs/experiments/credit/seed{args.seed}")
    with (
        Run(out, {"seed": args.seed, "init": args.init, "quick": args.quick}) as run,
        torch_threads(args.threads),
    ):
        rows, stages = experiment(args.seed, out, args.init, args.quick)
    shares = "\n".join(
        f"- {r['credit']}: zero-variance groups {100 * r['zero_std_share']:.0f}% of the steps' groups"
        for r in rows
        if r.get("zero_std_share") is not None
    )
    run.finish(
        [*rows, {"stages": stages}],
        "\n\n".join([table(rows, key="credit"), stages.markdown(), shares]),
        f"world seed {args.seed}, task compositional, GRPO from {args.init or 'the SFT trained here'}; "
        f"seconds = GRPO training only (wall); torch threads {args.threads}",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

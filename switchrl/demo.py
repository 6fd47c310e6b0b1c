"""``switchrl demo``: build the testbed family, run the paper's recipe on it and print the table."""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import yaml

from switchrl.config import parse
from switchrl.run_config import RunConfig
from switchrl.testbed.provenance import format_provenance
from switchrl.testbed.shipped import shipped_root
from switchrl.utils.threads import torch_threads


def demo_config(seed: int, out: str | Path, n: int, quick: bool = False) -> RunConfig:
    """The packaged demo config with its output directories under ``out``."""
    data = yaml.safe_load(resources.files("switchrl.configs").joinpath("demo.yaml").read_text())
    out = Path(out)
    data["testbed"]["seed"] = seed
    data["simulate"]["out_dir"] = str(out / "simulate")
    data["sft"]["out_dir"] = str(out / "sft")
    data["eval"]["out_dir"] = str(out / "eval")
    data["eval"]["limit"] = n
    if quick:
        data["simulate"].update(limit=6, k=4)
        data["sft"].update(max_steps=4, drop_all_equal=False)
    return parse(RunConfig, data, "switchrl/configs/demo.yaml")


def run_demo(seed: int = 0, out: str | Path = "runs/demo", n: int = 200, quick: bool = False) -> int:
    from switchrl.eval import evaluate
    from switchrl.report import write_report
    from switchrl.run_config import ResolvedRun
    from switchrl.trainers.sft import train_sft
    from switchrl.trainers.simulate import simulate, summarize

    times: dict[str, float] = {}
    start = time.perf_counter()
    config = demo_config(seed, out, n, quick)
    resolved = ResolvedRun(config)  # the shipped family, a cached one, or a fresh build
    times["testbed"] = time.perf_counter() - start
    family = resolved.family
    where = "shipped with switchrl" if family.root == shipped_root(family.seed) else "built locally"
    print(f"testbed family: world seed {family.seed}, {where} ({family.root})")
    print("\n".join(format_provenance(family.provenance, "built")))
    with torch_threads(1):
        for name, step in (
            ("simulate", lambda: simulate(config)),
            ("sft", lambda: train_sft(config)),
            ("eval", lambda: evaluate(resolved)),
        ):
            t = time.perf_counter()
            result = step()
            times[name] = time.perf_counter() - t
            if name == "simulate":
                print("simulated states:", json.dumps(summarize(result.records())))
    report = write_report(Path(out) / "eval")
    print()
    print(result.table)
    print(f"report: {report}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    (Path(out) / "demo.json").write_text(json.dumps({"seconds": times, "metrics": result.metrics}, indent=2))
    return 0


def main(args: argparse.Namespace) -> int:
    return run_demo(seed=args.seed, out=args.out, n=args.n, quick=args.quick)

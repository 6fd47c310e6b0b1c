"""``switchrl testbed build | check | lookalike``: build a family (any seed) or measure one, next to the
shipped one; or build the look-alike checkpoints (:mod:`~switchrl.testbed.lookalike`)."""

from __future__ import annotations

import argparse
import json

from switchrl.testbed.check import check_family, format_check
from switchrl.testbed.family import STAGES, build_family
from switchrl.testbed.lookalike import build_lookalike, lookalike_info
from switchrl.testbed.shipped import max_weight_difference, shipped_check, shipped_root


def _lookalike(args: argparse.Namespace) -> int:
    paths = build_lookalike(out=args.out, seed=args.seed, force=args.force)
    root = paths["tasks"].parent
    info = lookalike_info(root)
    print(f"look-alike checkpoints (seed {info['seed']}) at {root}:")
    for name, vocab in info["vocab"].items():
        print(
            f"  {name:<10} {paths[name]}  (tokenizer {vocab} tokens, final loss {info['final_loss'][name]})"
        )
    print(f"  tasks      {paths['tasks']}")
    took = ", ".join(f"{k} {v:.0f} s" for k, v in info["build_seconds"].items())
    print(f"build took {took}; the trio's chain runs on them with configs/lookalike.yaml (docs/lookalike.md)")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.testbed_cmd == "lookalike":
        return _lookalike(args)
    if args.testbed_cmd == "build":
        family = build_family(
            seed=args.seed, out=args.out, force=args.force, use_shipped=False, workers=args.workers
        )
        took = ", ".join(f"{k} {v:.0f} s" for k, v in family.build_seconds.items()) or "reused"
        print(f"testbed family (seed {family.seed}) at {family.root} ({took})")
        shipped = shipped_root(family.seed)
        if shipped is not None and shipped.resolve() != family.root.resolve():
            diff = max_weight_difference(shipped, family.root, STAGES)
            print(
                "max |weight difference| against the shipped family: "
                + ", ".join(f"{k} {v:.3g}" for k, v in diff.items())
                + (
                    "  (bit-identical)"
                    if not any(diff.values())
                    else f"\ncompare the phenomenon: switchrl testbed check --seed {family.seed} --out {family.root}"
                )
            )
        return 0
    family = build_family(seed=args.seed, out=args.out)
    metrics = check_family(family, n=args.n, n_label=args.n_label, k=args.k, n_schedule=args.n_schedule)
    print(format_check(metrics))
    reference = shipped_check(family.seed)
    shipped = shipped_root(family.seed)
    if reference is not None and shipped is not None and shipped.resolve() != family.root.resolve():
        print(f"\nthe shipped family of seed {family.seed}, for comparison ({shipped}):\n")
        print(format_check(reference))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0

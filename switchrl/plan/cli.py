"""``switchrl plan --config X [--devices cuda:0=80GiB,...] [--json]``: the memory plan as a table or JSON.

Exits 0 when every command fits, else 2 with one message naming, for each command that does not, the fix.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from switchrl.plan import PlanError, Report, build_workload, make_report, prompt_tokens
from switchrl.plan.devices import parse_devices
from switchrl.plan.estimate import COMMANDS, USABLE, Model
from switchrl.run_config import load_config

GIB = 2**30


def _models(report: Report) -> list[Model]:
    w = report.workload
    return [
        m for m in (*w.candidates, w.eval_switcher, w.rl_switcher) if m is not None and m.shape is not None
    ]


def as_json(report: Report, prompt: tuple[int, str]) -> dict[str, Any]:
    models = list({(m.name, m.device, m.shape.path): m for m in _models(report)}.values())  # eval's = rl's
    devices = {}
    for d, cap in report.capacity.items():
        here = [m for m in models if m.device == d]
        devices[d] = {
            "capacity": cap,
            "usable": None if cap is None else int(USABLE * cap),
            "weights": sum(m.shape.weight_bytes(m.dtype) for m in here),
            "kv_bytes_per_token": sum(m.shape.kv_bytes_per_token(m.dtype) for m in here),
            "peak": {c: p.peak(d) for c, p in report.plans.items()},
        }
    return {
        "positions": report.workload.positions,
        "prompt_tokens": {"tokens": prompt[0], "source": prompt[1]},
        "models": [
            {
                "name": m.name,
                "path": m.shape.path,
                "device": m.device,
                "dtype": m.dtype,
                "params": m.shape.params,
                "weight_bytes": m.shape.weight_bytes(m.dtype),
                "kv_bytes_per_token": m.shape.kv_bytes_per_token(m.dtype),
            }
            for m in models
        ],
        "devices": devices,
        "commands": {
            c: {"fits": c not in report.fixes, "fix": report.fixes.get(c), "items": p.items}
            for c, p in report.plans.items()
        },
        "fits": report.fits,
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.2f}M"


def _size(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GIB:.1f} GiB"


def as_table(data: dict[str, Any]) -> str:
    p = data["prompt_tokens"]
    new = data["positions"] - p["tokens"]
    lines = [
        f"positions per sequence: {data['positions']} = {p['tokens']} prompt ({p['source']}) + {new} new tokens"
    ]
    lines.append(f"{'model':<12} {'device':<8} {'dtype':<9} {'params':>8} {'weights':>11} {'KV/token':>10}")
    for m in data["models"]:
        lines.append(
            f"{m['name']:<12} {m['device']:<8} {m['dtype']:<9} {_count(m['params']):>8} "
            f"{_size(m['weight_bytes']):>11} {m['kv_bytes_per_token'] / 1024:>6.0f} KiB"
        )
    commands = list(data["commands"])
    lines.append(
        f"{'device':<8} {'capacity':>10} {'weights':>10} {'KV/token':>10} "
        + " ".join(f"{c:>14}" for c in commands)
    )
    for d, v in data["devices"].items():
        peaks = []
        for c in commands:
            peak = v["peak"][c]
            flag = "" if v["usable"] is None or peak <= v["usable"] else " !"
            peaks.append(f"{_size(peak) + flag:>14}")
        lines.append(
            f"{d:<8} {_size(v['capacity']):>10} {_size(v['weights']):>10} "
            f"{v['kv_bytes_per_token'] / 1024:>6.0f} KiB " + " ".join(peaks)
        )
    lines.append(f"(a device fits a peak up to {USABLE:.0%} of its capacity; ! marks a peak over that)")
    lines.extend(f"{c}: fits" for c, v in data["commands"].items() if v["fits"])
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    prompt = (args.prompt_tokens, "--prompt-tokens") if args.prompt_tokens else prompt_tokens(config)
    commands = tuple(args.only or COMMANDS)
    workload = build_workload(config, args.hub_cache, prompt[0], args.algo, commands)
    given = parse_devices(args.devices) if args.devices else None
    report = make_report(workload, given, commands)
    data = as_json(report, prompt)
    print(json.dumps(data, indent=2) if args.json else as_table(data))
    unknown = [d for d, b in report.capacity.items() if b is None]
    if unknown:
        raise PlanError(
            f"{', '.join(unknown)}: not on this machine; give its size, e.g. --devices {unknown[0]}=80GiB"
        )
    if not report.fits:
        raise PlanError("; ".join(report.fixes.values()))
    return 0

"""What every experiment script under ``configs/experiments/`` shares: timing a stage, the table it
prints (accuracy ± 95% CI, switches per response, seconds), the machine line, and writing
``table.md`` + a JSON record (arguments, rows, provenance at start and end) next to the runs.

Kept in the package (not beside the scripts) so scripts and tests import one copy."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from switchrl.testbed.provenance import provenance


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall-clock seconds."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def metric(m: dict) -> dict:
    """One system's eval metrics as table columns: accuracy and CI in points, switches per response."""
    return {"accuracy": 100 * m["accuracy"], "ci95": 100 * (m["ci95"] or 0.0), "switches": m["switches"]}


def table(rows: Sequence[dict], key: str = "cost", key_title: str | None = None) -> str:
    """A markdown table of ``rows`` (dicts with ``key``, system, accuracy, ci95, switches, seconds);
    ``None`` prints as a dash (a baseline that belongs to no point of the sweep, or no seconds)."""
    lines = [
        f"| {key_title or key} | system | accuracy ± 95% CI | switches / response | seconds (simulate + training) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        k = "–" if r[key] is None else f"{r[key]:g}" if isinstance(r[key], float) else str(r[key])
        secs = "–" if r["seconds"] is None else f"{r['seconds']:.0f}"
        acc = f"{r['accuracy']:.1f} ± {r['ci95']:.1f}"
        lines.append(f"| {k} | {r['system']} | {acc} | {r['switches']:.2f} | {secs} |")
    return "\n".join(lines)


class Run:
    """Provenance around one experiment: ``with Run(out, args) as run: ...; run.finish(rows, text)``."""

    def __init__(self, out: Path, args: dict):
        self.out, self.args = Path(out), args

    def __enter__(self) -> Run:
        self.start_prov, self.start = provenance(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def finish(self, rows: Sequence[dict], text: str, headline: str, record: str = "sweep.json") -> None:
        """Print ``headline``, the machine line and ``text``; write ``table.md`` and ``record``."""
        end = provenance()
        cpu = self.start_prov["cpu"]
        print(f"\n{headline}")
        print(
            f"machine: {cpu['model']} ({cpu['logical_cpus']} logical CPUs), "
            f"torch {self.start_prov['versions'].get('torch')}, "
            f"load {self.start_prov['load_average_1min']} -> {end['load_average_1min']}, "
            f"{time.perf_counter() - self.start:.0f} s total, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
        )
        print(text)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "table.md").write_text(text + "\n")
        payload = {**self.args, "rows": list(rows), "provenance": [self.start_prov, end]}
        (self.out / record).write_text(json.dumps(payload, indent=2))


def timed_cpu(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """``fn(*args, **kwargs)``, its wall-clock seconds and this process's CPU seconds (the fair measure on
    a shared machine: other jobs' load stretches wall time, not CPU time)."""
    cpu = time.process_time()
    result, wall = timed(fn, *args, **kwargs)
    return result, wall, time.process_time() - cpu

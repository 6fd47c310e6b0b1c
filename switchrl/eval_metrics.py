"""The statistics and the Markdown table of ``switchrl eval``: accuracy with a 95% CI per task and
system, switches, each candidate's share of patches, tokens/s."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence

from switchrl.records import EvalResponse

Z_95 = 1.96
CI_METHOD = "normal approximation: mean ± 1.96·sd/√n, sd with ddof=1, n = test queries × seeds"


def mean_ci(values: Sequence[float], z: float = Z_95) -> tuple[float, float | None]:
    """``(mean, half_width)`` of the normal-approximation CI ``z·sd/√n`` (sample sd); half_width is
    ``None`` with fewer than two values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, z * statistics.stdev(values) / math.sqrt(len(values))


def summarize(records: Sequence[EvalResponse], candidate_names: Sequence[str]) -> dict[str, dict[str, dict]]:
    """Task -> system -> metrics (first-seen order): accuracy, ci95, n, failures, switches, shares, tokens/s."""
    groups: dict[str, dict[str, list[EvalResponse]]] = {}
    for rec in records:
        groups.setdefault(rec.task, {}).setdefault(rec.system, []).append(rec)
    out: dict[str, dict[str, dict]] = {}
    for task, by_system in groups.items():
        out[task] = {}
        for system, recs in by_system.items():
            accuracy, ci = mean_ci([r.score for r in recs])
            authors = [p.author for r in recs for p in r.patches]
            tokens, seconds = sum(r.num_tokens for r in recs), sum(r.seconds for r in recs)
            out[task][system] = {
                "accuracy": accuracy,
                "ci95": ci,
                "n": len(recs),
                "failures": sum(r.error is not None for r in recs),
                "switches": statistics.fmean(r.num_switches for r in recs),
                "share": {
                    c: (authors.count(i) / len(authors) if authors else 0.0)
                    for i, c in enumerate(candidate_names)
                },
                "tokens_per_s": tokens / seconds if seconds > 0 else None,
            }
    return out


def format_table(
    metrics: Mapping[str, Mapping[str, dict]], candidate_names: Sequence[str], notes: Sequence[str] = ()
) -> str:
    """The Markdown comparison table: accuracy ± CI (task x system), then switches, shares and tokens/s."""
    tasks = list(metrics)
    systems = list(dict.fromkeys(s for t in tasks for s in metrics[t]))

    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    def grid(title: str, cell: Callable[[dict], str]) -> list[str]:
        lines = [f"## {title}", "", row(["task", *systems]), row(["---"] * (len(systems) + 1))]
        for t in tasks:
            lines.append(row([t, *(cell(metrics[t][s]) if s in metrics[t] else "–" for s in systems)]))
        return [*lines, ""]

    def acc(m: dict) -> str:
        ci = "n/a" if m["ci95"] is None else f"{100 * m['ci95']:.1f}"
        fails = f" ({m['failures']} failed)" if m["failures"] else ""
        return f"{100 * m['accuracy']:.1f} ± {ci}{fails}"

    lines = ["# Comparison", ""]
    lines += grid("Accuracy (%, mean ± 95% CI)", acc)
    lines += grid("Responses scored (n)", lambda m: str(m["n"]))
    lines += grid("Mean switches per response", lambda m: f"{m['switches']:.2f}")
    lines += grid("Tokens/s", lambda m: "–" if m["tokens_per_s"] is None else f"{m['tokens_per_s']:.1f}")
    lines += [
        "## Share of patches per candidate (%)",
        "",
        row(["task", "system", *candidate_names]),
        row(["---"] * (len(candidate_names) + 2)),
    ]
    for t in tasks:
        for s in systems:
            if s in metrics[t]:
                lines.append(
                    row([t, s, *(f"{100 * metrics[t][s]['share'][c]:.1f}" for c in candidate_names)])
                )
    lines += [
        "",
        f"CI: {CI_METHOD}. A response whose scorer raised counts as 0 and is listed as failed. "
        "Tokens/s: generated tokens per second of worker wall time, switcher included.",
    ]
    lines += [f"Note: {note}" for note in notes]
    return "\n".join(lines) + "\n"

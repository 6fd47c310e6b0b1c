"""``switchrl report RUN_DIR``: one self-contained HTML page of an eval run: who wrote what.

The page has the comparison table, a chart of the share of patches per checkpoint (per task and
system; a matplotlib PNG embedded as base64) and every response with its patches coloured by the
checkpoint that wrote them; hovering a patch shows the switcher's probabilities for that decision.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from switchrl.errors import CheckpointError
from switchrl.executors.shards import atomic_write
from switchrl.records import EvalResponse, ResponsePatch, parse_record

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.legend span { display: inline-block; margin-right: 1em; padding: 2px 6px; border-radius: 3px; }
.response { border: 1px solid #ddd; border-radius: 4px; padding: 0.5em; margin: 0.5em 0; }
.meta { font-size: 0.85em; color: #555; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; margin-top: 0.3em; }
.patch { border-radius: 2px; }
.error { color: #b00; }
"""


def _color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _load(run_dir: Path) -> tuple[dict, list[EvalResponse]]:
    results_path, responses_path = run_dir / "results.json", run_dir / "responses.jsonl"
    for path in (results_path, responses_path):
        if not path.is_file():
            raise CheckpointError(
                f"{run_dir} is not an eval run directory: {path.name} is missing (run `switchrl eval` first)"
            )
    try:
        results = json.loads(results_path.read_text())
        records = [
            parse_record(EvalResponse, json.loads(line), f"{responses_path}:{n}")
            for n, line in enumerate(responses_path.read_text().splitlines(), 1)
            if line.strip()
        ]
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{run_dir}: cannot read the eval outputs: {err}") from None
    for key in ("candidates", "systems", "tasks", "metrics"):
        if key not in results:
            raise CheckpointError(f"{results_path}: missing key {key!r}; not written by `switchrl eval`?")
    return results, records


def share_chart(metrics: Mapping[str, Mapping[str, dict]], candidates: Sequence[str]) -> str:
    """A base64 PNG: per task, one stacked bar per system of its share of patches per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(metrics)
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(max(4.0, 3.2 * len(tasks)), 3.6), squeeze=False, sharey=True
    )
    for ax, task in zip(axes[0], tasks):
        systems = list(metrics[task])
        bottom = [0.0] * len(systems)
        for ci, cand in enumerate(candidates):
            heights = [100 * metrics[task][s]["share"].get(cand, 0.0) for s in systems]
            ax.bar(range(len(systems)), heights, bottom=bottom, color=_color(ci), label=cand)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(task)
        ax.set_xticks(range(len(systems)), systems, rotation=45, ha="right", fontsize=8)
    axes[0][0].set_ylabel("share of patches (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _table_html(results: dict) -> str:
    metrics, candidates = results["metrics"], results["candidates"]
    tasks = list(metrics)
    systems = list(dict.fromkeys(s for t in tasks for s in metrics[t]))
    head = "".join(f"<th>{escape(s)}</th>" for s in systems)
    rows = []
    for t in tasks:
        cells = []
        for s in systems:
            m = metrics[t].get(s)
            if m is None:
                cells.append("<td>–</td>")
                continue
            ci = "n/a" if m["ci95"] is None else f"{100 * m['ci95']:.1f}"
            fails = f' <span class="error">({m["failures"]} failed)</span>' if m["failures"] else ""
            title = escape(
                f"n={m['n']}, switches/response={m['switches']:.2f}, "
                + ", ".join(f"{c} {100 * m['share'].get(c, 0):.0f}%" for c in candidates)
            )
            cells.append(f'<td title="{title}">{100 * m["accuracy"]:.1f} ± {ci}{fails}</td>')
        rows.append(f"<tr><td>{escape(t)}</td>{''.join(cells)}</tr>")
    acc = f"<table><tr><th>task</th>{head}</tr>{''.join(rows)}</table>"
    share_rows = "".join(
        f"<tr><td>{escape(t)}</td><td>{escape(s)}</td><td>{m['switches']:.2f}</td>"
        + "".join(f"<td>{100 * m['share'].get(c, 0):.1f}</td>" for c in candidates)
        + f"<td>{_fmt(m['tokens_per_s'])}</td></tr>"
        for t in tasks
        for s, m in metrics[t].items()
    )
    share = (
        "<table><tr><th>task</th><th>system</th><th>switches / response</th>"
        + "".join(f"<th>{escape(c)} %</th>" for c in candidates)
        + f"<th>tokens/s</th></tr>{share_rows}</table>"
    )
    return acc + share


def _patch_html(patch: ResponsePatch, candidates: Sequence[str]) -> str:
    author = patch.author
    name = candidates[author] if 0 <= author < len(candidates) else f"#{author}"
    title = f"written by {name}"
    if patch.probs:
        title += "; switcher: " + ", ".join(f"{c} {p:.2f}" for c, p in zip(candidates, patch.probs))
    return (
        f'<span class="patch" style="background:{_color(author)}33;border-bottom:2px solid {_color(author)}" '
        f'title="{escape(title)}">{escape(patch.text)}</span>'
    )


def _response_html(rec: EvalResponse, candidates: Sequence[str]) -> str:
    error = f' <span class="error">scorer failed: {escape(rec.error)}</span>' if rec.error else ""
    return (
        f'<div class="response"><div class="meta">seed {rec.seed} · {escape(rec.query_id)} · '
        f"score {rec.score:.2f} · {rec.num_switches} switches · reference "
        f"<code>{escape(rec.reference)}</code>{error}</div>"
        f'<div class="text"><b>Q:</b> {escape(rec.query)}</div>'
        f'<div class="text">{"".join(_patch_html(p, candidates) for p in rec.patches)}</div></div>'
    )


def render_report(results: dict, records: Sequence[EvalResponse | dict], title: str = "switchrl eval") -> str:
    """The HTML page (a string) for eval ``results`` (``results.json``) and response ``records``."""
    candidates = results["candidates"]
    legend = "".join(
        f'<span style="background:{_color(i)}33;border-bottom:2px solid {_color(i)}">{escape(c)}</span>'
        for i, c in enumerate(candidates)
    )
    sections = []
    groups: dict[tuple[str, str], list[EvalResponse]] = {}
    for rec in (parse_record(EvalResponse, r, "report records") for r in records):
        groups.setdefault((rec.task, rec.system), []).append(rec)
    for (task, system), recs in groups.items():
        body = "".join(_response_html(r, candidates) for r in recs)
        sections.append(
            f"<details><summary>{escape(task)} · {escape(system)} ({len(recs)} responses)</summary>"
            f"{body}</details>"
        )
    chart = share_chart(results["metrics"], candidates) if results["metrics"] else ""
    notes = "".join(f"<li>{escape(n)}</li>" for n in results.get("notes", []))
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>"
        f'<p class="meta">split {escape(str(results.get("split", "")))} · seeds '
        f"{escape(str(results.get('seeds', '')))}</p>"
        f"<h2>Comparison</h2>{_table_html(results)}"
        f'<p class="meta">CI: {escape(results.get("ci_method", ""))}</p>'
        + (f"<ul>{notes}</ul>" if notes else "")
        + "<h2>Share of patches per checkpoint</h2>"
        + (
            f'<img alt="share of patches per checkpoint" src="data:image/png;base64,{chart}">'
            if chart
            else ""
        )
        + f'<h2>Responses</h2><p class="legend">{legend}</p>{"".join(sections)}</body></html>\n'
    )


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` for an eval run directory; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run_dir {run_dir} is not a directory")
    results, records = _load(run_dir)
    path = run_dir / "report.html"
    atomic_write(path, render_report(results, records, title=f"switchrl eval · {run_dir.name}").encode())
    return path


def main(args: argparse.Namespace) -> int:
    """``switchrl report RUN_DIR``."""
    print(f"wrote {write_report(args.run_dir)}")
    return 0

"""``switchrl report RUN_DIR``: one self-contained HTML page of an eval run (who wrote what) or an RL run.

An eval run's page has the comparison table, figures (:mod:`switchrl.report_figures`, PNGs embedded
as base64): the share of patches per checkpoint, the accuracy-switches frontier, accuracy against
seconds per response and the training curves of an RL run the eval names (``eval.rl_path`` or a
system's directory), then every response with its patches coloured by the checkpoint that wrote
them; hovering a patch shows the switcher's probabilities for that decision. An RL run's page
(``rl.out_dir``) has its training curves.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from switchrl.errors import CheckpointError
from switchrl.executors.shards import atomic_write
from switchrl.records import EvalResponse, ResponsePatch, parse_record
from switchrl.report_figures import (
    color,
    find_rl_log,
    frontier_chart,
    load_rl_history,
    seconds_chart,
    share_chart,
    training_curves,
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
img { max-width: 100%; height: auto; }
"""


def _load(run_dir: Path) -> tuple[dict, list[EvalResponse]]:
    results_path, responses_path = run_dir / "results.json", run_dir / "responses.jsonl"
    for path in (results_path, responses_path):
        if not path.is_file():
            raise CheckpointError(
                f"{run_dir} is neither an eval run nor an RL run: {path.name} is missing (run "
                "`switchrl eval` or `switchrl rl` first)"
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
        f'<span class="patch" style="background:{color(author)}33;border-bottom:2px solid {color(author)}" '
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


def _figure(title: str, png: str | None) -> str:
    """A section with one embedded PNG (nothing when there is no figure)."""
    if not png:
        return ""
    return f'<h2>{escape(title)}</h2><img alt="{escape(title)}" src="data:image/png;base64,{png}">'


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>\n"
    )


def _curves_html(rl_runs: Mapping[str, tuple[str, Sequence[dict]]]) -> str:
    return "".join(
        _figure(
            f"Training curves · {name} ({algo}, {len(history)} logged steps)", training_curves(history, algo)
        )
        for name, (algo, history) in rl_runs.items()
    )


def render_report(
    results: dict,
    records: Sequence[EvalResponse | dict],
    title: str = "switchrl eval",
    rl_runs: Mapping[str, tuple[str, Sequence[dict]]] | None = None,
) -> str:
    """The HTML page (a string) for eval ``results`` (``results.json``) and response ``records``;
    ``rl_runs``: name -> (algorithm, per-step log) of RL runs to draw training curves for."""
    candidates = results["candidates"]
    legend = "".join(
        f'<span style="background:{color(i)}33;border-bottom:2px solid {color(i)}">{escape(c)}</span>'
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
    metrics = results["metrics"]
    seconds = {key: statistics.fmean(r.seconds for r in recs) for key, recs in groups.items()}
    notes = "".join(f"<li>{escape(n)}</li>" for n in results.get("notes", []))
    body = (
        f'<p class="meta">split {escape(str(results.get("split", "")))} · seeds '
        f"{escape(str(results.get('seeds', '')))}</p>"
        f"<h2>Comparison</h2>{_table_html(results)}"
        f'<p class="meta">CI: {escape(results.get("ci_method", ""))}</p>'
        + (f"<ul>{notes}</ul>" if notes else "")
        + (_figure("Share of patches per checkpoint", share_chart(metrics, candidates)) if metrics else "")
        + (_figure("Accuracy against switches per response", frontier_chart(metrics)) if metrics else "")
        + (
            _figure("Accuracy against seconds per response", seconds_chart(metrics, seconds))
            if metrics
            else ""
        )
        + _curves_html(rl_runs or {})
        + f'<h2>Responses</h2><p class="legend">{legend}</p>{"".join(sections)}'
    )
    return _page(title, body)


def named_rl_runs(run_dir: Path) -> dict[str, tuple[str, list[dict]]]:
    """The RL runs an eval run names (``eval.rl_path``, or a system given as a directory), read from
    the fingerprint of its responses: name -> (algorithm, per-step log). Runs whose log is gone are
    left out."""
    manifest = run_dir / "responses" / "manifest.json"
    try:
        section = json.loads(manifest.read_text()).get("fingerprint", {}).get("eval", {})
    except (OSError, ValueError, AttributeError):
        return {}
    named = {"rl": section.get("rl_path")} if "rl" in section.get("systems", []) else {}
    named.update({Path(s).name: s for s in section.get("systems", []) if Path(s).is_dir()})
    runs = {}
    for name, path in named.items():
        log = find_rl_log(Path(path)) if path else None
        if log is not None:
            runs[name] = load_rl_history(log)
    return runs


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` for an eval run directory or an RL run (``rl.out_dir``); returns its
    path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run_dir {run_dir} is not a directory")
    path = run_dir / "report.html"
    rl_log = None if (run_dir / "results.json").exists() else find_rl_log(run_dir)
    if rl_log is not None and rl_log.parent == run_dir:
        algo, history = load_rl_history(rl_log)
        page = _page(f"switchrl rl · {run_dir.name}", _curves_html({run_dir.name: (algo, history)}))
    else:
        results, records = _load(run_dir)
        page = render_report(
            results, records, title=f"switchrl eval · {run_dir.name}", rl_runs=named_rl_runs(run_dir)
        )
    atomic_write(path, page.encode())
    return path


def main(args: argparse.Namespace) -> int:
    """``switchrl report RUN_DIR`` (an eval run or an RL run)."""
    print(f"wrote {write_report(args.run_dir)}")
    return 0

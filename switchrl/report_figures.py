"""The figures of ``switchrl report``, as base64 PNGs (matplotlib, Agg) for the self-contained HTML page.

* :func:`share_chart`: per task, each system's share of patches per checkpoint;
* :func:`frontier_chart`: each system's accuracy against its switches per response (what a switch cost
  trades), and :func:`seconds_chart`: accuracy against seconds per response;
* :func:`training_curves`: an RL run's reward, entropy of the switch distribution, switch rate and
  share of zero-variance groups per logged step, read by :func:`load_rl_history` from what the
  trainers write (``rl_log.json``, or ``metrics.jsonl`` while a PPO / SB3 run is still going).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from switchrl.errors import CheckpointError

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

CURVES = (
    ("reward", "reward"),
    ("entropy", "entropy of the switch distribution"),
    ("switch/rate", "switch rate (changes per boundary)"),
    ("frac_reward_zero_std", "share of zero-variance groups"),
)
"""The training curves: the key in the RL logs (GRPO: TRL's names; PPO logs the same) and its title."""

RL_LOGS = ("rl_log.json", "metrics.jsonl")
"""What marks an RL run directory: the final log every trainer writes, or PPO's / SB3's running log."""


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    plt = _pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def share_chart(metrics: Mapping[str, Mapping[str, dict]], candidates: Sequence[str]) -> str:
    """Per task, one stacked bar per system of its share of patches per candidate."""
    plt = _pyplot()
    tasks = list(metrics)
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(max(4.0, 3.2 * len(tasks)), 3.6), squeeze=False, sharey=True
    )
    for ax, task in zip(axes[0], tasks):
        systems = list(metrics[task])
        bottom = [0.0] * len(systems)
        for ci, cand in enumerate(candidates):
            heights = [100 * metrics[task][s]["share"].get(cand, 0.0) for s in systems]
            ax.bar(range(len(systems)), heights, bottom=bottom, color=color(ci), label=cand)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(task)
        ax.set_xticks(range(len(systems)), systems, rotation=45, ha="right", fontsize=8)
    axes[0][0].set_ylabel("share of patches (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def _accuracy_scatter(
    points: Mapping[str, Mapping[str, tuple[float, float, float | None]]], xlabel: str
) -> str:
    """Per task, each system as one point (x, accuracy %) with its 95% CI, named next to it."""
    plt = _pyplot()
    tasks = list(points)
    systems = list(dict.fromkeys(s for t in tasks for s in points[t]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 3.6 * len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for system, (x, acc, ci) in points[task].items():
            c = color(systems.index(system))
            ax.errorbar(
                [x], [100 * acc], yerr=None if ci is None else [100 * ci], fmt="o", color=c, capsize=3
            )
            ax.annotate(system, (x, 100 * acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_title(task)
        ax.set_xlabel(xlabel)
        ax.margins(x=0.2, y=0.1)  # room for the names
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    return _png(fig)


def frontier_chart(metrics: Mapping[str, Mapping[str, dict]]) -> str:
    """The accuracy-switches frontier: accuracy against switches per response, per task and system."""
    points = {
        t: {s: (m["switches"], m["accuracy"], m["ci95"]) for s, m in by_system.items()}
        for t, by_system in metrics.items()
    }
    return _accuracy_scatter(points, "switches per response")


def seconds_chart(
    metrics: Mapping[str, Mapping[str, dict]],
    seconds: Mapping[tuple[str, str], float],
    xlabel: str = "seconds per response",
) -> str | None:
    """Accuracy against ``seconds`` (task, system) -> mean seconds per response (or, with ``xlabel``
    saying so, any other seconds, e.g. a system's training cost); ``None`` when no system has a time."""
    if not any(v > 0 for v in seconds.values()):
        return None
    points = {
        t: {s: (seconds[(t, s)], m["accuracy"], m["ci95"]) for s, m in by_system.items() if (t, s) in seconds}
        for t, by_system in metrics.items()
    }
    return _accuracy_scatter(points, xlabel)


def find_rl_log(run_dir: Path) -> Path | None:
    """The RL log in ``run_dir`` (an ``rl.out_dir``) or in the run above it (its saved ``switcher``)."""
    for directory in (run_dir, run_dir.parent):
        for name in RL_LOGS:
            if (directory / name).is_file():
                return directory / name
    return None


def load_rl_history(path: Path) -> tuple[str, list[dict]]:
    """The algorithm and the per-step log of an RL run from ``rl_log.json`` or ``metrics.jsonl``."""
    try:
        if path.name == "rl_log.json":
            log = json.loads(path.read_text())
            return str(log.get("algo", "rl")), list(log["history"])
        lines = path.read_text().splitlines()
        return "rl", [json.loads(line) for line in lines if line.strip()]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path}: cannot read the RL log ({err}); not written by `switchrl rl`?"
        ) from None


def curve_points(history: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of ``key`` at each logged step that has it. SB3 logs the entropy as the negative
    ``train/entropy_loss``."""
    points = []
    for h in history:
        value = h.get(key)
        if value is None and key == "entropy" and "train/entropy_loss" in h:
            value = -h["train/entropy_loss"]
        if value is not None and "step" in h:
            points.append((float(h["step"]), float(value)))
    return points


def training_curves(history: Sequence[Mapping[str, Any]], algo: str) -> str:
    """The :data:`CURVES` of one RL run, one panel each, one point per logged step."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(CURVES), figsize=(3.2 * len(CURVES), 3.0), squeeze=False)
    xlabel = "environment steps" if algo == "sb3-ppo" else "optimiser step"
    for ax, (key, title) in zip(axes[0], CURVES):
        points = curve_points(history, key)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        else:
            ax.text(0.5, 0.5, f"not logged by {algo}", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _png(fig)


def learning_curve_chart(
    curves: Mapping[str, Sequence[tuple[float, float, float | None]]],
    points: Mapping[str, tuple[float, float, float | None]],
    xlabel: str,
    budget: float | None = None,
    title: str = "",
) -> str:
    """Accuracy (%) against seconds: each of ``curves`` (name -> (x, accuracy, ci95) per checkpoint, as
    fractions) as a line, each of ``points`` as one named point, and ``budget`` as a dashed vertical line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, pts) in enumerate(curves.items()):
        xs, accs, cis = zip(*sorted(pts))
        ax.errorbar(
            xs,
            [100 * a for a in accs],
            yerr=[100 * (c or 0.0) for c in cis],
            fmt="-o",
            ms=3,
            color=color(i),
            capsize=2,
            label=name,
        )
    for j, (name, (x, acc, ci)) in enumerate(points.items()):
        c = color(len(curves) + j)
        ax.errorbar([x], [100 * acc], yerr=None if ci is None else [100 * ci], fmt="s", color=c, capsize=3)
        ax.annotate(name, (x, 100 * acc), fontsize=7, xytext=(4, -10), textcoords="offset points")
    if budget is not None:
        ax.axvline(budget, color="grey", linestyle="--", linewidth=1, label=f"budget {budget:.0f} s")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)

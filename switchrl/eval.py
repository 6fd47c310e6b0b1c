"""``switchrl eval``: the comparison table of single checkpoints, baselines and switchers.

Every system writes one response per (seed, task, test query); the trace key
``"{system}/{seed}/{task}/{query id}"`` seeds all of its randomness, so a run gives the same responses
locally, on Ray actors and after a resume. Responses are committed as shards through
:func:`switchrl.executors.run` (``out_dir/responses/``), then summarised per (task, system)::

    out_dir/results.json     metrics per task and system, notes, settings
    out_dir/table.md         accuracy ± 95% CI, switches, share of patches per candidate, tokens/s
    out_dir/responses.jsonl  every response: patches with author and switcher probabilities, score
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from switchrl.backends.base import Trace
from switchrl.backends.pool import CandidatePool
from switchrl.errors import CheckpointError, ConfigError
from switchrl.executors import ExecutorConfig, WorkerContext, WorkerSpec, run
from switchrl.executors.shards import atomic_write
from switchrl.policies import FixedSwitcher, LMSwitcher, RandomSwitcher, RoundRobinSwitcher, SwitchPolicy
from switchrl.policies.lm_switcher import METADATA_FILE
from switchrl.policies.sb3_switcher import SB3Switcher, is_sb3_switcher_dir
from switchrl.rewards.base import ScoreResult, safe_score_batch
from switchrl.rollout import run_switch_generation
from switchrl.run_config import ResolvedRun, RunConfig, load_run_config
from switchrl.tasks.base import TaskInstance

logger = logging.getLogger(__name__)

SYSTEM_KINDS = ("singles", "random", "round_robin", "untuned", "sft", "rl", "oracle")
LM_KINDS = ("untuned", "sft", "rl", "path")
Z_95 = 1.96
PROB_DIGITS = 6  # switcher probabilities in records; float noise across devices/threads is below this
CI_METHOD = "normal approximation: mean ± 1.96·sd/√n, sd with ddof=1, n = test queries × seeds"

SystemFactory = Callable[[int, Mapping[str, TaskInstance]], SwitchPolicy]
"""``factory(seed, instances_by_trace_key) -> policy`` for one batch of traces of one seed."""


# ---------------------------------------------------------------------------------------------- systems
@dataclass(frozen=True)
class SystemSpec:
    """One compared system: its table name, its kind, and the switcher directory or base model it loads."""

    name: str
    kind: str
    index: int | None = None  # singles: the candidate
    path: str | None = (
        None  # LM systems: a saved switcher dir ("sft", "rl", "path") or a base model ("untuned")
    )


def resolve_systems(
    resolved: ResolvedRun,
    names: Sequence[str],
    candidate_names: Sequence[str],
    notes: list[str] | None = None,
) -> list[SystemSpec]:
    """Expand ``eval.systems`` into :class:`SystemSpec` objects, checking paths without loading models.

    ``singles`` expands to one system per candidate; ``rl`` without ``eval.rl_path`` and ``oracle``
    outside the testbed are skipped with a note appended to ``notes``. The ``oracle`` (the testbed's
    :class:`~switchrl.testbed.check.ReferencePatchOracle`) picks a candidate whose next patch matches
    the reference solution; it is meaningful with greedy candidates (temperature 0).
    """
    if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"eval.systems: expected a non-empty list of names, got {names!r}")
    cfg = resolved.config
    notes = notes if notes is not None else []
    out: list[SystemSpec] = []
    for name in names:
        if name == "singles":
            out.extend(SystemSpec(c, "singles", index=i) for i, c in enumerate(candidate_names))
        elif name in ("random", "round_robin"):
            out.append(SystemSpec(name, name))
        elif name == "untuned":
            base = cfg.sft.base or (str(resolved.family.aligned) if resolved.family else None)
            if base is None:
                raise ConfigError("eval.systems: 'untuned' needs sft.base (the switcher's base model)")
            out.append(SystemSpec(name, name, path=base))
        elif name == "sft":
            path = cfg.eval.sft_path or cfg.sft.out_dir
            out.append(SystemSpec(name, name, path=_switcher_dir(path, "eval.sft_path (or sft.out_dir)")))
        elif name == "rl":
            if cfg.eval.rl_path is None:
                notes.append("rl: skipped (no eval.rl_path)")
                continue
            out.append(SystemSpec(name, name, path=_switcher_dir(cfg.eval.rl_path, "eval.rl_path")))
        elif name == "oracle":
            if resolved.family is None or _oracle_class() is None:
                notes.append("oracle: skipped (the reference-patch oracle needs the testbed)")
                continue
            out.append(SystemSpec(name, name))
        elif Path(name).is_dir():
            path = _switcher_dir(name, "eval.systems")
            out.append(SystemSpec(Path(path).name, "path", path=path))
        else:
            raise ConfigError(
                f"eval.systems: unknown system {name!r}; expected one of {', '.join(SYSTEM_KINDS)} "
                "or a saved switcher directory"
            )
    seen: set[str] = set()
    for spec in out:
        if spec.name in seen:
            raise ConfigError(
                f"eval.systems: system name {spec.name!r} appears twice (a candidate and a "
                "switcher directory may not share a name)"
            )
        seen.add(spec.name)
    return out


def _switcher_dir(path: str, field_name: str) -> str:
    if not ((Path(path) / METADATA_FILE).is_file() or is_sb3_switcher_dir(path)):
        raise CheckpointError(
            f"{field_name}: {path} is not a saved switcher (no {METADATA_FILE}); "
            "train one with `switchrl sft` or fix the path"
        )
    return str(path)


def _oracle_class() -> type | None:
    try:
        from switchrl.testbed.check import ReferencePatchOracle
    except ImportError:
        return None
    return ReferencePatchOracle


class _LMSystem:
    """Loads its switcher on first use (once per process or Ray actor) and reuses it for every seed."""

    def __init__(self, load: Callable[[], LMSwitcher], candidate_names: Sequence[str], where: str):
        self._load, self._names, self._where = load, list(candidate_names), where
        self._switcher: LMSwitcher | None = None

    def __call__(self, seed: int, instances: Mapping[str, TaskInstance]) -> SwitchPolicy:
        if self._switcher is None:
            switcher = self._load()
            if switcher.candidate_names != self._names:
                raise CheckpointError(
                    f"{self._where}: the switcher was trained for candidates "
                    f"{switcher.candidate_names}, but this run has {self._names}"
                )
            self._switcher = switcher
        self._switcher.seed = seed  # decisions draw from (seed, trace key, patch index)
        return self._switcher

    def unload(self) -> None:
        """Free the switcher (the worker keeps one LM switcher in memory at a time)."""
        if self._switcher is not None:
            device = self._switcher.lm.device
            self._switcher = None
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()


def build_systems(
    resolved: ResolvedRun,
    pool: CandidatePool,
    names: Sequence[str],
    *,
    notes: list[str] | None = None,
    device: str | None = None,
) -> dict[str, SystemFactory]:
    """System name -> :data:`SystemFactory`, in table order (see :func:`resolve_systems`).

    LM switchers (``untuned``, ``sft``, ``rl``, saved directories) load lazily on first use, on
    ``device`` (default: the last candidate's device), with ``switcher.top_p`` / ``greedy`` of the config.
    """
    n, cands = len(pool), pool.names
    sw = resolved.config.switcher
    device = device or resolved.candidates[-1].device
    lm_kwargs = {"top_p": sw.top_p, "greedy": sw.greedy, "device": device}
    systems: dict[str, SystemFactory] = {}
    for spec in resolve_systems(resolved, names, cands, notes):
        if spec.kind == "singles":
            systems[spec.name] = lambda seed, inst, i=spec.index: FixedSwitcher(n, i)
        elif spec.kind == "random":
            systems[spec.name] = lambda seed, inst: RandomSwitcher(n, seed=seed)
        elif spec.kind == "round_robin":
            systems[spec.name] = lambda seed, inst: RoundRobinSwitcher(n)
        elif spec.kind == "untuned":
            family_labels = getattr(resolved.family, "label_tokens", None)
            labels = list(family_labels[:n]) if family_labels and len(family_labels) >= n else None
            load = partial(
                LMSwitcher.from_base,
                spec.path,
                cands,
                label_tokens=labels,
                patch_tokens=pool.patch_tokens,
                **lm_kwargs,
            )
            systems[spec.name] = _LMSystem(load, cands, "untuned")
        elif spec.kind in ("rl", "path") and is_sb3_switcher_dir(spec.path):
            systems[spec.name] = lambda seed, inst, path=spec.path: SB3Switcher.from_pretrained(
                path, seed=seed
            )
        elif spec.kind in ("sft", "rl", "path"):
            systems[spec.name] = _LMSystem(
                partial(LMSwitcher.from_pretrained, spec.path, **lm_kwargs), cands, spec.path or spec.name
            )
        else:  # oracle
            systems[spec.name] = _oracle_factory(pool)
    return systems


def _oracle_factory(pool: CandidatePool) -> SystemFactory:
    oracle_cls = _oracle_class()
    tokenizer = pool.backends[0].tokenizer

    def make(seed: int, instances: Mapping[str, TaskInstance]) -> SwitchPolicy:
        missing = [i.id for i in instances.values() if "solution" not in i.meta]
        if missing:
            raise ConfigError(
                f"oracle: task instances {missing[:3]} have no meta['solution'] (reference answer text)"
            )
        return oracle_cls(
            pool,
            {
                key: tokenizer(inst.meta["solution"], add_special_tokens=False)["input_ids"]
                for key, inst in instances.items()
            },
        )

    return make


# ---------------------------------------------------------------------------------------------- work
@dataclass(frozen=True)
class EvalItem:
    """One response to write: ``system`` answers ``instance`` with eval seed ``seed``."""

    system: str
    seed: int
    instance: TaskInstance

    @property
    def id(self) -> str:
        return f"{self.system}/{self.seed}/{self.instance.task}/{self.instance.id}"


def make_items(
    systems: Sequence[str], seeds: Sequence[int], instances: Mapping[str, Sequence[TaskInstance]]
) -> list[EvalItem]:
    """Every (system, seed, task, instance), grouped so that a chunk mostly shares one policy."""
    return [
        EvalItem(s, seed, inst)
        for s in systems
        for seed in seeds
        for insts in instances.values()
        for inst in insts
    ]


class EvalWorker:
    """Writes and scores the responses of :class:`EvalItem` chunks with one candidate pool and its systems."""

    def __init__(
        self,
        pool: CandidatePool,
        systems: Mapping[str, SystemFactory],
        scorers: Mapping[str, Any],
        max_new_tokens: int,
        batch_size: int = 64,
    ):
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.pool, self.systems, self.scorers = pool, dict(systems), dict(scorers)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def process(self, items: Sequence[EvalItem]) -> list[dict]:
        """One response record per item, in the order of ``items``."""
        groups: dict[tuple[str, int, str], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((item.system, item.seed, item.instance.task), []).append(i)
        records: list[dict | None] = [None] * len(items)
        for (system, seed, task), rows in groups.items():
            if system not in self.systems:
                raise KeyError(f"unknown system {system!r}; this worker has {sorted(self.systems)}")
            if task not in self.scorers:
                raise KeyError(f"no scorer for task {task!r}; this worker has {sorted(self.scorers)}")
            for name, other in self.systems.items():
                if name != system and isinstance(other, _LMSystem):
                    other.unload()
            batch = [items[i] for i in rows]
            by_key = {it.id: it.instance for it in batch}
            policy = self.systems[system](seed, by_key)
            start = time.perf_counter()
            traces = run_switch_generation(
                self.pool,
                policy,
                [it.instance.query for it in batch],
                self.max_new_tokens,
                keys=list(by_key),
                batch_size=self.batch_size,
            )
            seconds = (time.perf_counter() - start) / len(batch)
            scores = safe_score_batch(
                self.scorers[task],
                [it.instance.query for it in batch],
                [t.text for t in traces],
                [it.instance.reference for it in batch],
                [it.instance.meta for it in batch],
            )
            for i, item, trace, score in zip(rows, batch, traces, scores):
                records[i] = self._record(item, trace, score, seconds)
        return records  # type: ignore[return-value]

    def _record(self, item: EvalItem, trace: Trace, score: ScoreResult, seconds: float) -> dict:
        names = self.pool.names
        return {
            "id": item.id,
            "system": item.system,
            "seed": item.seed,
            "task": item.instance.task,
            "query_id": item.instance.id,
            "query": item.instance.query,
            "reference": item.instance.reference,
            "text": trace.text,
            "score": score.value,
            "error": score.error,
            "num_tokens": trace.num_tokens,
            "num_switches": trace.num_switches,
            "stop_reason": trace.stop_reason,
            "seconds": seconds,
            "patches": [
                {
                    "author": p.author,
                    "name": names[p.author],
                    "text": p.text,
                    "probs": [round(x, PROB_DIGITS) for x in p.probs] if p.probs is not None else None,
                }
                for p in trace.patches
            ],
        }


def make_worker(config: dict, context: WorkerContext) -> EvalWorker:
    """The :class:`WorkerSpec` factory: builds the pool, the systems and the scorers once per process."""
    resolved = ResolvedRun(RunConfig.model_validate(config["run"]))
    candidates = resolved.candidates
    devices = context.devices
    if devices:
        candidates = [c.model_copy(update={"device": d}) for c, d in zip(candidates, devices)]
    gen = resolved.generation
    pool = CandidatePool.from_configs(candidates, patch_tokens=gen.patch_tokens, seed=gen.seed)
    switcher_device = devices[min(len(candidates), len(devices) - 1)] if devices else None
    systems = build_systems(resolved, pool, config["systems"], device=switcher_device)
    return EvalWorker(
        pool, systems, resolved.scorers(config["tasks"]), gen.max_new_tokens, resolved.config.eval.batch_size
    )


# ---------------------------------------------------------------------------------------------- statistics
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


def summarize(records: Sequence[dict], candidate_names: Sequence[str]) -> dict[str, dict[str, dict]]:
    """Task -> system -> metrics (first-seen order): accuracy, ci95, n, failures, switches, shares, tokens/s."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for rec in records:
        groups.setdefault(rec["task"], {}).setdefault(rec["system"], []).append(rec)
    out: dict[str, dict[str, dict]] = {}
    for task, by_system in groups.items():
        out[task] = {}
        for system, recs in by_system.items():
            accuracy, ci = mean_ci([r["score"] for r in recs])
            authors = [p["author"] for r in recs for p in r["patches"]]
            tokens, seconds = sum(r["num_tokens"] for r in recs), sum(r["seconds"] for r in recs)
            out[task][system] = {
                "accuracy": accuracy,
                "ci95": ci,
                "n": len(recs),
                "failures": sum(r["error"] is not None for r in recs),
                "switches": statistics.fmean(r["num_switches"] for r in recs),
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


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class EvalResult:
    """What :func:`evaluate` wrote: metrics per task and system, every response record, the notes."""

    out_dir: Path
    candidates: list[str]
    systems: list[str]
    tasks: list[str]
    metrics: dict[str, dict[str, dict]]
    records: list[dict]
    notes: list[str] = field(default_factory=list)
    table: str = ""


def _dir_signature(path: str) -> str:
    """A cheap content signature of a switcher directory (names, sizes, mtimes) for the resume fingerprint."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    text = "\n".join(f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def evaluate(
    config: RunConfig | ResolvedRun,
    executor: ExecutorConfig | Mapping | str | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Run every system of ``config.eval`` on every test instance for every seed; write the outputs.

    ``executor`` overrides the config's (``"local"``, ``"ray"`` or an :class:`ExecutorConfig`);
    ``out_dir`` overrides ``eval.out_dir``. Responses already committed in ``out_dir/responses``
    by an interrupted run with the same settings are kept, not written again.
    """
    resolved = config if isinstance(config, ResolvedRun) else ResolvedRun(config)
    cfg = resolved.config
    ev = cfg.eval
    if not ev.seeds or len(set(ev.seeds)) != len(ev.seeds):
        raise ConfigError(f"eval.seeds: expected a non-empty list of distinct seeds, got {ev.seeds}")
    out = Path(out_dir if out_dir is not None else ev.out_dir)
    instances = resolved.instances(ev.split, ev.limit)
    if not instances:
        raise ConfigError(f"tasks: no instances in split {ev.split!r} (eval.split)")
    candidate_names = [c.name for c in resolved.candidates]
    notes: list[str] = []
    specs = resolve_systems(resolved, ev.systems, candidate_names, notes)
    for note in notes:
        logger.warning("eval: %s", note)
    systems = [s.name for s in specs]
    items = make_items(systems, ev.seeds, instances)
    run_dump = cfg.model_dump(mode="json")
    tasks = list(instances)
    spec = WorkerSpec(
        "switchrl.eval:make_worker",
        {"run": run_dump, "systems": list(ev.systems), "tasks": tasks},
        num_models=len(candidate_names) + any(s.kind in LM_KINDS for s in specs),
    )
    fingerprint = {
        "eval": run_dump["eval"],
        "candidates": [c.model_dump(mode="json") for c in resolved.candidates],
        "generation": resolved.generation.model_dump(mode="json"),
        "reward": run_dump["reward"],
        "tasks": run_dump["tasks"],
        "testbed": run_dump["testbed"],
        "switcher": run_dump["switcher"],
        "switchers": {s.name: _dir_signature(s.path) for s in specs if s.path},
    }
    store = run(
        items,
        spec,
        out / "responses",
        executor=executor if executor is not None else cfg.executor,
        chunk_size=ev.batch_size,
        fingerprint=fingerprint,
        progress=progress,
        desc="eval",
        rates={"tokens": lambda recs: sum(r["num_tokens"] for r in recs)},
    )
    records = store.records()
    metrics = summarize(records, candidate_names)
    table = format_table(metrics, candidate_names, notes)
    result = EvalResult(out, candidate_names, systems, tasks, metrics, records, notes, table)
    results = {
        "candidates": candidate_names,
        "systems": systems,
        "tasks": tasks,
        "seeds": ev.seeds,
        "split": ev.split,
        "ci_method": CI_METHOD,
        "notes": notes,
        "metrics": metrics,
    }
    atomic_write(out / "results.json", json.dumps(results, indent=2).encode())
    atomic_write(out / "table.md", table.encode())
    store.export_jsonl(out / "responses.jsonl")
    return result


def main(args: argparse.Namespace) -> int:
    """``switchrl eval --config X [--executor local|ray] [--ray-address A]``."""
    config = load_run_config(args.config)
    executor = config.executor.overridden(
        executor=getattr(args, "executor", None), ray_address=getattr(args, "ray_address", None)
    )
    result = evaluate(config, executor=executor)
    print(result.table)
    print(
        f"wrote {result.out_dir / 'results.json'}, {result.out_dir / 'table.md'}, "
        f"{result.out_dir / 'responses.jsonl'}"
    )
    return 0

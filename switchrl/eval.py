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
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchrl.backends.base import Pool, Trace
from switchrl.backends.pool import CandidatePool
from switchrl.errors import ConfigError
from switchrl.eval_metrics import CI_METHOD, format_table, summarize
from switchrl.eval_systems import LM_KINDS, LMSystem, SystemFactory, build_systems, resolve_systems
from switchrl.executors import ExecutorConfig, WorkerContext, WorkerSpec, run, writable_dir
from switchrl.executors.shards import atomic_write
from switchrl.preflight import check_config
from switchrl.records import EvalResponse, ResponsePatch, read_records
from switchrl.rewards.base import ScoreResult, safe_score_batch
from switchrl.rewards.provenance import FailureTally
from switchrl.rewards.router import TaskScorers
from switchrl.rollout import run_switch_generation
from switchrl.run_config import ResolvedRun, RunConfig, load_config
from switchrl.tasks.base import TaskInstance
from switchrl.utils.files import dir_signature

logger = logging.getLogger(__name__)


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
        pool: Pool,
        systems: Mapping[str, SystemFactory],
        scorers: Mapping[str, Any] | TaskScorers,
        max_new_tokens: int,
        batch_size: int = 64,
        scheduling: Mapping[str, Any] | None = None,
    ):
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.pool, self.systems, self.scorers = pool, dict(systems), TaskScorers(scorers)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.scheduling = dict(scheduling or {})  # generation.schedule / max_inflight_bytes

    def process(self, items: Sequence[EvalItem]) -> list[dict]:
        """One response record per item (an :class:`EvalResponse` as JSON), in the order of ``items``."""
        groups: dict[tuple[str, int, str], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((item.system, item.seed, item.instance.task), []).append(i)
        records: list[dict | None] = [None] * len(items)
        for (system, seed, task), rows in groups.items():
            if system not in self.systems:
                raise KeyError(f"unknown system {system!r}; this worker has {sorted(self.systems)}")
            scorer = self.scorers.scorer(task)
            for name, other in self.systems.items():
                if name != system and isinstance(other, LMSystem):
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
                **self.scheduling,
            )
            seconds = (time.perf_counter() - start) / len(batch)
            scores = safe_score_batch(
                scorer,
                [it.instance.query for it in batch],
                [t.text for t in traces],
                [it.instance.reference for it in batch],
                [it.instance.meta for it in batch],
            )
            for i, item, trace, score in zip(rows, batch, traces, scores):
                records[i] = self._record(item, trace, score, seconds)
        return records  # type: ignore[return-value]

    def _record(self, item: EvalItem, trace: Trace, score: ScoreResult, seconds: float) -> dict:
        return EvalResponse(
            id=item.id,
            system=item.system,
            seed=item.seed,
            task=item.instance.task,
            query_id=item.instance.id,
            query=item.instance.query,
            reference=item.instance.reference,
            text=trace.text,
            score=score.value,
            error=score.error,
            num_tokens=trace.num_tokens,
            num_switches=trace.num_switches,
            stop_reason=trace.stop_reason,
            seconds=seconds,
            patches=[ResponsePatch.of(p, self.pool.names) for p in trace.patches],
        ).model_dump(mode="json")


def make_worker(config: dict, context: WorkerContext) -> EvalWorker:
    """The :class:`WorkerSpec` factory: builds the pool, the systems and the scorers once per process."""
    resolved = ResolvedRun(RunConfig.model_validate(config["run"]))
    candidates = resolved.candidates
    devices = context.devices
    if devices:
        candidates = [c.model_copy(update={"device": d}) for c, d in zip(candidates, devices)]
    gen = resolved.generation
    pool = CandidatePool.from_configs(
        candidates, patch_tokens=gen.patch_tokens, seed=gen.seed, truncate=gen.truncate
    )
    switcher_device = devices[min(len(candidates), len(devices) - 1)] if devices else None
    systems = build_systems(resolved, pool, config["systems"], device=switcher_device)
    return EvalWorker(
        pool,
        systems,
        resolved.scorers(config["tasks"]),
        gen.max_new_tokens,
        resolved.config.eval.batch_size,
        gen.scheduling(),
    )


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


def evaluate(
    config: RunConfig | ResolvedRun,
    executor: ExecutorConfig | Mapping | str | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    repair: bool = False,
) -> EvalResult:
    """Run every system of ``config.eval`` on every test instance for every seed; write the outputs.

    ``executor`` overrides the config's (``"local"``, ``"ray"`` or an :class:`ExecutorConfig`);
    ``out_dir`` overrides ``eval.out_dir``. Responses already committed in ``out_dir/responses``
    by an interrupted run with the same settings are kept, not written again; ``overwrite`` starts
    over, ``repair`` recomputes only the responses of corrupted shards.
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
    scorers = TaskScorers(resolved.scorers(tasks))
    fingerprint = {
        **resolved.fingerprint(scorers),
        "eval": {k: v for k, v in run_dump["eval"].items() if k not in ("out_dir", "batch_size")},
        "switchers": {s.name: dir_signature(s.path) for s in specs if s.path},
    }
    writable_dir(out, "eval.out_dir" if out_dir is None else "out_dir")
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
        overwrite=overwrite,
        repair=repair,
    )
    responses = read_records(EvalResponse, store)
    records = [r.model_dump(mode="json") for r in responses]
    metrics = summarize(responses, candidate_names)
    table = format_table(metrics, candidate_names, notes)
    result = EvalResult(out, candidate_names, systems, tasks, metrics, records, notes, table)
    results = {
        "candidates": candidate_names,
        "systems": systems,
        "tasks": tasks,
        "seeds": ev.seeds,
        "generation_seed": resolved.generation.seed,  # the candidates' sampling seed
        "split": ev.split,
        "ci_method": CI_METHOD,
        "notes": notes,
        "metrics": metrics,
    }
    atomic_write(out / "results.json", json.dumps(results, indent=2).encode())
    atomic_write(out / "table.md", table.encode())
    store.export_jsonl(out / "responses.jsonl")
    tally = FailureTally()
    for r in records:
        tally.add(scorers.label(r["task"]), 1, [r["error"]] if r["error"] else [])
    tally.check(cfg.max_scorer_failure_rate, f"eval ({out})")
    return result


def main(args: argparse.Namespace) -> int:
    """``switchrl eval --config X [--executor local|ray] [--ray-address A] [--overwrite|--repair]``."""
    config = load_config(args.config)
    executor = config.executor.overridden(
        executor=getattr(args, "executor", None), ray_address=getattr(args, "ray_address", None)
    )
    check_config(config.model_copy(update={"executor": executor}), "eval")
    result = evaluate(
        config,
        executor=executor,
        overwrite=getattr(args, "overwrite", False),
        repair=getattr(args, "repair", False),
    )
    print(result.table)
    print(
        f"wrote {result.out_dir / 'results.json'}, {result.out_dir / 'table.md'}, "
        f"{result.out_dir / 'responses.jsonl'}"
    )
    return 0

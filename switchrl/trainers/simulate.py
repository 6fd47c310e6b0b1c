"""Simulated rollouts (the paper's switcher training data).

For each training query and state j: write a full response by random switching, cut it after a
random number of patches (zero included) to get a state; then every candidate c_i writes the next
patch and that continuation is finished k times by random switching; s_i = mean score of the k
finishes and the SFT label is argmax_i s_i (ties broken with the seed, and flagged).

Two options go beyond the paper: ``simulate.switch_cost`` charges each finish its author changes
(cost-aware labels), and ``simulate.finisher`` has a saved switcher write the finishes instead of
random switching (on-policy labels: one step of policy improvement over that switcher).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from switchrl.backends.base import Pool, Trace
from switchrl.backends.pool import CandidatePool
from switchrl.errors import CheckpointError, ConfigError
from switchrl.executors import ShardStore, WorkerContext, WorkerSpec, run, writable_dir
from switchrl.policies.baselines import RandomSwitcher
from switchrl.policies.factory import build_switcher
from switchrl.policies.lm_switcher import METADATA_FILE
from switchrl.preflight import check_config
from switchrl.records import PrefixPatch, SimulatedState
from switchrl.rewards.base import Scorer
from switchrl.rewards.provenance import FailureTally
from switchrl.rewards.router import TaskScorers
from switchrl.rollout import StateUtilities, SwitchPolicy, advance, estimate_utilities
from switchrl.run_config import ResolvedRun, RunConfig, SimulateSection, load_config
from switchrl.tasks.base import TaskInstance
from switchrl.utils.files import dir_signature
from switchrl.utils.seeding import generator


@dataclass(frozen=True)
class StateItem:
    """One simulated state to label: state ``index`` of ``instance``."""

    instance: TaskInstance
    index: int

    @property
    def id(self) -> str:
        return f"{self.instance.task}/{self.instance.id}/s{self.index}"


def make_items(instances: Sequence[TaskInstance], states_per_query: int) -> list[StateItem]:
    if states_per_query <= 0:
        raise ValueError(f"states_per_query must be > 0, got {states_per_query}")
    return [StateItem(inst, j) for inst in instances for j in range(states_per_query)]


def argmax_label(utilities: Sequence[float], *seed_parts: object) -> tuple[int, bool]:
    """The index of the best utility; ties are broken at random from ``seed_parts`` and flagged."""
    best = max(utilities)
    winners = [i for i, u in enumerate(utilities) if u == best]
    if len(winners) == 1:
        return winners[0], False
    pick = int(torch.randint(len(winners), (1,), generator=generator(*seed_parts, "tie")))
    return winners[pick], True


class SimulateWorker:
    """Labels batches of states with one candidate pool (one replica per process or Ray actor).

    The states' prefixes are always random switching; ``finisher`` (default: that random switcher)
    writes the finishes, and ``switch_cost`` is charged per author change of each finish.
    """

    def __init__(
        self,
        pool: Pool,
        scorers: Mapping[str, Scorer] | TaskScorers,
        k: int = 32,
        max_new_tokens: int = 512,
        seed: int = 0,
        states_per_batch: int = 8,
        finisher: SwitchPolicy | None = None,
        switch_cost: float = 0.0,
        scheduling: Mapping[str, Any] | None = None,
    ):
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        if states_per_batch <= 0:
            raise ValueError(f"states_per_batch must be > 0, got {states_per_batch}")
        self.pool, self.scorers, self.k = pool, TaskScorers(scorers), k
        self.max_new_tokens, self.seed, self.states_per_batch = max_new_tokens, seed, states_per_batch
        self.random = RandomSwitcher(len(pool), seed=seed)
        self.finisher = finisher if finisher is not None else self.random
        self.switch_cost = switch_cost
        self.scheduling = dict(scheduling or {})  # generation.schedule / max_inflight_bytes

    def states(self, items: Sequence[StateItem]) -> list[Trace]:
        """A random-switching prefix per item: a full random response cut at a random patch boundary."""
        probes = [
            Trace(key=item.id, query=item.instance.query, max_new_tokens=self.max_new_tokens)
            for item in items
        ]
        advance(self.pool, self.random, probes, **self.scheduling)
        states = []
        for item, probe in zip(items, probes):
            cut = int(torch.randint(len(probe.patches), (1,), generator=generator(self.seed, item.id, "cut")))
            states.append(
                Trace(
                    key=item.id,
                    query=probe.query,
                    max_new_tokens=self.max_new_tokens,
                    patches=probe.patches[:cut],
                )
            )
        return states

    def process(self, items: Sequence[StateItem]) -> list[dict]:
        """One record per item (a :class:`SimulatedState` as JSON), in the order of ``items``."""
        records: list[dict] = []
        for start in range(0, len(items), self.states_per_batch):
            batch = items[start : start + self.states_per_batch]
            states = self.states(batch)
            by_task: dict[str, list[int]] = {}
            for i, item in enumerate(batch):
                by_task.setdefault(item.instance.task, []).append(i)
            results: list = [None] * len(batch)
            for task, rows in by_task.items():
                est = estimate_utilities(
                    self.pool,
                    [states[i] for i in rows],
                    [batch[i].instance.reference for i in rows],
                    self.scorers.scorer(task),
                    k=self.k,
                    finisher=self.finisher,
                    metas=[batch[i].instance.meta for i in rows],
                    switch_cost=self.switch_cost,
                    **self.scheduling,
                )
                for i, e in zip(rows, est):
                    results[i] = e
            self.pool.release([s.key for s in states])
            records.extend(self._record(item, state, est) for item, state, est in zip(batch, states, results))
        return records

    def _record(self, item: StateItem, state: Trace, est: StateUtilities) -> dict:
        utilities = est.utilities
        label, tie = argmax_label(utilities, self.seed, item.id)
        names = self.pool.names
        return SimulatedState(
            id=item.id,
            task=item.instance.task,
            query_id=item.instance.id,
            state=item.index,
            query=item.instance.query,
            reference=item.instance.reference,
            candidates=names,
            prefix_text=state.text,
            prefix=[PrefixPatch.of(p) for p in state.patches],
            next_patches=[p.text for p in est.next_patches],
            utilities=utilities,
            counts=est.counts,
            label=label,
            label_name=names[label],
            tie=tie,
            all_equal=len(set(utilities)) == 1,
            failures=sum(len(f) for f in est.failures),
            errors=sorted({e for f in est.failures for e in f})[:3],
            switch_cost=self.switch_cost,
            switches=est.mean_switches if self.switch_cost else None,
        ).model_dump(mode="json")


def build_worker(config: dict, context: WorkerContext) -> SimulateWorker:
    """``WorkerSpec`` factory: one candidate pool per process / Ray actor (models load once)."""
    run_cfg = RunConfig.model_validate(config["run"])
    resolved = ResolvedRun(run_cfg)
    candidates = resolved.candidates
    if context.devices:
        candidates = [c.model_copy(update={"device": d}) for c, d in zip(candidates, context.devices)]
    gen = resolved.generation
    pool = CandidatePool.from_configs(
        candidates, patch_tokens=gen.patch_tokens, seed=gen.seed, truncate=gen.truncate
    )
    sim = run_cfg.simulate
    tasks = list(resolved.instances(sim.split, sim.limit))
    finisher = None
    if sim.finisher != "random":
        finisher = build_switcher(
            pool.names, saved=sim.finisher, seed=gen.seed, greedy=False, where="simulate.finisher"
        )
    return SimulateWorker(
        pool,
        resolved.scorers(tasks),
        k=sim.k,
        max_new_tokens=gen.max_new_tokens,
        seed=gen.seed,
        states_per_batch=sim.states_per_batch,
        finisher=finisher,
        switch_cost=sim.switch_cost,
        scheduling=gen.scheduling(),
    )


def label_fingerprint(sim: SimulateSection) -> dict:
    """The simulate section's part of the fingerprint: what changes the records (not where they go or
    how they are batched) and the finisher's directory signature, so a retrained finisher refuses to
    resume. The label options are left out at their defaults: runs from before them still resume."""
    section = sim.model_dump(mode="json", exclude={"out_dir", "chunk_size", "states_per_batch"})
    if not sim.switch_cost:
        del section["switch_cost"]
    if sim.finisher == "random":
        del section["finisher"]
        return section
    if not (Path(sim.finisher) / METADATA_FILE).is_file():
        raise CheckpointError(
            f"simulate.finisher: {sim.finisher} is not a saved LM switcher (no {METADATA_FILE}); give "
            "'random' or a directory written by `switchrl sft` / `switchrl rl --algo grpo|ppo`"
        )
    return {**section, "finisher_signature": dir_signature(sim.finisher)}


def simulate(
    config: RunConfig, progress: bool = True, overwrite: bool = False, repair: bool = False
) -> ShardStore:
    """Label ``states_per_query`` states of every training query; resumable in ``simulate.out_dir``.

    ``overwrite`` starts over in ``simulate.out_dir``; ``repair`` recomputes only corrupted shards' states.
    """
    resolved = ResolvedRun(config)
    sim = config.simulate
    instances = [i for items in resolved.instances(sim.split, sim.limit).values() for i in items]
    if not instances:
        raise ConfigError(f"simulate: no task instances in split {sim.split!r}")
    items = make_items(instances, sim.states_per_query)
    spec = WorkerSpec(
        "switchrl.trainers.simulate:build_worker",
        {"run": config.model_dump(mode="json")},
        num_models=len(resolved.candidates) + (sim.finisher != "random"),
    )
    scorers = TaskScorers(resolved.scorers(sorted({i.task for i in instances})))
    fingerprint = {
        **resolved.fingerprint(scorers),
        "simulate": label_fingerprint(sim),
    }
    writable_dir(sim.out_dir, "simulate.out_dir")
    store = run(
        items,
        spec,
        sim.out_dir,
        executor=config.executor,
        chunk_size=sim.chunk_size,
        fingerprint=fingerprint,
        progress=progress,
        desc="simulate",
        rates={"finishes": lambda recs: sum(sum(r["counts"]) for r in recs)},
        overwrite=overwrite,
        repair=repair,
    )
    check_failures(store.records(), scorers, config.max_scorer_failure_rate, f"simulate ({sim.out_dir})")
    return store


def check_failures(records: Sequence[dict], scorers: TaskScorers, max_rate: float, where: str) -> None:
    """Raise :class:`~switchrl.errors.ScorerFailureError` when a scorer failed on more than ``max_rate``
    of the finishes it scored (the records are committed already)."""
    tally = FailureTally()
    for r in records:
        tally.add(scorers.label(r["task"]), sum(r["counts"]), r["errors"][:1], failed=r["failures"])
    tally.check(max_rate, where)


def summarize(records: Sequence[dict]) -> dict:
    """Label shares, ties and the share of states with no signal (all utilities equal)."""
    n = len(records)
    names = records[0]["candidates"] if records else []
    labels = Counter(r["label_name"] for r in records)
    return {
        "states": n,
        "label_share": {name: labels[name] / n for name in names} if n else {},
        "all_equal": sum(r["all_equal"] for r in records) / n if n else 0.0,
        "ties": sum(r["tie"] for r in records) / n if n else 0.0,
        "scorer_failures": sum(r["failures"] for r in records),
    }


def main(args) -> int:
    """``switchrl simulate --config X [--executor local|ray] [--ray-address A] [--overwrite|--repair]``."""
    config = load_config(args.config)
    config.executor = config.executor.overridden(executor=args.executor, ray_address=args.ray_address)
    check_config(config, "simulate")
    store = simulate(
        config, overwrite=getattr(args, "overwrite", False), repair=getattr(args, "repair", False)
    )
    print(json.dumps({"out_dir": str(store.out_dir), **summarize(store.records())}, indent=2))
    return 0

"""The generation loop shared by eval, simulate, RL, the environments, the testbed and the benchmarks.

A policy (anything with the :class:`SwitchPolicy` shape) picks who writes next; a pool writes the
patches. Both loops advance many traces at once through a :class:`~switchrl.scheduler.Scheduler`
(per-candidate queues; each pass one batched call per engine). Everything random derives from
(seed, trace key, patch index), so results do not depend on batch composition, order or worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from switchrl.backends.base import Patch, Pool, Trace, count_switches
from switchrl.rewards.base import Scorer, ScoreResult, safe_score_batch
from switchrl.scheduler import Decision, Schedule, Scheduler, SwitchPolicy

__all__ = [
    "Decision",
    "StateUtilities",
    "Schedule",
    "SwitchPolicy",
    "advance",
    "estimate_utilities",
    "run_switch_generation",
]


def advance(
    pool: Pool,
    policy: SwitchPolicy,
    traces: Sequence[Trace],
    max_batch: int | None = None,
    max_inflight: int | None = None,
    schedule: Schedule = "auto",
    max_inflight_bytes: int | None = None,
) -> None:
    """Run ``policy`` over ``traces`` until every one is done (EOS, stop string or token budget).

    A :class:`~switchrl.scheduler.Scheduler` picks the rows of each pass (at most ``max_batch``, of
    at most ``max_inflight`` traces in flight whose estimated KV fits in ``max_inflight_bytes``;
    None: no limit); the records do not depend on it."""
    Scheduler(pool, policy, max_batch, max_inflight, schedule, max_inflight_bytes).run(traces)


def run_switch_generation(
    pool: Pool,
    policy: SwitchPolicy,
    queries: Sequence[str],
    max_new_tokens: int = 512,
    keys: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = False,
    max_inflight: int | None = None,
    schedule: Schedule = "auto",
    max_inflight_bytes: int | None = None,
) -> list[Trace]:
    """Write one switched response per query; returns the finished traces in query order.

    ``batch_size``: the most rows of one forward pass; ``max_inflight``: the most responses in
    flight (default: ``batch_size`` per candidate, so each candidate's queue can fill a pass);
    ``max_inflight_bytes``: the most KV-cache bytes they may hold (estimated, None: no limit)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    keys = list(keys) if keys is not None else [f"q{i}" for i in range(len(queries))]
    if len(keys) != len(queries) or len(set(keys)) != len(keys):
        raise ValueError("keys must be unique and one per query")
    traces = [Trace(key=k, query=q, max_new_tokens=max_new_tokens) for k, q in zip(keys, queries)]
    inflight = len(pool) * batch_size if max_inflight is None else max_inflight
    with tqdm(total=len(traces), desc="generate", unit="resp", disable=not progress) as bar:
        scheduler = Scheduler(pool, policy, batch_size, inflight, schedule, max_inflight_bytes)
        scheduler.run(traces, on_finished=lambda done: bar.update(len(done)))
    return traces


@dataclass
class StateUtilities:
    """Simulated-rollout estimate for one state: per candidate, its next patch and k scored finishes.

    ``switches``: per candidate and finish, the changes of author in the whole finished response
    (prefix, the candidate's patch, the finish); ``switch_cost`` is charged per change in
    :attr:`utilities`, so labels can prefer candidates whose continuations switch less.
    """

    next_patches: list[Patch]
    scores: list[list[float]]
    failures: list[list[str]] = field(default_factory=list)
    responses: list[list[str]] = field(default_factory=list)
    switches: list[list[int]] = field(default_factory=list)
    switch_cost: float = 0.0

    @property
    def utilities(self) -> list[float]:
        """Per candidate: the mean over its finishes of score - ``switch_cost`` x switches (cost 0: the
        mean score, bit for bit)."""
        switches = self.switches or [[0] * len(s) for s in self.scores]
        return [
            sum(x - self.switch_cost * w for x, w in zip(s, sw)) / len(s) if s else 0.0
            for s, sw in zip(self.scores, switches)
        ]

    @property
    def mean_switches(self) -> list[float]:
        """Per candidate: the mean number of author changes of its finished responses."""
        return [sum(w) / len(w) if w else 0.0 for w in self.switches]

    @property
    def counts(self) -> list[int]:
        return [len(s) for s in self.scores]


def estimate_utilities(
    pool: Pool,
    states: Sequence[Trace],
    references: Sequence[str],
    scorer: Scorer,
    k: int = 32,
    *,
    finisher: SwitchPolicy,
    metas: Sequence[dict] | None = None,
    share_identical: bool | None = None,
    switch_cost: float = 0.0,
    max_batch: int | None = None,
    max_inflight: int | None = None,
    schedule: Schedule = "auto",
    max_inflight_bytes: int | None = None,
) -> list[StateUtilities]:
    """The paper's simulated rollouts: for each state and candidate c_i, c_i writes the next patch,
    then k finishes by ``finisher`` (the paper: random switching) are scored; s_i = mean score.

    All |states| x |C| x k finishes run as batched pool calls. Every candidate reads each state and
    each next patch once (:meth:`Pool.prefill`) before they are forked, so the finishes
    share that prefix instead of each reading it again. ``states`` are not modified.

    When candidates write the very same next patch, their continuations are the same state for a
    finisher that ignores who wrote what (random switching), so those candidates share one set of
    k finishes (``share_identical``; the default for a finisher with ``ignores_authors``). At most states all
    candidates agree, so this is where most of the compute goes otherwise. A finisher that reads the
    authors (a trained switcher, on-policy labels) never shares.

    ``switch_cost`` > 0: utilities are the mean of score - cost x author changes of each finished
    response (:class:`StateUtilities`); counted with candidate i's own patch even when finishes are shared.

    ``max_batch``, ``max_inflight``, ``schedule`` and ``max_inflight_bytes`` drive the finishes'
    :class:`Scheduler` (as in :func:`advance`); the records do not depend on them.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    if len(references) != len(states):
        raise ValueError("one reference per state is required")
    n = len(pool)
    if share_identical is None:
        share_identical = bool(getattr(finisher, "ignores_authors", False))
    metas = metas or [{} for _ in states]

    # 1. every candidate writes the next patch of every state (one batched call per candidate)
    children = [s.fork(f"{s.key}/c{i}") for s in states for i in range(n)]
    pool.prefill(states)
    for s in states:
        pool.fork(s.key, [f"{s.key}/c{i}" for i in range(n)])
    pool.step(children, [i for _ in states for i in range(n)])

    # 2. each distinct child is finished k times
    source: list[int] = []  # child -> the child whose finishes it uses
    for si in range(len(states)):
        seen: dict[tuple, int] = {}
        for ci in range(si * n, (si + 1) * n):
            p = children[ci].patches[-1]
            sig = (tuple(p.token_ids), p.stop_reason, p.vocab) if share_identical else (ci,)
            source.append(seen.setdefault(sig, ci))
    distinct = sorted(set(source))
    pool.prefill([children[ci] for ci in distinct if not children[ci].done])
    finishes: dict[int, list[Trace]] = {}
    for ci in distinct:
        child = children[ci]
        keys = [f"{child.key}/f{j}" for j in range(k)]
        pool.fork(child.key, keys)
        finishes[ci] = [child.fork(key) for key in keys]
    pool.release([c.key for c in children])
    flat = [f for ci in distinct for f in finishes[ci]]
    advance(pool, finisher, flat, max_batch, max_inflight, schedule, max_inflight_bytes)
    pool.release([f.key for f in flat])

    # 3. score (each distinct finish once) and average
    scored: dict[int, list[ScoreResult]] = {}
    for ci in distinct:
        si = ci // n
        block = finishes[ci]
        scored[ci] = safe_score_batch(
            scorer, [states[si].query] * k, [f.text for f in block], [references[si]] * k, [metas[si]] * k
        )
    results: list[StateUtilities] = []
    for si in range(len(states)):
        rows = [source[ci] for ci in range(si * n, (si + 1) * n)]
        cut = len(states[si].patches)
        results.append(
            StateUtilities(
                next_patches=[children[si * n + i].patches[-1] for i in range(n)],
                scores=[[r.value for r in scored[ci]] for ci in rows],
                failures=[[r.error for r in scored[ci] if r.failed] for ci in rows],
                responses=[[f.text for f in finishes[ci]] for ci in rows],
                switches=[
                    [count_switches(states[si].authors + [i] + f.authors[cut + 1 :]) for f in finishes[ci]]
                    for i, ci in enumerate(rows)
                ],
                switch_cost=switch_cost,
            )
        )
    return results

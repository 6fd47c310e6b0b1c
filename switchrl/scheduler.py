"""Which traces a pool writes next: per-candidate queues, served in passes of one candidate's rows.

A lock-step step lets every live trace's writer write at once, so a fused forward pass whose rows
belong to C candidates reads C models' weights per token; while decoding is bound by reading
weights (small batches) that caps switched generation near 1/C of one model's speed. Here decided
traces wait in one queue per candidate, and each pass serves, per engine, up to ``max_batch`` rows
of ONE of its candidates (the pass then reads one model's weights, like a single model does), or
one fused pass over all its queues when the engine's :class:`PassCost`, measured at start-up, says
that is cheaper per row (few rows in flight, or many rows per candidate). Engines that share
nothing (other devices, servers) are served in the same pass, so they run at the same time.

Decisions and tokens depend only on (seed, trace key, patch index), never on which traces share a
pass, so the records are those of lock-step generation (up to float rounding that depends on the
batch, which lock-step at another batch size shows too).
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from switchrl.admission import KVBudget
from switchrl.backends.base import Patch, Pool, Trace
from switchrl.backends.pool import check_step
from switchrl.config import SCHEDULES, Schedule


@dataclass(frozen=True)
class Decision:
    """The chosen candidate and, when the policy has one, its distribution over candidates."""

    action: int
    probs: tuple[float, ...] | None = None


@runtime_checkable
class SwitchPolicy(Protocol):
    """Decides who writes next. Randomness must come from (seed, trace key, patch index).

    A policy whose decisions never depend on who wrote the patches so far (random switching) may
    set ``ignores_authors = True``: simulated rollouts then share finishes between candidates that
    wrote the very same patch (:func:`~switchrl.rollout.estimate_utilities`).
    """

    n_candidates: int

    def decide(self, traces: Sequence[Trace]) -> list[Decision]: ...

    def release(self, keys: Sequence[str]) -> None:
        """Forget per-trace state (e.g. an LM switcher's KV cache)."""


@dataclass(frozen=True)
class PassCost:
    """Seconds per decoded token of a fused pass over ``models`` candidates of ``width`` rows each:
    ``alpha`` (fixed per pass) + ``beta`` per model (reading its weights) + ``gamma`` per row slot
    (a fused pass pads every candidate's group to the widest)."""

    alpha: float
    beta: float
    gamma: float

    def seconds(self, models: int, width: int) -> float:
        return self.alpha + self.beta * models + self.gamma * models * width


def spread(queued: Sequence[int], budget: int) -> list[int]:
    """Rows to take from each queue for one fused pass of at most ``budget`` rows: as even as the
    queues allow (the pass costs the widest group for every candidate)."""
    take = [0] * len(queued)
    left = min(budget, sum(queued))
    while left:
        for j, q in enumerate(queued):
            if left and take[j] < q:
                take[j] += 1
                left -= 1
    return take


def plan_pass(
    queued: Sequence[int], max_batch: int | None, schedule: Schedule, cost: PassCost | None
) -> list[int]:
    """Rows to take from each member queue of one engine this pass: one candidate's (grouped) or
    several candidates' at once (fused), whichever ``cost`` says is cheaper per row served."""
    budget = sum(queued) if max_batch is None else max_batch
    fused = spread(queued, budget)
    if schedule == "lockstep" or sum(1 for n in fused if n) <= 1:
        return fused
    best = max(range(len(queued)), key=lambda j: (queued[j], -j))
    grouped = [0] * len(queued)
    grouped[best] = min(queued[best], budget)
    if schedule == "grouped" or cost is None:
        return grouped
    per_row_fused = cost.seconds(sum(1 for n in fused if n), max(fused)) / sum(fused)
    per_row_grouped = cost.seconds(1, grouped[best]) / grouped[best]
    return fused if per_row_fused <= per_row_grouped else grouped


_PROBE_WIDTH = 8
_costs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> {engine members: PassCost}


def pass_clock(pool: Pool, members: Sequence[int]) -> Callable[[], float]:
    """The clock the probes of the engine of ``members`` are timed with: this process's CPU time when
    that engine is a model on this CPU running one torch thread (its work, which other jobs on the
    machine do not stretch: under load, wall-clock probes fitted costs that made ``auto`` choose the
    slower pass), else wall time (the work of a GPU, a server or another process)."""
    here = getattr(pool, "computes_here_on_cpu", None)
    if here is not None and here(members) and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def measure_pass_cost(pool: Pool, members: Sequence[int], width: int = _PROBE_WIDTH) -> PassCost:
    """Fit :class:`PassCost` for the engine shared by candidates ``members`` from timed passes of
    short probe traces: one row of one candidate, ``width`` rows of one, ``width`` rows of each.

    Each configuration runs with two token budgets; the difference of their times is the decoding
    time alone (the probes' prefill cancels). Best of two runs, after a warm-up, on :func:`pass_clock`."""
    short, long = 1, max(2, min(pool.patch_tokens, 9))
    clock = pass_clock(pool, members)

    def per_token(rows_of: Sequence[int], tag: str) -> float:
        best = float("inf")
        for rep in range(2):
            times = []
            for budget in (short, long):
                traces = [
                    Trace(f"__probe__/{tag}/{rep}/{budget}/{i}", "probe", budget) for i in range(len(rows_of))
                ]
                start = clock()
                pool.step(traces, list(rows_of))
                times.append((clock() - start, max(len(t.patches[-1].token_ids) for t in traces)))
                pool.release([t.key for t in traces])
            (t1, s1), (t2, s2) = times
            best = min(best, (t2 - t1) / (s2 - s1) if s2 > s1 else t2 / max(1, s2))
        return max(best, 0.0)

    every = [c for c in members for _ in range(width)]
    per_token(every, "warmup")
    one = per_token([members[0]], "one")
    many = per_token([members[0]] * width, "many")
    fused = per_token(every, "fused")
    gamma = max(0.0, (many - one) / (width - 1))
    beta = max(0.0, (fused - many) / (len(members) - 1) - gamma * width)
    return PassCost(alpha=max(0.0, one - beta - gamma), beta=beta, gamma=gamma)


def pass_cost(pool: Pool, members: Sequence[int]) -> PassCost:
    """The measured :class:`PassCost` of the engine of ``members``, measured once per pool."""
    known = _costs.setdefault(pool, {})
    if tuple(members) not in known:
        known[tuple(members)] = measure_pass_cost(pool, members)
    return known[tuple(members)]


def engine_candidates(pool: Pool) -> list[list[int]]:
    """The candidates of each engine of ``pool`` (a pool that does not say: one engine each)."""
    groups = getattr(pool, "engine_candidates", None)
    return [list(g) for g in groups] if groups is not None else [[c] for c in range(len(pool))]


class Scheduler:
    """Drives ``policy`` and ``pool`` over many traces until each is done.

    Up to ``max_inflight`` traces are admitted at once (None: all), in order, and, with
    ``max_inflight_bytes``, only while their estimated KV cache fits in it (:class:`KVBudget`); the admitted traces
    that need a decision are decided in one batch; each pass serves, per engine of the pool,
    :func:`plan_pass`'s rows (at most ``max_batch`` of them, None: no limit) in one
    :meth:`Pool.step`. ``schedule``: ``auto`` (per pass, by the measured cost), ``grouped`` (one
    candidate per engine and pass) or ``lockstep`` (every queue at once). ``policy`` None: only
    :meth:`write` (its actions come decided).
    """

    def __init__(
        self,
        pool: Pool,
        policy: SwitchPolicy | None,
        max_batch: int | None = None,
        max_inflight: int | None = None,
        schedule: Schedule = "auto",
        max_inflight_bytes: int | None = None,
    ):
        for name, value in (
            ("max_batch", max_batch),
            ("max_inflight", max_inflight),
            ("max_inflight_bytes", max_inflight_bytes),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or None: no limit), got {value}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.pool, self.policy = pool, policy
        self.max_batch, self.max_inflight, self.schedule = max_batch, max_inflight, schedule
        self.max_inflight_bytes = max_inflight_bytes
        self.engines = engine_candidates(pool)
        # per pass, the candidate of each row served (for reports and tests)
        self.passes: list[list[int]] = []

    def run(self, traces: Sequence[Trace], on_finished: Callable[[list[Trace]], None] | None = None) -> None:
        """Write patches until every trace of ``traces`` is done (EOS, stop string or token budget);
        ``on_finished`` hears of the traces that ended in each pass (after they are released)."""
        policy = self.policy
        if policy is None:
            raise ValueError("Scheduler.run needs a policy to decide who writes (policy=None: write only)")
        waiting = deque(t for t in traces if not t.done)
        queues: list[list[tuple[Trace, Decision]]] = [[] for _ in range(len(self.pool))]
        undecided: list[Trace] = []
        inflight = 0
        budget = None if self.max_inflight_bytes is None else KVBudget(self.pool, self.max_inflight_bytes)
        while waiting or inflight:
            while waiting and (self.max_inflight is None or inflight < self.max_inflight):
                if budget is not None and not budget.admit(waiting[0]):
                    break
                undecided.append(waiting.popleft())
                inflight += 1
            if undecided:
                decisions = policy.decide(undecided)
                actions = check_step(undecided, [d.action for d in decisions], self.pool.names)
                for t, a, d in zip(undecided, actions, decisions):
                    queues[a].append((t, d))
                undecided = []
            served = [row for c, n in self._plan(queues) for row in self._take(queues[c], n)]
            rows = [t for t, _ in served]
            actions = [d.action for _, d in served]
            self.pool.step(rows, actions)
            self.passes.append(actions)
            finished = []
            for t, d in served:
                t.patches[-1].probs = d.probs
                (finished if t.done else undecided).append(t)
            if finished:
                keys = [t.key for t in finished]
                self.pool.release(keys)
                policy.release(keys)
                if budget is not None:
                    budget.release(keys)
                inflight -= len(finished)
                if on_finished is not None:
                    on_finished(finished)

    def write(self, traces: Sequence[Trace], actions: Sequence[int]) -> list[Patch]:
        """One patch for each of ``traces`` by candidate ``actions[i]`` (decided elsewhere, e.g. by the
        agents of a vector env), served in this scheduler's passes; returns them in ``traces``' order."""
        queues: list[list[tuple[Trace, Decision]]] = [[] for _ in range(len(self.pool))]
        for t, a in zip(traces, check_step(traces, actions, self.pool.names)):
            queues[a].append((t, Decision(a)))
        while any(queues):
            served = [row for c, n in self._plan(queues) for row in self._take(queues[c], n)]
            self.pool.step([t for t, _ in served], [d.action for _, d in served])
            self.passes.append([d.action for _, d in served])
        return [t.patches[-1] for t in traces]

    def _take(self, queue: list[tuple[Trace, Decision]], n: int) -> list[tuple[Trace, Decision]]:
        """``n`` rows of ``queue``: those with the longest next patch first, then the least advanced.

        A pass decodes as many tokens as its longest patch, so a row with few tokens left (its last
        patch) would idle in a pass of full patches; such rows wait and share a short pass instead.
        Serving the least advanced first keeps the traces of a queue at like lengths, so a pass pads
        their caches little (64 queries, B 8: half the padded positions of first-come order). As
        every admitted trace ends, none waits for ever."""
        patch = self.pool.patch_tokens
        order = sorted(
            range(len(queue)),
            key=lambda i: (-min(patch, queue[i][0].remaining_tokens), queue[i][0].num_tokens),
        )
        chosen = set(order[:n])
        taken = [row for i, row in enumerate(queue) if i in chosen]
        queue[:] = [row for i, row in enumerate(queue) if i not in chosen]
        return taken

    def _plan(self, queues: Sequence[list]) -> list[tuple[int, int]]:
        """(candidate, rows) to serve this pass, engine by engine."""
        out = []
        for members in self.engines:
            queued = [len(queues[c]) for c in members]
            if not any(queued):
                continue
            cost = None
            if self.schedule == "auto" and len(members) > 1 and sum(1 for n in queued if n) > 1:
                cost = pass_cost(self.pool, members)
            take = plan_pass(queued, self.max_batch, self.schedule, cost)
            out += [(c, n) for c, n in zip(members, take) if n]
        return out

"""Memory-bounded admission: the scheduler admits traces while their estimated KV fits the budget,
the caches really stay under it, the records are those of an unbounded run, and a budget below one
trace is a clear error."""

from __future__ import annotations

import pytest

from switchrl.admission import KVBudget, kv_bytes_per_token
from switchrl.backends import Trace
from switchrl.errors import ConfigError
from switchrl.policies import RandomSwitcher
from switchrl.rollout import estimate_utilities
from switchrl.scheduler import Scheduler
from tests.conftest import make_pool

QUERIES = ["the town", "one two", "a red river", "the answer is", "two", "the red", "one", "a town"]


def _records(traces: list[Trace]) -> list[list[tuple]]:
    return [[(p.author, p.token_ids, p.stop_reason) for p in t.patches] for t in traces]


def _stored_bytes(pool) -> int:
    stores = {id(s): s for s in (getattr(b.lm, "fused", b.lm) for b in pool.backends)}
    return sum(s.stored_bytes() for s in stores.values())


def test_admission_stops_at_the_kv_budget_and_keeps_the_records(tiny_family):
    pool = make_pool(tiny_family, patch_tokens=3, seed=5)
    per_token = kv_bytes_per_token(pool)
    assert len(per_token) == 3 and all(b > 0 for b in per_token)
    fresh = [Trace(f"q{i}", q, 10) for i, q in enumerate(QUERIES)]
    need = [KVBudget(pool, 10**12).estimate(t) for t in fresh]
    budget = sorted(need)[-1] + sorted(need)[-2]  # any two traces fit, no three do
    assert budget < sum(sorted(need)[:3])
    inflight: set[str] = set()
    peak = {"traces": 0, "bytes": 0}

    class Watch(RandomSwitcher):
        def decide(self, traces):
            inflight.update(t.key for t in traces)
            peak["traces"] = max(peak["traces"], len(inflight))
            peak["bytes"] = max(peak["bytes"], _stored_bytes(pool))
            return super().decide(traces)

    bounded = [Trace(f"q{i}", q, 10) for i, q in enumerate(QUERIES)]
    scheduler = Scheduler(pool, Watch(3, seed=2), max_batch=4, max_inflight_bytes=budget)
    scheduler.run(bounded, on_finished=lambda done: inflight.difference_update(t.key for t in done))
    free = [Trace(f"q{i}", q, 10) for i, q in enumerate(QUERIES)]
    Scheduler(pool, RandomSwitcher(3, seed=2), max_batch=4).run(free)
    assert peak["traces"] == 2  # the budget, not the trace count, bounded admission
    assert 0 < peak["bytes"] <= budget  # and the caches really stayed within it
    assert _records(bounded) == _records(free)
    assert _stored_bytes(pool) == 0  # finished traces (and the probes) were released


def test_a_budget_below_one_trace_is_a_clear_error(tiny_family):
    pool = make_pool(tiny_family, patch_tokens=3)
    traces = [Trace("q0", "the town", 10)]
    with pytest.raises(ConfigError, match="max_inflight_bytes=100 cannot hold one trace: 'q0'"):
        Scheduler(pool, RandomSwitcher(3), max_inflight_bytes=100).run(traces)
    with pytest.raises(ValueError, match="max_inflight_bytes must be > 0"):
        Scheduler(pool, RandomSwitcher(3), max_inflight_bytes=0)


def test_forks_of_a_read_prefix_count_only_what_they_write(tiny_family):
    """Simulated rollouts: the finishes' shared prefix is held once, so a bound that fits a few
    finishes' own tokens labels the states as an unbounded run does."""
    pool = make_pool(tiny_family, patch_tokens=2, seed=3)
    state = Trace("s0", "a red river", 8)
    pool.step([state], [0])
    per_token = sum(kv_bytes_per_token(pool))
    pool.prefill([state])
    pool.fork("s0", ["s0/f"])
    budget = KVBudget(pool, 10**12)
    # what it writes, and the one token a prefill leaves for the next call to read
    assert budget.estimate(state.fork("s0/f")) == (state.remaining_tokens + 1) * per_token
    assert budget.estimate(Trace("s1", state.query, 8)) > 8 * per_token  # a fresh trace: its prompt too
    pool.release(["s0/f"])
    bound = 3 * 8 * per_token  # three finishes' remaining tokens, far below one fresh prompt per finish
    kwargs = dict(k=4, finisher=RandomSwitcher(3, seed=1))
    free = estimate_utilities(pool, [state], ["red"], lambda q, r, ref, **m: 0.0, **kwargs)
    held = estimate_utilities(
        pool, [state], ["red"], lambda q, r, ref, **m: 0.0, max_inflight_bytes=bound, **kwargs
    )
    assert [u.responses for u in held] == [u.responses for u in free]

"""Batched rollouts: switched generation and simulated-rollout utilities."""

from __future__ import annotations

import pytest

from switchrl.backends import CandidatePool, CandidateSampling, Trace
from switchrl.backends.transformers_backend import TransformersBackend
from switchrl.policies import FixedSwitcher, RandomSwitcher
from switchrl.rollout import estimate_utilities, run_switch_generation
from tests.conftest import make_pool


@pytest.fixture()
def pool(tiny_family):
    return make_pool(tiny_family, patch_tokens=3, seed=5)


def test_generation_is_independent_of_batching(pool):
    queries = ["the town", "one two", "a red river", "the answer is"]
    a = run_switch_generation(pool, RandomSwitcher(3, seed=1), queries, max_new_tokens=12, batch_size=4)
    b = run_switch_generation(pool, RandomSwitcher(3, seed=1), queries, max_new_tokens=12, batch_size=1)
    assert [t.text for t in a] == [t.text for t in b]
    assert [t.authors for t in a] == [t.authors for t in b]
    assert all(t.done for t in a)
    assert all(t.num_tokens <= 12 for t in a)


def test_fixed_switcher_uses_one_author(pool):
    (t,) = run_switch_generation(pool, FixedSwitcher(3, 2), ["the town"], max_new_tokens=9)
    assert set(t.authors) == {2}


def test_utilities_are_means_of_k_scored_finishes(pool):
    calls = []

    def scorer(query, response, reference, **meta):
        calls.append(response)
        return float(len(response.split()) % 2)

    state = Trace(key="s0", query="the town", max_new_tokens=9)
    pool.step([state], [1])
    (u,) = estimate_utilities(
        pool, [state], ["x"], scorer, k=4, finisher=RandomSwitcher(len(pool), seed=pool.seed)
    )
    assert u.counts == [4, 4, 4]
    assert len(calls) == 12
    for i in range(3):
        assert u.utilities[i] == pytest.approx(sum(u.scores[i]) / 4)
        assert all(r.startswith(state.text) for r in u.responses[i])
    assert len(state.patches) == 1  # the state itself is untouched


def test_identical_next_patches_share_their_finishes(tiny_family):
    """Two copies of one checkpoint write the same patches: they share k finishes (half the scoring)."""
    backends = [
        TransformersBackend.from_pretrained(
            f"c{i}", str(tiny_family[0]), sampling=CandidateSampling(temperature=0)
        )
        for i in range(2)
    ]
    pool = CandidatePool(backends, patch_tokens=2, seed=0)
    calls = []

    def scorer(query, response, reference, **meta):
        calls.append(response)
        return 1.0

    state = Trace(key="s", query="the town", max_new_tokens=6)
    (shared,) = estimate_utilities(
        pool, [state], ["x"], scorer, k=3, finisher=RandomSwitcher(len(pool), seed=pool.seed)
    )
    assert len(calls) == 3 and shared.counts == [3, 3] and shared.responses[0] == shared.responses[1]
    calls.clear()
    (separate,) = estimate_utilities(
        pool,
        [state],
        ["x"],
        scorer,
        k=3,
        finisher=RandomSwitcher(len(pool), seed=pool.seed),
        share_identical=False,
    )
    assert len(calls) == 6 and separate.counts == [3, 3]

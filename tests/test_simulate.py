"""Simulated rollouts: utilities are means of exactly k scored finishes and labels are their argmax."""

from __future__ import annotations

import json

import pytest

from switchrl.backends.base import Patch
from switchrl.tasks.base import TaskInstance
from switchrl.trainers.simulate import SimulateWorker, argmax_label, make_items
from tests.conftest import make_pool


@pytest.fixture()
def pool(tiny_family):
    return make_pool(tiny_family, patch_tokens=2, seed=3)


def test_argmax_label_breaks_ties_by_seed_and_flags_them():
    assert argmax_label([0.1, 0.5, 0.2], 0, "x") == (1, False)
    label, tie = argmax_label([0.5, 0.5, 0.2], 0, "x")
    assert tie and label in (0, 1)
    assert argmax_label([0.5, 0.5, 0.2], 0, "x") == (label, tie)


def test_records_have_k_finishes_and_argmax_labels(pool):
    finishes = []

    def scorer(query, response, reference, **meta):
        finishes.append(response)
        return float("river" in response)

    instances = [
        TaskInstance(id=f"q{i}", query=q, reference="river", task="toy")
        for i, q in enumerate(["the town", "a red bridge"])
    ]
    items = make_items(instances, states_per_query=2)
    worker = SimulateWorker(pool, {"*": scorer}, k=5, max_new_tokens=8, seed=1, states_per_batch=3)
    records = worker.process(items)
    assert [r["id"] for r in records] == [i.id for i in items]
    assert len(finishes) == len(items) * 3 * 5
    for r in records:
        assert r["counts"] == [5, 5, 5]
        assert max(r["utilities"]) == r["utilities"][r["label"]]
        assert r["all_equal"] == (len(set(r["utilities"])) == 1)
        assert all(u * 5 == pytest.approx(round(u * 5)) for u in r["utilities"])  # mean of 5 binary scores
    # the same items give the same records (randomness from seed and ids only), in any batching
    again = SimulateWorker(pool, {"*": scorer}, k=5, max_new_tokens=8, seed=1, states_per_batch=1).process(
        items
    )
    assert again == records


def test_patch_json_form_round_trips():
    patch = Patch(author=2, token_ids=[5, 7], text="a b", stop_reason="eos", vocab="v1", probs=(0.25, 0.75))
    data = patch.to_dict()
    assert data["probs"] == [0.25, 0.75] and json.loads(json.dumps(data)) == data
    assert Patch.from_dict(data) == patch
    assert list(patch.to_dict(("text", "author"))) == ["text", "author"]  # the order asked for
    assert Patch.from_dict({"author": 1, "token_ids": [3], "text": "x"}) == Patch(1, [3], "x")
    with pytest.raises(ValueError, match="no field"):
        Patch.from_dict({"author": 1, "token_ids": [3], "text": "x", "name": "c1"})

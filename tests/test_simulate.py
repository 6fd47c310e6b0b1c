"""Simulated rollouts: utilities are means of exactly k scored finishes and labels are their argmax."""

from __future__ import annotations

import json

import pytest

from switchrl.backends.base import Patch
from switchrl.errors import CheckpointError
from switchrl.executors.shards import ShardStore, encode_records
from switchrl.records import SimulatedState, read_records
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


def test_a_record_round_trips_through_simulated_state_and_a_bad_one_names_field_and_file(pool, tmp_path):
    instances = [TaskInstance(id="q0", query="the town", reference="river", task="toy")]
    worker = SimulateWorker(pool, {"*": lambda q, r, ref, **m: 0.5}, k=2, max_new_tokens=8, seed=1)
    records = worker.process(make_items(instances, states_per_query=3))
    assert any(r["prefix"] for r in records)
    for r in records:  # the model is the record: same keys, values and bytes on disk
        state = SimulatedState.model_validate(r)
        assert state.model_dump(mode="json") == r
        assert encode_records([state.model_dump(mode="json")]) == encode_records([r])
        assert [p.to_patch().token_ids for p in state.prefix] == [p["token_ids"] for p in r["prefix"]]
    bad = {**records[1], "utilities": "high"}
    with ShardStore(tmp_path / "sim") as store:
        store.commit([r["id"] for r in records], [records[0], bad, records[2]])
    with pytest.raises(CheckpointError) as err:
        read_records(SimulatedState, ShardStore(tmp_path / "sim", readonly=True))
    assert str(err.value).count("\n") == 0
    assert "shard-000000.jsonl" in str(err.value) and f"record {bad['id']!r}" in str(err.value)
    assert "utilities: Input should be a valid list" in str(err.value)

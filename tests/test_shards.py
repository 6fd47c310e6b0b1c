"""Shard store and local executor: atomic shards, manifest, resume after a crash, exactly-once."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from switchrl.errors import CheckpointError, ConfigError
from switchrl.executors import ShardStore, WorkerContext, WorkerSpec, make_executor, run
from switchrl.utils.seeding import derive_seed


@dataclass(frozen=True)
class Item:
    id: str
    x: int


class Crash(RuntimeError):
    pass


class FakeWorker:
    """Deterministic: records depend only on the item id and the seed. Optionally crashes."""

    def __init__(self, config: dict, context: WorkerContext):
        self.seed = config["seed"]
        self.crash_after = config.get("crash_after")
        self.processed: list[str] = config.setdefault("log", [])

    def process(self, items):
        out = []
        for it in items:
            if self.crash_after is not None and len(self.processed) >= self.crash_after:
                raise Crash("injected crash")
            self.processed.append(it.id)
            value = derive_seed(self.seed, it.id) % 1000
            out += [{"id": it.id, "x": it.x, "k": j, "value": value + j} for j in range(it.x % 3)]
        return out


def make_fake(config: dict, context: WorkerContext) -> FakeWorker:
    return FakeWorker(config, context)


ITEMS = [Item(f"q{i}/s{i % 4}", i) for i in range(23)]


def test_run_writes_each_record_once_in_item_order(tmp_path):
    store = run(ITEMS, WorkerSpec(make_fake, {"seed": 3}), tmp_path, chunk_size=5, progress=False)
    recs = store.records()
    assert [r["id"] for r in recs] == [it.id for it in ITEMS for _ in range(it.x % 3)]
    assert len(store.shards) == 5 and store.completed_ids == {it.id for it in ITEMS}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sum(s["num_records"] for s in manifest["shards"]) == len(recs)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [s["name"] for s in manifest["shards"]]
    ds = store.to_dataset()
    assert ds.num_rows == len(recs) and ds[0] == recs[0]
    out = store.export_jsonl(tmp_path / "all.jsonl")
    assert [json.loads(line) for line in out.read_text().splitlines()] == recs


def test_resume_after_crash_gives_the_uninterrupted_records(tmp_path):
    spec = WorkerSpec(make_fake, {"seed": 7})
    reference = run(ITEMS, spec, tmp_path / "ref", chunk_size=4, progress=False).records()

    crashing = WorkerSpec(make_fake, {"seed": 7, "crash_after": 10})
    with pytest.raises(Crash):
        run(ITEMS, crashing, tmp_path / "run", chunk_size=4, progress=False)
    partial = ShardStore(tmp_path / "run", readonly=True)
    assert len(partial.completed_ids) == 8  # two whole chunks committed, the crashed one not
    # a crash between writing a shard and listing it leaves an orphan: it is ignored and removed
    (tmp_path / "run" / "shards" / "shard-000002.jsonl").write_text('{"id": "q8/s0", "junk": 1}\n')
    (tmp_path / "run" / "shards" / ".shard-000003.jsonl.tmp").write_text('{"id": "q9/s1"')

    log: list[str] = []
    resumed = run(
        ITEMS, WorkerSpec(make_fake, {"seed": 7, "log": log}), tmp_path / "run", chunk_size=4, progress=False
    )
    assert log == [it.id for it in ITEMS[8:]]  # only the missing items were processed
    assert resumed.records() == reference
    assert len(resumed.completed_ids) == len(ITEMS)


def test_order_follows_the_caller_not_completion(tmp_path):
    spec = WorkerSpec(make_fake, {"seed": 1})
    run(ITEMS[10:], spec, tmp_path, chunk_size=3, progress=False)  # later items committed first
    store = run(ITEMS, spec, tmp_path, chunk_size=3, progress=False)
    assert [r["id"] for r in store.records()] == [it.id for it in ITEMS for _ in range(it.x % 3)]
    # without an order, a reader sorts by item id
    ids = [r["id"] for r in ShardStore(tmp_path, readonly=True).records()]
    assert ids == sorted(ids)


def test_commit_rejects_duplicates_and_foreign_records(tmp_path):
    with ShardStore(tmp_path) as store:
        store.commit(["a"], [{"id": "a", "v": 1}])
        with pytest.raises(ValueError, match="already committed"):
            store.commit(["a", "b"], [])
        with pytest.raises(ValueError, match="id"):
            store.commit(["b"], [{"id": "c"}])
        with pytest.raises(ValueError, match="JSON"):
            store.commit(["b"], [{"id": "b", "v": object()}])
        assert store.completed_ids == {"a"} and len(store.shards) == 1
        with pytest.raises(CheckpointError, match="in use"):
            ShardStore(tmp_path)
    with pytest.raises(CheckpointError, match="read-only"):
        ShardStore(tmp_path, readonly=True).commit(["b"], [])


def test_tampered_shard_and_changed_config_are_clear_errors(tmp_path):
    spec = WorkerSpec(make_fake, {"seed": 1})
    run(ITEMS[:4], spec, tmp_path, fingerprint={"k": 32, "seed": 1}, progress=False)
    with pytest.raises(CheckpointError, match="differs in: k"):
        run(ITEMS, spec, tmp_path, fingerprint={"k": 16, "seed": 1}, progress=False)
    shard = next((tmp_path / "shards").iterdir())
    shard.write_text(shard.read_text().replace('"x": 1', '"x": 2'))
    with pytest.raises(CheckpointError, match="sha256"):
        ShardStore(tmp_path, readonly=True).records()


def test_bad_inputs_name_the_field(tmp_path):
    spec = WorkerSpec(make_fake, {"seed": 1})
    with pytest.raises(ValueError, match="unique"):
        run([Item("a", 1), Item("a", 2)], spec, tmp_path, progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        run(ITEMS, spec, tmp_path, chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="'id'"):
        run([{"x": 1}], spec, tmp_path, progress=False)
    with pytest.raises(ValueError, match="factory"):
        WorkerSpec("no_colon")
    with pytest.raises(ConfigError, match="replicas"):
        make_executor({"executor": "ray", "replicas": 0})
    with pytest.raises(ConfigError, match="ray_address"):
        make_executor({"executor": "ray", "ray_address": "nohost"})
    with pytest.raises(ConfigError, match="placment: unknown key"):
        make_executor({"placment": "pack"})


def test_factory_path_and_worker_built_once(tmp_path):
    spec = WorkerSpec("tests.test_shards:make_fake", {"seed": 2})
    assert spec.resolve().__name__ == "make_fake"
    executor = make_executor("local")
    worker = executor.worker(spec)
    assert executor.worker(spec) is worker
    a = run(ITEMS[:6], spec, tmp_path / "a", executor=executor, chunk_size=2, progress=False).records()
    b = run(
        ITEMS[:6], WorkerSpec(make_fake, {"seed": 2}), tmp_path / "b", chunk_size=6, progress=False
    ).records()
    assert a == b and worker.processed == [it.id for it in ITEMS[:6]]

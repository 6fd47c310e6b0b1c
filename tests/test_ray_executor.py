"""Ray executor: same records as local, exactly-once under actor deaths, fast clear errors."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from switchrl.executors import ExecutorConfig, ExecutorError, ShardStore, WorkerContext, WorkerSpec, run  # noqa: E402
from switchrl.executors.ray_executor import RayExecutor  # noqa: E402
from switchrl.utils.seeding import derive_seed  # noqa: E402

CPU = {"executor": "ray", "replicas": 2, "gpus_per_candidate": 0, "max_restarts": 1, "max_task_retries": 1}


@dataclass(frozen=True)
class Item:
    id: str
    query: str


ITEMS = [Item(f"q{i}", " ".join(["the", "town", "river", "one"][: 1 + i % 4])) for i in range(12)]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local Ray for the module: 2 CPUs and one logical GPU (to exercise GPU placement)."""
    if ray.is_initialized():  # left over by another module: this one needs its own resources
        ray.shutdown()
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )  # actors import this module's workers
    yield
    ray.shutdown()


class FaultyWorker:
    """Deterministic records; kills its own process once when it meets ``die_on`` (a marker file
    remembers), raises on ``raise_on``."""

    def __init__(self, config: dict, context: WorkerContext):
        self.config = config

    def process(self, items):
        marker = Path(self.config.get("marker", "/nonexistent/x"))
        if any(it.id == self.config.get("die_on") for it in items) and not marker.exists():
            marker.touch()
            os._exit(1)
        if any(it.id == self.config.get("raise_on") for it in items):
            raise KeyError(f"bad item {self.config['raise_on']}")
        return [
            {"id": it.id, "pid": 0, "value": derive_seed(self.config["seed"], it.id) % 997} for it in items
        ]


def make_faulty(config: dict, context: WorkerContext) -> FaultyWorker:
    return FaultyWorker(config, context)


class UtilityWorker:
    """A tiny real worker: a candidate pool from checkpoint paths, simulated-rollout utilities per item."""

    def __init__(self, config: dict, context: WorkerContext):
        # imported here, so the actors of the other tests start without torch / transformers
        from switchrl.backends import CandidatePool, CandidateSampling
        from switchrl.backends.transformers_backend import TransformersBackend

        backends = [
            TransformersBackend.from_pretrained(f"c{i}", p, sampling=CandidateSampling(temperature=1.0))
            for i, p in enumerate(config["paths"])
        ]
        self.pool = CandidatePool(backends, patch_tokens=2, seed=config["seed"])

    def process(self, items):
        from switchrl.backends import Trace
        from switchrl.policies import RandomSwitcher
        from switchrl.rollout import estimate_utilities

        states = [Trace(key=it.id, query=it.query, max_new_tokens=6) for it in items]
        self.pool.step(states, [int(it.id[1:]) % len(self.pool) for it in items])

        def scorer(query, response, reference, **meta):
            return float(reference in response)

        est = estimate_utilities(
            self.pool,
            states,
            ["river"] * len(items),
            scorer,
            k=2,
            finisher=RandomSwitcher(len(self.pool), seed=self.pool.seed),
        )
        self.pool.release([s.key for s in states])
        return [
            {"id": it.id, "state": s.text, "utilities": e.utilities, "responses": e.responses}
            for it, s, e in zip(items, states, est)
        ]


def make_utility_worker(config: dict, context: WorkerContext) -> UtilityWorker:
    return UtilityWorker(config, context)


def test_ray_matches_local_with_a_real_worker(tiny_family, tmp_path):
    spec = WorkerSpec(make_utility_worker, {"paths": [str(p) for p in tiny_family], "seed": 4}, num_models=3)
    local = run(ITEMS[:6], spec, tmp_path / "local", chunk_size=2, progress=False).records()
    remote = run(ITEMS[:6], spec, tmp_path / "ray", executor=CPU, chunk_size=2, progress=False)
    assert remote.records() == local
    assert {s.worker for s in remote.shards} == {"r0", "r1"}  # both actors worked


def test_actor_death_is_retried_and_records_are_exactly_once(tmp_path):
    spec = WorkerSpec(make_faulty, {"seed": 1})
    expected = run(ITEMS, spec, tmp_path / "local", chunk_size=3, progress=False).records()
    # restarted by Ray (max_restarts=1) and the chunk retried on it; then an actor that stays dead
    for name, overrides in {"restart": {}, "dead": {"max_restarts": 0, "max_task_retries": 0}}.items():
        faulty = WorkerSpec(
            make_faulty, {"seed": 1, "die_on": "q7", "marker": str(tmp_path / f"{name}.marker")}
        )
        with RayExecutor(ExecutorConfig(**{**CPU, **overrides})) as executor:
            store = run(
                ITEMS, faulty, tmp_path / name / "out", executor=executor, chunk_size=3, progress=False
            )
            # with restarts Ray retries the chunk on the restarted actor; without, the driver moves it
            assert len(executor.actors) == (2 if name == "restart" else 1)
        assert (tmp_path / f"{name}.marker").exists()  # the fault happened
        assert store.records() == expected
        on_disk = [r["id"] for r in ShardStore(tmp_path / name / "out", readonly=True).records()]
        assert sorted(on_disk) == sorted(it.id for it in ITEMS)  # each once


def test_worker_exception_is_raised_after_committing_finished_chunks(tmp_path):
    spec = WorkerSpec(make_faulty, {"seed": 1, "raise_on": "q4"})
    with pytest.raises(KeyError, match="bad item q4"):
        run(ITEMS, spec, tmp_path, executor=CPU, chunk_size=3, progress=False)
    done = ShardStore(tmp_path, readonly=True).completed_ids
    assert "q4" not in done and {"q0", "q1", "q2"} <= done  # no retry of a bug; finished work is kept
    store = run(ITEMS, WorkerSpec(make_faulty, {"seed": 1}), tmp_path, chunk_size=3, progress=False)
    assert sorted(r["id"] for r in store.records()) == sorted(it.id for it in ITEMS)


def test_bad_address_is_a_quick_clear_error():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(ExecutorError, match=f"ray_address 'ray://127.0.0.1:{port}'"):
        RayExecutor(ExecutorConfig(executor="ray", ray_address=f"ray://127.0.0.1:{port}")).connect()
    assert time.perf_counter() - start < 5


@pytest.fixture()
def busy_cpu():
    """Another job holds one of the 2 CPUs."""
    busy = ray.util.placement_group([{"CPU": 1}])
    ray.get(busy.ready())
    yield
    ray.util.remove_placement_group(busy)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"placement": "spread", "gpus_per_candidate": 8}, "needs .*'GPU': 24.* largest Ray node has GPU=1"),
        ({"num_cpus_per_replica": 8, "gpus_per_candidate": 0}, "largest Ray node has GPU=1.0, CPU=2"),
        ({"replicas": 3, "gpus_per_candidate": 0}, "holds at most 2 replicas"),
        (
            {"replicas": 2, "gpus_per_candidate": 0, "placement_timeout_s": 1},
            "could not be placed within 1 s",
        ),
    ],
)
def test_impossible_placement_is_a_quick_clear_error(tmp_path, busy_cpu, overrides, message):
    start = time.perf_counter()
    with pytest.raises(ExecutorError, match=message):
        run(
            ITEMS,
            WorkerSpec(make_faulty, {"seed": 0}, num_models=3),
            tmp_path,
            executor={**CPU, **overrides},
            progress=False,
        )
    assert time.perf_counter() - start < 10
    assert not ShardStore(tmp_path, readonly=True).shards  # nothing written


def test_gpu_placement_packs_or_spreads_models():
    executor = RayExecutor(ExecutorConfig(executor="ray", placement="pack", gpus_per_candidate=0.25))
    spec = WorkerSpec(make_faulty, {}, num_models=3)
    assert executor.placement(spec) == ({"CPU": 1.0, "GPU": 0.75}, ("cuda:0",) * 3)
    executor.config.placement = "spread"
    with pytest.raises(ExecutorError, match="whole number"):
        executor.placement(spec)
    executor.config.gpus_per_candidate = 2
    assert executor.placement(spec) == ({"CPU": 1.0, "GPU": 6}, ("cuda:0", "cuda:2", "cuda:4"))

"""The Ray executor: actors that each hold one replica of the worker (e.g. the candidate pool).

:class:`RayActors` (connect, placement, start / stop actors) is shared with the RL rollout pool
(:class:`switchrl.executors.remote_pool.RayCandidatePool`).

Chunks go to idle actors from a queue in the driver; results come back to the driver, which writes
the shards, so a chunk whose actor died is simply run again (by Ray on the restarted actor, within
``max_task_retries``, or by the driver on another live actor) and no record is written twice.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from switchrl.executors.base import (
    ChunkResult,
    ClosesOnExit,
    ExecutorConfig,
    ExecutorError,
    WorkerContext,
    WorkerSpec,
    parse_host_port,
)

logger = logging.getLogger(__name__)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError("executor 'ray' needs Ray: pip install 'switchrl[ray]'") from None
    return ray


class _Replica:
    """One actor: builds the worker once, then processes chunks."""

    def __init__(self, spec: WorkerSpec, context: WorkerContext):
        self.worker = spec.build(context)

    def process(self, items: list[Any]) -> list[dict]:
        return self.worker.process(items)

    def ping(self) -> int:
        return os.getpid()


class RayActors(ClosesOnExit):
    """What every switchrl use of Ray shares: connect, place replicas, start and stop their actors.

    Connects on first use: to ``config.ray_address`` (checked with a TCP probe first, so a bad address
    fails in ``connect_timeout_s``), to an already initialised Ray, or to a local Ray it starts and
    later shuts down (:meth:`close`). Each replica is one actor in its own placement group of one
    bundle (see :meth:`replica_placement`), so a replica is placed whole or not at all.
    """

    def __init__(self, config: ExecutorConfig | None = None):
        self.config = config or ExecutorConfig(executor="ray")
        self.ray = _import_ray()
        self._started_ray = False
        self._actors: list[Any] = []
        self._groups: list[Any] = []

    # -- cluster ---------------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect to (or start) Ray; raises :class:`ExecutorError` quickly if the address is bad."""
        ray, address = self.ray, self.config.ray_address
        if address not in (None, "auto"):
            host, port = parse_host_port(address)  # type: ignore[misc]  (validated by the config)
            try:
                socket.create_connection((host, port), timeout=self.config.connect_timeout_s).close()
            except OSError as err:
                raise ExecutorError(
                    f"ray_address {address!r}: cannot reach {host}:{port} ({err}); "
                    "is the Ray head running? (ray start --head)"
                ) from None
        if ray.is_initialized():
            return
        try:
            if address is None:
                ray.init(include_dashboard=False, log_to_driver=False)
                self._started_ray = True
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, TimeoutError) as err:
            raise ExecutorError(f"ray_address {address!r}: cannot connect to Ray: {err}") from None

    def replica_placement(self, num_models: int) -> tuple[dict[str, float], tuple[str, ...]]:
        """The resource bundle of a replica holding ``num_models`` models, and their devices (after
        the CPU fallback on a cluster without GPUs)."""
        cfg, n = self.config, num_models
        gpus = cfg.gpus_per_candidate
        if gpus > 0 and not self.ray.cluster_resources().get("GPU"):
            logger.warning("the Ray cluster has no GPUs: replicas run on CPU (gpus_per_candidate ignored)")
            gpus = 0.0
        bundle = {"CPU": cfg.num_cpus_per_replica}
        if gpus == 0:
            return bundle, ("cpu",) * n
        if cfg.placement == "pack":
            bundle["GPU"] = min(1.0, n * gpus)
            return bundle, ("cuda:0",) * n
        if gpus != int(gpus):
            raise ExecutorError(
                f"placement 'spread' gives each model whole GPUs; gpus_per_candidate={gpus} "
                "must be a whole number (use placement 'pack' to share a GPU)"
            )
        bundle["GPU"] = n * gpus
        return bundle, tuple(f"cuda:{i * int(gpus)}" for i in range(n))

    def num_replicas(self, bundle: dict[str, float], share: int = 1) -> int:
        """``config.replicas``, checked against the cluster; ``auto``: as many as the free resources
        hold, or, with ``share`` > 1 drivers splitting the cluster (e.g. accelerate ranks), that many's
        share of the whole cluster."""
        nodes = [node["Resources"] for node in self.ray.nodes() if node.get("Alive")]
        if not any(all(res.get(k, 0) >= v for k, v in bundle.items()) for res in nodes):
            largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
            raise ExecutorError(
                f"placement {self.config.placement!r} needs {bundle} per replica on one node, but the largest "
                f"Ray node has GPU={largest.get('GPU', 0)}, CPU={largest.get('CPU', 0)}; lower "
                "gpus_per_candidate / num_cpus_per_replica, use placement 'pack', or add bigger nodes"
            )
        if self.config.replicas != "auto":
            total = self.ray.cluster_resources()
            if self.config.replicas > (most := self._fits(total, bundle)):
                raise ExecutorError(
                    f"replicas={self.config.replicas}: the Ray cluster ({total}) holds at most "
                    f"{most} replicas of {bundle}; lower replicas or use 'auto'"
                )
            return int(self.config.replicas)
        if share > 1:
            total = self.ray.cluster_resources()
            if (fits := self._fits(total, bundle) // share) < 1:
                raise ExecutorError(
                    f"replicas 'auto': the Ray cluster ({total}) holds fewer than one replica "
                    f"({bundle}) for each of {share} processes; add resources or lower the "
                    "number of processes"
                )
            return fits
        free = self.ray.available_resources()
        if (fits := self._fits(free, bundle)) < 1:
            raise ExecutorError(
                f"replicas 'auto': no room for one replica ({bundle}) in the free "
                f"resources of the Ray cluster ({free})"
            )
        return fits

    @staticmethod
    def _fits(resources: dict[str, float], bundle: dict[str, float]) -> int:
        return min(math.floor(resources.get(k, 0) / v + 1e-9) for k, v in bundle.items())

    def start_actors(
        self,
        cls: type,
        num_models: int,
        args: Callable[[int, tuple[str, ...]], tuple],
        name: Callable[[int], str] | None = None,
        share: int = 1,
    ) -> list[Any]:
        """Start one actor of ``cls`` per replica, each in its own placement group (placed within
        ``placement_timeout_s`` or an :class:`ExecutorError`); ``args(replica, devices)`` gives its
        constructor arguments, ``name(replica)`` its Ray actor name. Replaces any running actors."""
        self._stop_actors()
        self.connect()
        ray = self.ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle, devices = self.replica_placement(num_models)
        n = self.num_replicas(bundle, share)
        self._groups = [ray.util.placement_group([bundle], strategy="PACK") for _ in range(n)]
        ready, _ = ray.wait(
            [g.ready() for g in self._groups], num_returns=n, timeout=self.config.placement_timeout_s
        )
        if len(ready) < n:
            free = ray.available_resources()
            self._stop_actors()
            raise ExecutorError(
                f"replicas={n} x {bundle} could not be placed within {self.config.placement_timeout_s:g} s "
                f"(placement_timeout_s); only {len(ready)} fit the free resources {free}"
            )
        remote = ray.remote(cls)
        self._actors = [
            remote.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                max_restarts=self.config.max_restarts,
                max_task_retries=self.config.max_task_retries,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
                **({"name": name(i)} if name is not None else {}),
            ).remote(*args(i, devices))
            for i, group in enumerate(self._groups)
        ]
        return self._actors

    @property
    def lost_actor_errors(self) -> tuple[type[BaseException], ...]:
        """What Ray raises for a call whose actor died or is restarting (as opposed to an error of the call)."""
        return (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError)

    @property
    def actors(self) -> list[Any]:
        """The handles of the actors not known to be dead."""
        return [a for a in self._actors if a is not None]

    def _stop_actors(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        for group in self._groups:
            self.ray.util.remove_placement_group(group)
        self._actors, self._groups = [], []

    def close(self) -> None:
        """Kill the actors, free their placement groups, and stop Ray if this object started it."""
        if self.ray.is_initialized():
            self._stop_actors()
            if self._started_ray:
                self.ray.shutdown()
                self._started_ray = False


class RayExecutor(RayActors):
    """Runs chunks on ``replicas`` Ray actors placed per :class:`ExecutorConfig` (see :class:`RayActors`).

    Actors are reused across :meth:`map_chunks` calls with the same spec.
    """

    def __init__(self, config: ExecutorConfig | None = None):
        super().__init__(config)
        self._spec: WorkerSpec | None = None

    def placement(self, spec: WorkerSpec) -> tuple[dict[str, float], tuple[str, ...]]:
        """The resource bundle of one replica of ``spec`` and its models' devices."""
        return self.replica_placement(spec.num_models)

    def _start(self, spec: WorkerSpec) -> None:
        if self._spec is spec and self.actors:
            return
        self.start_actors(_Replica, spec.num_models, lambda i, devices: (spec, WorkerContext(i, devices)))
        self._spec = spec

    # -- work ------------------------------------------------------------------------------------
    def map_chunks(self, spec: WorkerSpec, chunks: Sequence[Sequence[Any]]) -> Iterator[ChunkResult]:
        """Yield each chunk's records as they arrive. A chunk whose actor died is run again elsewhere;
        a worker's own exception stops dispatching, the running chunks are drained, then it is raised."""
        if not chunks:
            return
        self._start(spec)
        ray = self.ray
        actor_errors = self.lost_actor_errors
        pending = deque(range(len(chunks)))
        idle = deque(i for i, actor in enumerate(self._actors) if actor is not None)
        alive = set(idle)
        running: dict[Any, tuple[str, int, int]] = {}  # ref -> (kind, chunk, actor)
        failure: BaseException | None = None
        last_death: BaseException | None = None
        while running or (pending and alive and failure is None):
            while pending and idle and failure is None:
                a, c = idle.popleft(), pending.popleft()
                running[self._actors[a].process.remote(list(chunks[c]))] = ("chunk", c, a)
            if not running:
                break
            (ref,), _ = ray.wait(list(running), num_returns=1)
            kind, c, a = running.pop(ref)
            try:
                value = ray.get(ref)
            except actor_errors as err:
                if getattr(err, "actor_init_failed", False):
                    self._stop_actors()
                    raise ExecutorError(
                        f"building the worker failed on Ray actor r{a} "
                        f"(WorkerSpec.factory {spec.factory!r}): {err}"
                    ) from None
                last_death = err
                if (
                    kind == "chunk"
                ):  # run it again; probe the actor: back to work if restarted, dropped if dead
                    logger.warning(
                        "Ray actor r%d died during chunk %d; running the chunk again: %s", a, c, err
                    )
                    pending.appendleft(c)
                    running[self._actors[a].ping.remote()] = ("ping", -1, a)
                else:
                    logger.warning("Ray actor r%d is dead; continuing with %d actors", a, len(alive) - 1)
                    alive.discard(a)
                    self._actors[a] = None
                continue
            except Exception as err:  # the worker raised: a bug or bad input, not a lost actor
                failure = failure or err
                idle.append(a)
                continue
            idle.append(a)
            if kind == "chunk":
                yield ChunkResult(c, value, f"r{a}")
        if failure is not None:
            raise failure
        if pending:
            raise ExecutorError(
                f"every Ray actor died; {len(pending)} chunks were not run. Committed shards "
                "are kept: run again to resume (raise max_restarts to tolerate more failures). "
                f"Last error: {last_death}"
            )

"""RL rollouts on Ray: a :class:`~switchrl.backends.base.Pool` whose candidates live in Ray actors.

The switcher (the policy being trained) stays in the trainer process; only the candidates move.
Each actor holds one full candidate pool, built once from the candidate configs. Traces are routed
to actors stickily by key, because an actor keeps the KV caches of the traces it wrote: a new key
goes to the actor with the fewest live traces, :meth:`RayCandidatePool.fork` sends the new keys to
the source's actor, :meth:`RayCandidatePool.release` frees them there. A step is one concurrent call
per actor that has rows; the driver appends the returned patches to its own traces, exactly as
:meth:`CandidatePool.step` does. Patches are seeded by (seed, trace key, patch index, candidate), so
the rollouts equal the local ones whatever the routing.

Faults: an actor that dies is restarted by Ray (``max_restarts``) and its calls retried
(``max_task_retries``); an actor that stays dead has its traces moved to the others. Either way the
traces lose their KV caches, and their next patch re-reads them from the driver's copy (a prefill of
the trace so far), so nothing is lost.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from switchrl.backends.base import Patch, Trace
from switchrl.backends.pool import CandidateNames, CandidatePool, check_pool, check_step
from switchrl.config import CandidateConfig, parse
from switchrl.errors import ConfigError
from switchrl.executors.base import ClosesOnExit, ExecutorConfig, ExecutorError
from switchrl.executors.ray_executor import RayActors

logger = logging.getLogger(__name__)
_pools = itertools.count()  # tells apart the actor names of several pools in one driver


class _PoolReplica:
    """One actor: a candidate pool built once, writing patches for the traces routed to it."""

    def __init__(
        self,
        candidates: list[dict],
        patch_tokens: int,
        seed: int,
        devices: tuple[str, ...],
        truncate: str | None = None,
    ):
        configs = [CandidateConfig.model_validate(c) for c in candidates]
        if devices:
            configs = [c.model_copy(update={"device": d}) for c, d in zip(configs, devices)]
        self.pool = CandidatePool.from_configs(
            configs, patch_tokens=patch_tokens, seed=seed, truncate=truncate
        )

    def names(self) -> list[str]:
        return self.pool.names

    def step(self, traces: list[Trace], actions: list[int]) -> list[Patch]:
        return self.pool.step(traces, actions)

    def prefill(self, traces: list[Trace]) -> list[None]:
        self.pool.prefill(traces)
        return [None] * len(traces)

    def fork(self, src_key: str, dst_keys: list[str]) -> None:
        self.pool.fork(src_key, dst_keys)

    def release(self, keys: list[str]) -> None:
        self.pool.release(keys)


class RayCandidatePool(CandidateNames, ClosesOnExit):
    """A :class:`~switchrl.backends.base.Pool` for RL rollouts, like :class:`CandidatePool` but with the
    candidates on ``executor.replicas`` Ray actors (placement, restarts and timeouts from ``executor``).

    ``rank`` / ``world_size`` (default: the ``RANK`` / ``WORLD_SIZE`` that ``accelerate launch`` sets)
    name the actors ``switchrl-rollout-rank{rank}-r{i}``; every rank of a multi-process trainer builds
    its own pool against the same cluster, and ``replicas: auto`` then gives each rank its share.
    """

    def __init__(
        self,
        candidates: Sequence[CandidateConfig],
        patch_tokens: int = 50,
        seed: int = 0,
        executor: ExecutorConfig | Mapping | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        truncate: str | None = None,
    ):
        names = check_pool(candidates, patch_tokens)
        config = (
            executor
            if isinstance(executor, ExecutorConfig)
            else parse(ExecutorConfig, {"executor": "ray", **(executor or {})}, "executor")
        )
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if self.rank < 0 or world_size < 1 or self.rank >= world_size:
            raise ConfigError(
                f"rank must be in 0..world_size-1, got rank={self.rank}, world_size={world_size}"
            )
        self.patch_tokens, self.seed, self._names = patch_tokens, seed, names
        self._cluster = RayActors(config)
        self.ray = self._cluster.ray
        self._lost = self._cluster.lost_actor_errors
        dumped = [c.model_dump(mode="json") for c in candidates]
        suffix = f"-{n}" if (n := next(_pools)) else ""

        def name(i: int) -> str:
            return f"switchrl-rollout-rank{self.rank}-r{i}{suffix}"

        actors = self._cluster.start_actors(
            _PoolReplica,
            len(candidates),
            lambda i, devices: (dumped, patch_tokens, seed, devices, truncate),
            name=name,
            share=world_size,
        )
        self.actor_names = [name(i) for i in range(len(actors))]
        self._actors: list[Any] = list(actors)
        for a, actor in enumerate(self._actors):  # wait until every actor has loaded its models
            try:
                loaded = self.ray.get(actor.names.remote())
            except self._lost as err:
                self.close()
                cause = str(err).strip().splitlines()[-1]  # the last line of the actor's traceback
                raise ExecutorError(
                    f"Ray actor {self.actor_names[a]} could not build the candidate pool: {cause}"
                ) from err
            if loaded != names:
                self.close()
                raise ExecutorError(
                    f"Ray actor {self.actor_names[a]} holds candidates {loaded}, expected {names}"
                )
        self._route: dict[str, int] = {}  # trace key -> actor index
        self._load = [0] * len(self._actors)  # routed keys per actor

    # -- the Pool interface ------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._names)

    def step(self, traces: Sequence[Trace], actions: Sequence[int]) -> list[Patch]:
        """Let candidate ``actions[i]`` write the next patch of ``traces[i]`` and append it; one
        concurrent call per actor holding some of the traces. Returns the patches in trace order."""
        out = self._dispatch("step", traces, check_step(traces, actions, self._names))
        for trace, patch in zip(traces, out):
            trace.patches.append(patch)
        return out

    def prefill(self, traces: Sequence[Trace]) -> None:
        """Let every candidate read ``traces`` as they stand (on their actors), e.g. before forking them."""
        self._dispatch("prefill", traces)

    def fork(self, src_key: str, dst_keys: Sequence[str]) -> None:
        """Let ``dst_keys`` start from what ``src_key`` has read, on ``src_key``'s actor."""
        self.release([k for k in dst_keys if k in self._route])
        a = self._route.get(src_key)
        if a is None:  # nothing read yet: the new keys start from scratch wherever they are routed
            return
        self._actors[a].fork.remote(src_key, list(dst_keys))
        for key in dst_keys:
            self._route[key] = a
        self._load[a] += len(dst_keys)

    def release(self, keys: Sequence[str]) -> None:
        """Free the traces' caches on their actors and forget their routes."""
        by_actor: dict[int, list[str]] = defaultdict(list)
        for key in keys:
            if (a := self._route.pop(key, None)) is not None:
                by_actor[a].append(key)
                self._load[a] -= 1
        for a, ks in by_actor.items():
            self._actors[a].release.remote(ks)

    # -- routing and faults ------------------------------------------------------------------------
    def _actor_of(self, key: str) -> int:
        """The actor of ``key``; a new key goes to the live actor with the fewest traces."""
        if (a := self._route.get(key)) is None:
            a = min(
                (i for i, actor in enumerate(self._actors) if actor is not None), key=self._load.__getitem__
            )
            self._route[key] = a
            self._load[a] += 1
        return a

    def _dispatch(self, method: str, traces: Sequence[Trace], actions: list[int] | None = None) -> list[Any]:
        """Call ``method`` on every actor holding some of ``traces`` (concurrently); results in trace order."""
        rows: dict[int, list[int]] = defaultdict(list)
        for i, trace in enumerate(traces):
            rows[self._actor_of(trace.key)].append(i)
        out: list[Any] = [None] * len(traces)
        for _ in range(len(self._actors) + 1):  # each retry round loses at least one actor, or succeeds
            calls = {
                a: getattr(self._actors[a], method).remote(
                    [traces[i] for i in r], *([[actions[i] for i in r]] if actions is not None else [])
                )
                for a, r in rows.items()
            }
            failed, error = self._collect(calls, rows, out)
            if error is not None:
                raise error
            if not failed:
                return out
            rows = self._recover(failed, rows, traces)
        raise ExecutorError(f"Ray rollout actors keep failing; last errors: {failed}")

    def _collect(
        self, calls: dict[int, Any], rows: dict[int, list[int]], out: list[Any]
    ) -> tuple[dict[int, BaseException], BaseException | None]:
        """Fill ``out`` from every call that succeeded; return the lost actors' errors and the first
        error raised by a pool itself (a bug or bad input: not retried)."""
        failed: dict[int, BaseException] = {}
        error: BaseException | None = None
        for a, ref in calls.items():
            try:
                values = self.ray.get(ref)
            except self._lost as err:
                if getattr(err, "actor_init_failed", False):
                    return failed, ExecutorError(
                        f"Ray actor {self.actor_names[a]} could not rebuild the "
                        f"candidate pool after a restart: {err}"
                    )
                failed[a] = err
                continue
            except Exception as err:
                error = error or err
                continue
            for i, value in zip(rows[a], values):
                out[i] = value
        return failed, error

    def _recover(
        self, failed: dict[int, BaseException], rows: dict[int, list[int]], traces: Sequence[Trace]
    ) -> dict[int, list[int]]:
        """The rows to send again: to the same actor if Ray restarted it, else to the live actors
        (all of a dead actor's traces move). The traces are re-read from scratch either way."""
        again: dict[int, list[int]] = defaultdict(list)
        for a, err in failed.items():
            keys = [traces[i].key for i in rows[a]]
            try:
                self.ray.get(self._actors[a].release.remote(keys))  # alive again: drop any half-written state
                logger.warning(
                    "Ray actor %s failed a step and is back; writing its %d traces again: %s",
                    self.actor_names[a],
                    len(keys),
                    err,
                )
                again[a].extend(rows[a])
                continue
            except self._lost:
                pass
            self._actors[a] = None
            logger.warning(
                "Ray actor %s is dead; moving its traces to the other actors: %s", self.actor_names[a], err
            )
            if not any(actor is not None for actor in self._actors):
                raise ExecutorError(
                    f"every Ray rollout actor is dead ({', '.join(self.actor_names)}); last error "
                    f"from {self.actor_names[a]}: {err}. Raise executor.max_restarts to tolerate "
                    "more failures"
                ) from None
            moved = [k for k, b in self._route.items() if b == a]
            for key in moved:
                del self._route[key]
            self._load[a] = 0
            for i in rows[a]:
                again[self._actor_of(traces[i].key)].append(i)
        return again

    def close(self) -> None:
        """Kill the actors (and stop Ray if this pool started it)."""
        self._cluster.close()

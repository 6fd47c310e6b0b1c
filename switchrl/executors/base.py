"""The executor protocol: work items in, JSON records out, on workers built once per process.

A *work item* is any small picklable object with a stable string ``id`` (e.g. a dataclass holding a
query id and a state id). A *worker* is built from a picklable :class:`WorkerSpec` once per process
(locally once per run, on Ray once per actor, so models load once) and turns a chunk of items into
JSON-serialisable records, each carrying its item's id under ``"id"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import Field, field_validator

from switchrl.config import StrictModel
from switchrl.errors import SwitchRLError

RECORD_ID_KEY = "id"


class ExecutorError(SwitchRLError, RuntimeError):
    """The executor cannot run the work: unreachable cluster, unsatisfiable placement, dead workers."""


@runtime_checkable
class Worker(Protocol):
    """Processes chunks of work items; built once per process from a :class:`WorkerSpec`."""

    def process(self, items: Sequence[Any]) -> list[dict]:
        """Records for ``items``; each record is a JSON-serialisable dict with ``"id"``."""
        ...


@dataclass(frozen=True)
class WorkerContext:
    """Where a worker runs. ``devices`` has one torch device per model (``None``: use the config's)."""

    replica: int = 0
    devices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class WorkerSpec:
    """How to build a worker: ``factory(config, context) -> Worker``.

    ``factory`` is a top-level function or a ``"module:function"`` path (both pickle by reference);
    ``num_models`` is how many models one worker holds (candidates + switcher), which sizes its
    GPU placement on Ray.
    """

    factory: Callable[[dict, WorkerContext], Worker] | str
    config: dict = field(default_factory=dict)
    num_models: int = 1

    def __post_init__(self) -> None:
        if not (callable(self.factory) or (isinstance(self.factory, str) and ":" in self.factory)):
            raise ValueError(
                f"WorkerSpec.factory must be a callable or 'module:function', got {self.factory!r}"
            )
        if not isinstance(self.config, dict):
            raise ValueError(f"WorkerSpec.config must be a dict, got {type(self.config).__name__}")
        if not isinstance(self.num_models, int) or self.num_models < 1:
            raise ValueError(f"WorkerSpec.num_models must be an int >= 1, got {self.num_models!r}")

    def resolve(self) -> Callable[[dict, WorkerContext], Worker]:
        """The factory function (imports a ``"module:function"`` path)."""
        if callable(self.factory):
            return self.factory
        module, _, name = self.factory.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"WorkerSpec.factory {self.factory!r} cannot be imported: {err}") from None

    def build(self, context: WorkerContext | None = None) -> Worker:
        """Build the worker (call once per process)."""
        worker = self.resolve()(self.config, context or WorkerContext())
        if not isinstance(worker, Worker):
            raise TypeError(
                f"WorkerSpec.factory {self.factory!r} returned {type(worker).__name__}, "
                "which has no process(items) method"
            )
        return worker


@dataclass
class ChunkResult:
    """The records of one chunk, and the worker that produced them (e.g. ``"local"``, ``"r1"``)."""

    index: int
    records: list[dict]
    worker: str


_Closing = TypeVar("_Closing", bound="ClosesOnExit")


class ClosesOnExit:
    """``with obj: ...`` calls ``obj.close()`` on the way out; subclasses define :meth:`close`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Closing) -> _Closing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Executor(Protocol):
    """Runs chunks of items on workers; yields results as they complete (any order)."""

    def map_chunks(self, spec: WorkerSpec, chunks: Sequence[Sequence[Any]]) -> Iterator[ChunkResult]: ...

    def close(self) -> None: ...


class ExecutorConfig(StrictModel):
    """Where work runs: ``local`` (in this process) or ``ray`` (actors, each holding one replica).

    Placement on Ray: ``pack`` puts a replica's models on one GPU (a replica asks for
    ``min(1, num_models x gpus_per_candidate)`` GPUs, so small models share a GPU); ``spread`` gives
    each model its own GPU(s) (``num_models x gpus_per_candidate`` GPUs on one node). A cluster
    without GPUs runs replicas on CPU.
    """

    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(
        None, description="None: start a local Ray on demand; 'auto': the running cluster; 'ray://host:port'"
    )
    replicas: int | Literal["auto"] = Field(
        "auto", description="actors, or 'auto': as many as the cluster holds"
    )
    placement: Literal["pack", "spread"] = "pack"
    gpus_per_candidate: float = Field(1.0, ge=0)
    num_cpus_per_replica: float = Field(1.0, gt=0)
    max_restarts: int = Field(2, ge=-1, description="restarts of a dead actor (-1: unlimited)")
    max_task_retries: int = Field(2, ge=-1, description="retries of a chunk whose actor died (-1: unlimited)")
    connect_timeout_s: float = Field(10.0, gt=0)
    placement_timeout_s: float = Field(30.0, gt=0)

    def overridden(self, **values: Any) -> ExecutorConfig:
        """A copy with ``values`` (e.g. the CLI's ``executor`` / ``ray_address``) applied and validated;
        ``None`` values are left out (``ray_address=""`` selects a local Ray)."""
        from switchrl.config import parse

        changed = {k: v for k, v in values.items() if v is not None}
        return parse(ExecutorConfig, {**self.model_dump(), **changed}, "executor") if changed else self

    @field_validator("replicas")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("replicas must be >= 1 or 'auto'")
        return v

    @field_validator("ray_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v in (None, "", "local"):
            return None
        if v != "auto" and not parse_host_port(v):
            raise ValueError("ray_address must be empty, 'auto', 'host:port' or 'ray://host:port'")
        return v


def parse_host_port(address: str) -> tuple[str, int] | None:
    """``("host", port)`` from ``"host:port"`` or ``"ray://host:port"``; ``None`` if malformed."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def chunked(items: Sequence[Any], size: int) -> Iterable[list[Any]]:
    """Consecutive chunks of ``size`` items (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])

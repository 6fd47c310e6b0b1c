"""The in-process executor: one worker, built once, runs the chunks in order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from switchrl.executors.base import ChunkResult, ClosesOnExit, Worker, WorkerContext, WorkerSpec


class LocalExecutor(ClosesOnExit):
    """Runs every chunk in this process. The worker of a spec is built on first use and reused."""

    def __init__(self) -> None:
        self._workers: dict[int, tuple[WorkerSpec, Worker]] = {}

    def worker(self, spec: WorkerSpec) -> Worker:
        """The worker for ``spec`` (built once per executor)."""
        key = id(spec)
        if key not in self._workers:
            self._workers[key] = (spec, spec.build(WorkerContext()))  # keep spec alive: its id stays unique
        return self._workers[key][1]

    def map_chunks(self, spec: WorkerSpec, chunks: Sequence[Sequence[Any]]) -> Iterator[ChunkResult]:
        worker = self.worker(spec)
        for index, chunk in enumerate(chunks):
            yield ChunkResult(index, worker.process(list(chunk)), "local")

    def close(self) -> None:
        self._workers.clear()

"""Where work runs: in this process (``local``) or on Ray actors (``ray``), with atomic shards and a
manifest as the one truth (resume, no duplicates, no loss).

    store = run(items, WorkerSpec(make_worker, config), "out/", executor="ray", chunk_size=8)
    store.records(); store.to_dataset()

:class:`RayCandidatePool` puts RL rollouts' candidates on Ray actors (the trainer keeps the switcher).
"""

from switchrl.executors.base import (
    ChunkResult,
    Executor,
    ExecutorConfig,
    ExecutorError,
    Worker,
    WorkerContext,
    WorkerSpec,
)
from switchrl.executors.driver import make_executor, run
from switchrl.executors.local import LocalExecutor
from switchrl.executors.outdir import writable_dir
from switchrl.executors.remote_pool import RayCandidatePool
from switchrl.executors.shards import ShardInfo, ShardStore

__all__ = [
    "ChunkResult",
    "Executor",
    "ExecutorConfig",
    "ExecutorError",
    "LocalExecutor",
    "RayCandidatePool",
    "ShardInfo",
    "ShardStore",
    "Worker",
    "WorkerContext",
    "WorkerSpec",
    "make_executor",
    "run",
    "writable_dir",
]

"""Where work runs: in this process (``local``) or on Ray actors (``ray``), with atomic shards and a
manifest as the one truth (resume, no duplicates, no loss).

    store = run(items, WorkerSpec(make_worker, config), "out/", executor="ray", chunk_size=8)
    store.records(); store.to_dataset()
"""

from switchrl.executors.base import (
    RECORD_ID_KEY,
    ChunkResult,
    Executor,
    ExecutorConfig,
    ExecutorError,
    Worker,
    WorkerContext,
    WorkerSpec,
)
from switchrl.executors.driver import item_id, make_executor, run
from switchrl.executors.local import LocalExecutor
from switchrl.executors.shards import ShardInfo, ShardStore

__all__ = [
    "RECORD_ID_KEY",
    "ChunkResult",
    "Executor",
    "ExecutorConfig",
    "ExecutorError",
    "LocalExecutor",
    "ShardInfo",
    "ShardStore",
    "Worker",
    "WorkerContext",
    "WorkerSpec",
    "item_id",
    "make_executor",
    "run",
]

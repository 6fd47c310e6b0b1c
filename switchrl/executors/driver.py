"""``run``: split items into chunks, run them on an executor, commit each result as a shard."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from switchrl.config import parse
from switchrl.executors.base import Executor, ExecutorConfig, WorkerSpec, chunked
from switchrl.executors.shards import ShardStore


def item_id(item: Any) -> str:
    """The stable id of a work item (its ``id`` attribute, or ``item["id"]`` for a mapping)."""
    value = item.get("id") if isinstance(item, Mapping) else getattr(item, "id", None)
    if value is None or value == "":
        raise ValueError(f"work item {str(item)[:120]} has no 'id'")
    return str(value)


def make_executor(config: ExecutorConfig | Mapping | str) -> Executor:
    """An executor from a config, a config dict, or just ``"local"`` / ``"ray"``."""
    if isinstance(config, str):
        config = {"executor": config}
    if not isinstance(config, ExecutorConfig):
        config = parse(ExecutorConfig, dict(config), "executor")
    if config.executor == "local":
        from switchrl.executors.local import LocalExecutor

        return LocalExecutor()
    from switchrl.executors.ray_executor import RayExecutor

    return RayExecutor(config)


def run(
    items: Sequence[Any],
    worker_spec: WorkerSpec,
    out_dir: str | Path,
    executor: Executor | ExecutorConfig | Mapping | str = "local",
    chunk_size: int = 8,
    fingerprint: dict | None = None,
    progress: bool = True,
    desc: str = "work",
    rates: Mapping[str, Callable[[list[dict]], float]] | None = None,
    overwrite: bool = False,
    repair: bool = False,
) -> ShardStore:
    """Process every item not yet committed in ``out_dir``; return the store of all records.

    Items are processed in chunks of ``chunk_size`` on ``executor``; the driver commits each chunk's
    records as one atomic shard when it arrives, so every item is recorded exactly once, and a rerun
    after a crash resumes from the manifest. ``fingerprint`` (e.g. the run config) must match the
    one stored in ``out_dir``. ``rates`` adds per-second counters to the progress bar, e.g.
    ``{"finishes": lambda recs: sum(r["k"] for r in recs)}``. The returned store lists records in
    the order of ``items``. ``overwrite`` starts over in ``out_dir``; ``repair`` drops committed
    shards that fail their sha256 so that only their items are recomputed (see :class:`ShardStore`).
    """
    if not isinstance(worker_spec, WorkerSpec):
        raise TypeError(f"worker_spec must be a WorkerSpec, got {type(worker_spec).__name__}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    ids = [item_id(it) for it in items]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"work item ids must be unique; repeated: {dupes[:5]}")
    store = ShardStore(out_dir, fingerprint=fingerprint, order=ids, overwrite=overwrite, repair=repair)
    owned = not hasattr(executor, "map_chunks")
    runner: Executor = make_executor(executor) if owned else executor  # type: ignore[arg-type]
    try:
        done = store.completed_ids
        pending = [it for it, i in zip(items, ids) if i not in done]
        chunks = list(chunked(pending, chunk_size))
        bar = tqdm(
            total=len(ids), initial=len(ids) - len(pending), desc=desc, unit="item", disable=not progress
        )
        counts: Counter[str] = Counter()
        totals: Counter[str] = Counter()
        start = time.perf_counter()
        for result in runner.map_chunks(worker_spec, chunks):
            chunk_ids = [item_id(it) for it in chunks[result.index]]
            store.commit(chunk_ids, result.records, worker=result.worker)
            counts[result.worker] += len(chunk_ids)
            totals["records"] += len(result.records)
            for name, fn in (rates or {}).items():
                totals[name] += fn(result.records)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(
                {**{f"{k}/s": f"{v / elapsed:.2f}" for k, v in totals.items()}, **counts}, refresh=False
            )
            bar.update(len(chunk_ids))
        bar.close()
    finally:
        if owned:
            runner.close()
        store.close()
    return store

"""Atomic JSONL shards plus a manifest: the one truth of a resumable run.

Layout of ``out_dir``::

    manifest.json          {"version", "fingerprint", "shards": [{"name", "item_ids", "num_records",
                            "sha256", "worker"}]}
    shards/shard-000000.jsonl

A shard is written to a temporary file, fsynced and renamed into place; only then is it added to the
manifest, which is itself replaced atomically. A crash at any point leaves either a committed shard
(listed in the manifest) or an orphan file that is ignored and cleaned up on the next open, so an
item is never recorded twice and a committed record is never lost.

Opening a store for writing never deletes data it cannot account for: shard files with no manifest
stop the run (``overwrite=True`` starts over), and every committed shard's sha256 is verified before
any new work (``repair=True`` drops the shards that fail, so only their items are recomputed). A
manifest with no shards (a run that failed before committing a record) does not pin its fingerprint.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from switchrl.errors import CheckpointError, ConfigError
from switchrl.executors.base import RECORD_ID_KEY, ClosesOnExit
from switchrl.executors.outdir import unwritable

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
VERSION = 1
START_OVER = "rerun with --overwrite to start over, or use a new out_dir"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard: which items it covers, how many records, their content hash."""

    name: str
    item_ids: list[str]
    num_records: int
    sha256: str
    worker: str = ""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def encode_records(records: Iterable[dict]) -> bytes:
    """JSONL bytes of ``records`` (key order kept, non-ASCII kept)."""
    try:
        return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    except (TypeError, ValueError) as err:
        raise ValueError(f"records must be JSON-serialisable: {err}") from None


class ShardStore(ClosesOnExit):
    """The shards and manifest of one output directory.

    ``order`` (item ids) fixes the order in which :meth:`records` returns records; without it,
    records are sorted by item id. Within an item, records keep the order the worker gave them.
    A writable store takes an exclusive lock on the directory (one writer at a time) until
    :meth:`close`, verifies every committed shard's sha256 and removes orphan files of a crashed
    writer; ``readonly=True`` only reads. ``overwrite=True`` starts over (the previous manifest and
    shards are removed, under the lock); ``repair=True`` drops committed shards that are missing or
    fail their sha256, so that only their items are recomputed.
    """

    def __init__(
        self,
        out_dir: str | Path,
        fingerprint: dict | None = None,
        order: Sequence[str] | None = None,
        readonly: bool = False,
        overwrite: bool = False,
        repair: bool = False,
    ):
        self.out_dir = Path(out_dir)
        self.order = list(order) if order is not None else None
        self.readonly = readonly
        self.repaired: list[ShardInfo] = []
        self._lock = None
        if overwrite and repair:
            raise ConfigError("--overwrite and --repair exclude each other: choose one")
        if readonly:
            if overwrite or repair:
                raise ValueError("a read-only ShardStore cannot overwrite or repair")
            if not self.manifest_path.is_file():
                raise CheckpointError(f"{self.out_dir} has no {MANIFEST}; is it a switchrl output directory?")
            self.fingerprint, self.shards = self._read_manifest()
            if fingerprint is not None:
                self._check_fingerprint(fingerprint)
            self._done = {i for s in self.shards for i in s.item_ids}
            return
        self._open_writable()
        try:
            self._prepare(fingerprint, overwrite, repair)
        except BaseException:
            self.close()
            raise

    def _open_writable(self) -> None:
        try:
            if self.out_dir.exists() and not self.out_dir.is_dir():
                raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(self.out_dir))
            (self.out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            self._lock = open(self.out_dir / ".lock", "w")  # noqa: SIM115 (held until close)
        except OSError as err:
            raise unwritable(self.out_dir, err) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise CheckpointError(f"out_dir {self.out_dir} is in use by another run") from None

    def _prepare(self, fingerprint: dict | None, overwrite: bool, repair: bool) -> None:
        """Under the lock: start over, or refuse unaccounted data, verify hashes, repair; clean orphans."""
        try:
            if overwrite:
                # the empty manifest is the commit point: every previous shard becomes an orphan
                self.fingerprint, self.shards = None, []
                self._write_manifest([])
            elif not self.manifest_path.exists():
                self._refuse_shards_without_manifest()
            self.fingerprint, self.shards = self._read_manifest()
            if fingerprint is not None:
                self._check_fingerprint(fingerprint)
            self._verify(repair)
            self._done = {i for s in self.shards for i in s.item_ids}
            self._remove_orphans()
            if not self.manifest_path.exists() or (fingerprint is not None and not self.shards):
                self._write_manifest(self.shards)
        except OSError as err:
            raise unwritable(self.out_dir, err) from None

    def _refuse_shards_without_manifest(self) -> None:
        data = sorted(p.name for p in (self.out_dir / SHARD_DIR).iterdir() if not p.name.startswith("."))
        if data:
            raise CheckpointError(
                f"{self.out_dir} has {len(data)} shard file(s) in {SHARD_DIR}/ ({', '.join(data[:3])}"
                f"{', ...' if len(data) > 3 else ''}) but no {MANIFEST}, so which of them are complete and "
                "which configuration wrote them is unknown; nothing was deleted. Rerun with --overwrite "
                "to delete them and start over, or use a new out_dir"
            )

    def _verify(self, repair: bool) -> None:
        """Check every committed shard against its sha256 before any new work; drop the bad ones on repair."""
        bad: dict[str, str] = {}
        for shard in self.shards:
            try:
                data = self._path(shard).read_bytes()
            except FileNotFoundError:
                bad[shard.name] = "missing"
                continue
            if hashlib.sha256(data).hexdigest() != shard.sha256:
                bad[shard.name] = "does not match its sha256: edited, truncated or corrupted"
        if not bad:
            return
        listed = "; ".join(f"{self.out_dir / SHARD_DIR / name} ({why})" for name, why in bad.items())
        if not repair:
            raise CheckpointError(
                f"{len(bad)} of {len(self.shards)} committed shard(s) failed verification: {listed}; "
                "rerun with --repair to drop them and recompute their items only "
                "(or --overwrite to start over)"
            )
        self.repaired = [s for s in self.shards if s.name in bad]
        self.shards = [s for s in self.shards if s.name not in bad]
        self._write_manifest(self.shards)  # the commit point; the dropped files are orphans from here on
        logger.warning(
            "--repair: dropped %s; their %d item(s) will be recomputed",
            listed,
            sum(len(s.item_ids) for s in self.repaired),
        )

    # -- reading -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST

    def _read_manifest(self) -> tuple[dict | None, list[ShardInfo]]:
        if not self.manifest_path.exists():
            return None, []
        try:
            data = json.loads(self.manifest_path.read_text())
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            return data.get("fingerprint"), [ShardInfo(**s) for s in data["shards"]]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{self.manifest_path}: not a valid switchrl manifest: {err}; {START_OVER}"
            ) from None

    def _check_fingerprint(self, fingerprint: dict) -> None:
        fingerprint = json.loads(json.dumps(fingerprint))  # the form it has once stored
        if not self.shards:  # nothing committed yet (e.g. a start that failed): nothing to protect
            self.fingerprint = fingerprint
            return
        if self.fingerprint is None:
            raise CheckpointError(f"{self.manifest_path} has shards but no fingerprint; {START_OVER}")
        if fingerprint != self.fingerprint:
            keys = sorted(
                k
                for k in fingerprint.keys() | self.fingerprint.keys()
                if fingerprint.get(k) != self.fingerprint.get(k)
            )
            raise CheckpointError(
                f"{self.out_dir} was written with a different configuration "
                f"(differs in: {', '.join(keys)}); {START_OVER}"
            )

    def _remove_orphans(self) -> None:
        listed = {s.name for s in self.shards}
        for path in (self.out_dir / SHARD_DIR).iterdir():
            if path.name not in listed:
                path.unlink()

    @property
    def completed_ids(self) -> frozenset[str]:
        """Ids of the items whose records are committed."""
        return frozenset(self._done)

    @property
    def num_records(self) -> int:
        return sum(s.num_records for s in self.shards)

    def __len__(self) -> int:
        return self.num_records

    def files(self) -> dict[str, Path]:
        """Item id -> the shard file that holds its records (to name the file of a bad record)."""
        return {i: self._path(s) for s in self.shards for i in s.item_ids}

    def _path(self, shard: ShardInfo) -> Path:
        return self.out_dir / SHARD_DIR / shard.name

    def read_shard(self, shard: ShardInfo) -> list[dict]:
        """The records of one committed shard; raises :class:`CheckpointError` if it was altered."""
        path = self._path(shard)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(
                f"{path} is listed in the manifest but missing; rerun the command that wrote it with --repair"
            ) from None
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            raise CheckpointError(
                f"{path} does not match its sha256 in the manifest (edited or corrupted); rerun the command "
                "that wrote it with --repair to recompute its items"
            )
        return [json.loads(line) for line in data.splitlines()]

    def records(self) -> list[dict]:
        """Every committed record, in ``order`` of item ids (sorted ids without one), then worker order."""
        by_item: dict[str, list[dict]] = {}
        for shard in self.shards:
            for rec in self.read_shard(shard):
                by_item.setdefault(rec[RECORD_ID_KEY], []).append(rec)
        order = self.order if self.order is not None else sorted(self._done)
        rank = {item_id: i for i, item_id in enumerate(order)}
        items = sorted(by_item, key=lambda i: (rank.get(i, len(rank)), i))
        return [rec for item_id in items for rec in by_item[item_id]]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records())

    def to_dataset(self) -> Any:
        """The records as a ``datasets.Dataset`` (same order as :meth:`records`)."""
        from datasets import Dataset

        return Dataset.from_list(self.records())

    def export_jsonl(self, path: str | Path) -> Path:
        """Write all records, in order, to one JSONL file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, encode_records(self.records()))
        return path

    # -- writing -------------------------------------------------------------------------------
    def commit(self, item_ids: Sequence[str], records: Sequence[dict], worker: str = "") -> ShardInfo:
        """Commit the records of ``item_ids`` as one shard, atomically, then list it in the manifest.

        Raises ``ValueError`` if an item is already committed, or a record's ``"id"`` is not
        one of ``item_ids`` (nothing is written then).
        """
        if self._lock is None or self._lock.closed:
            raise CheckpointError(f"ShardStore({self.out_dir}) is read-only or closed; open a writable store")
        item_ids = [str(i) for i in item_ids]
        wanted = set(item_ids)
        if len(wanted) != len(item_ids):
            raise ValueError("item_ids of one shard must be unique")
        if again := wanted & self._done:
            raise ValueError(f"items already committed in {self.out_dir}: {sorted(again)[:5]}")
        for rec in records:
            if not isinstance(rec, dict) or rec.get(RECORD_ID_KEY) not in wanted:
                raise ValueError(
                    f"every record must be a dict whose {RECORD_ID_KEY!r} is one of the chunk's "
                    f"item ids; got {str(rec)[:200]}"
                )
        data = encode_records(records)
        index = max((int(s.name[6:12]) for s in self.shards), default=-1) + 1
        shard = ShardInfo(
            f"shard-{index:06d}.jsonl", item_ids, len(records), hashlib.sha256(data).hexdigest(), worker
        )
        try:
            atomic_write(self._path(shard), data)
            self._write_manifest([*self.shards, shard])
        except OSError as err:
            raise unwritable(self.out_dir, err) from None
        self.shards.append(shard)
        self._done |= wanted
        return shard

    def _write_manifest(self, shards: list[ShardInfo]) -> None:
        manifest = {
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "shards": [asdict(s) for s in shards],
        }
        atomic_write(self.manifest_path, json.dumps(manifest, indent=1).encode())

    def close(self) -> None:
        """Release the directory lock (records stay readable)."""
        if self._lock is not None and not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __repr__(self) -> str:
        return f"ShardStore({str(self.out_dir)!r}, shards={len(self.shards)}, records={self.num_records})"

"""File helpers for resume fingerprints: a file's content hash and a directory's cheap signature."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["dir_signature", "file_sha256"]


@functools.lru_cache(maxsize=256)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str | None:
    """sha256 of the file's bytes, cached per (path, mtime, size); ``None`` when it is not a file (the
    caller's loader reports that)."""
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    st = p.stat()
    return _sha256(str(p.resolve()), st.st_mtime_ns, st.st_size)


def dir_signature(path: str | Path) -> str | None:
    """A cheap content signature of a local directory (relative names, sizes and mtimes of its files):
    it changes when a checkpoint there is retrained or replaced. ``None`` when ``path`` is not a local
    directory (a hub id, a server)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file())
    text = "\n".join(f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

"""Content hashes of task files, for resume fingerprints: editing a reference must not let a resumed
run keep the records scored against the old one."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["file_sha256"]


@functools.lru_cache(maxsize=64)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str | None:
    """sha256 of the file's bytes (``None`` when it is not a file: its loader reports that)."""
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    st = p.stat()
    return _sha256(str(p.resolve()), st.st_mtime_ns, st.st_size)

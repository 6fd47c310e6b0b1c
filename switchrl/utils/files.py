"""File helpers for resume fingerprints."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["dir_signature"]


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

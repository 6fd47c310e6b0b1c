"""Output directories that cannot be written: one clear error naming the path, the problem and the fix."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from switchrl.errors import CheckpointError


def unwritable(path: str | Path, err: OSError, what: str = "out_dir") -> CheckpointError:
    """One clear error for an output directory that cannot be written: the path, the problem, the fix."""
    path = Path(path)
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if file is not None:
            return CheckpointError(
                f"{what} {path} cannot be a directory: {file} is a regular file; "
                f"choose a different {what}, not inside a file"
            )
    if err.errno == errno.EROFS:
        return CheckpointError(
            f"{what} {path} is on a read-only filesystem{where}; put {what} on a writable filesystem"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(
            f"{what} {path} is not writable (permission denied{where}); "
            f"choose a different {what} or fix its permissions"
        )
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(f"{what} {path}: no space left on its filesystem{where}; free space and rerun")
    return CheckpointError(f"{what} {path} cannot be written: {err.strerror or err}{where}")


def writable_dir(path: str | Path, what: str = "out_dir") -> Path:
    """Create ``path`` (and its parents) and check that files can be written there, before any work.

    Raises :class:`CheckpointError` naming ``what``, the path, the problem (a regular file in the way,
    a read-only filesystem, no permission) and the fix.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(path))
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".switchrl-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise unwritable(path, err, what) from None
    return path

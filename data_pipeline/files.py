"""File helpers shared by the whole project, torch-free (launch/preflight and data workers use them).

One atomic write (temporary file in the same directory, fsync, rename), one sha256, and the
one way a command makes its output directory (removed again when the command fails at its start).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, data: bytes | str) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part:
    a temporary name in the same directory, fsync, then rename over `path`. The file gets the
    mode a plain open() would give it (0o666 minus the umask; mkstemp alone would give 0o600)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def removed_on_failure(path, unless: tuple[str, ...] = (), owner: bool = True):
    """Create directory `path` (and missing parents) for a block. When the block raises before any
    of the names in `unless` exists in it, the directories this call created are removed again:
    a command that fails at its start leaves no empty (or log-only) directories behind. Only the
    `owner` (rank 0 of a multi-process run) removes."""
    path = Path(path)
    first_created = None
    for directory in (path, *path.parents):
        if directory.exists():
            break
        first_created = directory
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if owner and first_created is not None and not any((path / name).exists() for name in unless):
            shutil.rmtree(first_created, ignore_errors=True)
        raise

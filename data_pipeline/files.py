"""File helpers shared by the whole project, torch-free (launch/preflight and data workers use them).

One atomic write (temporary file in the same directory, fsync, rename), one staged directory
(written under a temporary name, renamed when complete), one sha256, `contained`, the one way to
follow a file name read from a file (docs/reliability.md, "Containment"), and the one way a
command makes its output directory (removed again when the command fails at its start).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .resources import disk_full, free_disk, human, require_disk


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
def contained(root, name, what: str) -> Path:
    """root / name for a file name read from a file (a manifest's shard or tokenizer path, an index's
    weight_map entry): refused with a UserError naming `what` when it is not a non-empty relative
    path that stays inside `root` (no absolute path, no '..', no symlink out of it). A file someone
    sent must not make a command read, hash or serve files outside the directory it came in."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{what}: expected a relative file name; got {name!r}")
    root = Path(root).resolve()
    path = root / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(root):
        raise UserError(f"{what} {name!r} leads outside {root}; it must be a relative path inside that directory")
    return path


def _holder_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_directory(out_dir, needed_bytes: int = 0, replace: bool = False):
    """Yield a fresh sibling directory to write into; on success it is renamed to `out_dir`, on any
    error (a kill leaves it to the next call, which removes it) it is removed, so nothing appears
    under `out_dir`'s name unless the whole write completed. Before anything is written the disk
    must have `needed_bytes` free; a disk that fills up meanwhile is one UserError saying so.
    An existing non-empty `out_dir` is refused, or with replace=True swapped out once the new
    one is complete (a run's own export/)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not replace)):
        raise UserError(f"{out_dir} already exists and is not empty: choose a new output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_dir.name}.partial-"
    for stale in out_dir.parent.glob(prefix + "*"):  # left by a killed writer
        pid = stale.name[len(prefix):]
        if not (pid.isdigit() and _holder_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    require_disk(out_dir.parent, needed_bytes, out_dir.name)
    staging = out_dir.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        try:
            yield staging
        except Exception as err:
            if not isinstance(err, UserError) and disk_full(err, staging):
                raise UserError(f"no space left on device while writing {out_dir} ({human(free_disk(staging))} "
                                "free); nothing was written under that name") from err
            raise
        if out_dir.exists() and replace:
            os.replace(out_dir, old)  # removed below, once the new one has its name
        elif out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_write's temporary names


def remove_temporary_files(directory) -> list[Path]:
    """Remove atomic_write's temporary files in `directory` (left by a writer killed between its
    write and its rename; never a final name). Call it only where no other writer can be at work
    (under the run lock). Returns what was removed."""
    removed = []
    for path in Path(directory).glob(".*.tmp"):
        if _TEMPORARY.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed

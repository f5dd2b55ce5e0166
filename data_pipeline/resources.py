"""Memory and disk: how much there is, and the one refusal when a job needs more.

Every command that sizes something from its input (a model config, a flag, a file) estimates
the bytes it will need and calls `require_memory` or `require_disk` BEFORE it allocates or
writes anything. The refusal is one UserError stating the estimate, what is available and
what set the size, so `biglearn ... vocab_size=1e9` stops in a line instead of swapping the
machine to death (docs/reliability.md, "Sizes").
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .errors import UserError

# Share of the available memory a job may plan to use: the estimate is a lower bound (it counts
# the big tensors, not the allocator's slack or the interpreter).
MEMORY_SHARE = 0.9
_CGROUP = Path("/sys/fs/cgroup")


def human(n_bytes: float) -> str:
    """1536 -> '1.5 KiB', in the largest binary unit that keeps the number >= 1."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n_bytes) < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit, None without a limit."""
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        used = int((_CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_memory() -> int:
    """Bytes a new allocation can take without swapping: the kernel's MemAvailable, or less under
    a cgroup memory limit (a container, a SLURM job)."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = _cgroup_room()
    return available if room is None else min(available, room)


def require_memory(needed: int, what: str, available: int | None = None, where: str = "memory") -> None:
    """UserError unless `needed` bytes fit in MEMORY_SHARE of `available` (default: this machine's
    available memory). `what` says what needs it and which keys or flags set its size."""
    available = available_memory() if available is None else available
    if needed > MEMORY_SHARE * available:
        raise UserError(f"{what} needs about {human(needed)} of {where}, but {human(available)} is available; "
                        "make it smaller")


def existing_parent(path) -> Path:
    """`path` or its nearest existing ancestor (where a file under `path` would be written)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_disk(path) -> int:
    """Free bytes on the filesystem that `path` (or its nearest existing ancestor) is on."""
    return shutil.disk_usage(existing_parent(path)).free


def require_disk(path, needed: int, what: str) -> None:
    """UserError unless the filesystem of `path` has `needed` bytes free, before anything is written."""
    free = free_disk(path)
    if needed > free:
        raise UserError(f"not enough free space for {what} in {path}: {human(free)} free, need about "
                        f"{human(needed)}; free some space or write elsewhere")


def disk_full(err: BaseException, path) -> bool:
    """Whether `err` (any writer's error: OSError, or the RuntimeError torch and safetensors raise)
    is a full disk where `path` is written."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or free_disk(path) < (1 << 20)

"""DeepSpeed's CPU communication extension (deepspeed_shm_comm) without a silent minute.

On a CPU run DeepSpeed's TorchBackend builds and loads this extension in every process
(deepspeed.comm.torch.build_shm_op): torch's cpp_extension compiles it (~1.5 min on 2 cores)
into TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions/<python>_cpu, a directory every
environment of the user shares, behind a `lock` file on which other processes wait forever,
printing nothing. So:

- One process: the extension carries shared-memory collectives between the ranks of a machine,
  and a single rank has none. The CPU accelerator is told it has no such op (`SingleProcessCPU`),
  which DeepSpeed already handles (it uses gloo, as on a platform where the op cannot be built):
  nothing is compiled, loaded or waited for.
- Several processes: the extension is built into this environment's own directory
  (`extensions_dir`: the virtualenv's, unless TORCH_EXTENSIONS_DIR says otherwise) before
  DeepSpeed asks for it. A build is announced when it starts and reports every 10 s; a `lock`
  held by a live process is waited on with a line every 10 s, up to a timeout that ends in one
  line naming the lock; a lock that no running process holds, or older than a build can take, is
  reported and removed.
"""
from __future__ import annotations

import _thread
import hashlib
import os
import sys
import threading
import time
from pathlib import Path

from data_pipeline.errors import UserError

SHM_COMM = "deepspeed_shm_comm"
LOCK = "lock"  # torch.utils.file_baton.FileBaton's file in the extension's build directory
# A lock older than this is left over: the build takes ~1.5 min on 2 idle cores, 10x for a loaded machine.
STALE_LOCK_S = 900.0
REPORT_EVERY_S = 10.0


def extensions_dir(environ=os.environ) -> Path:
    """Where torch extensions of this environment are built: TORCH_EXTENSIONS_DIR when set, else
    <sys.prefix>/torch_extensions (inside the virtualenv) when writable, else a directory of
    ~/.cache/torch_extensions named after the environment, so two environments never share one."""
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(environ["TORCH_EXTENSIONS_DIR"])
    prefix = Path(sys.prefix)
    if os.access(prefix, os.W_OK):
        return prefix / "torch_extensions"
    tag = hashlib.sha256(str(prefix.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "torch_extensions" / f"env-{tag}"


def lock_holders(path: Path) -> list[int] | None:
    """Ids of the processes that have `path` open (torch keeps its lock file open while it
    builds), read from /proc; None where there is no /proc. Processes whose open files cannot
    be read (another user's, or ones the kernel hides, like a container's init) are not counted:
    a build is a Python process of the user who started the run."""
    if not Path("/proc/self/fd").is_dir():
        return None
    target, holders = os.path.realpath(path), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) == target:
                    holders.append(int(entry.name))
                    break
        except OSError:  # not ours to read, or the process ended while we looked
            continue
    return holders


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def clear_stale_lock(lock: Path, stale_after_s: float = STALE_LOCK_S) -> list[int] | None:
    """Remove `lock` (with a line saying why) when no running process holds it or it is older
    than a build can take. Returns the holders of a lock left in place ([] when there is none)."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return []
    holders = lock_holders(lock)
    if holders == [] or age > stale_after_s:
        why = "no running process holds it" if holders == [] else f"it is {age / 60:.0f} min old"
        _say(f"removing the stale DeepSpeed build lock {lock} ({why})")
        lock.unlink(missing_ok=True)
        return []
    return holders


def wait_for_lock(lock: Path, timeout_s: float, announce: bool = True, stale_after_s: float = STALE_LOCK_S) -> None:
    """Return once `lock` is gone (a stale one is removed); a line every 10 s while a live
    process holds it, and after timeout_s a one-line UserError naming it."""
    start, last_said = time.monotonic(), None
    while True:
        holders = clear_stale_lock(lock, stale_after_s)
        if not lock.exists():
            return
        waited = time.monotonic() - start
        who = f"process {', '.join(map(str, holders))}" if holders else "another process"
        if waited >= timeout_s:
            raise UserError(f"DeepSpeed build lock {lock} still held by {who} after {waited:.0f} s "
                            f"(deepspeed.extension_wait_s={timeout_s:g}); wait for that build to finish, or remove the "
                            f"file if no build is running")
        if announce and (last_said is None or time.monotonic() - last_said >= REPORT_EVERY_S):
            _say(f"waiting for {lock}: {who} is building DeepSpeed's CPU extension ({waited:.0f} s, "
                 f"up to {timeout_s:g} s)")
            last_said = time.monotonic()
        time.sleep(min(1.0, max(0.05, timeout_s / 20)))


class _BuildReporter(threading.Thread):
    """While the build runs: a line every 10 s (announce=True), and after timeout_s of waiting on
    another process's lock (torch waits on it without a word), an interrupt of the main thread."""

    def __init__(self, lock: Path, timeout_s: float, announce: bool):
        super().__init__(daemon=True)
        self.lock, self.timeout_s, self.announce = lock, timeout_s, announce
        self.done, self.expired = threading.Event(), False
        self.start_time = time.monotonic()

    def run(self) -> None:
        waiting_since = None
        while not self.done.wait(REPORT_EVERY_S if self.announce else 1.0):
            elapsed = time.monotonic() - self.start_time
            holders = lock_holders(self.lock) if self.lock.exists() else []
            theirs = bool(holders) and os.getpid() not in holders
            waiting_since = (waiting_since or time.monotonic()) if theirs else None
            if waiting_since is not None and time.monotonic() - waiting_since >= self.timeout_s:
                self.expired = True
                _thread.interrupt_main()
                return
            if self.announce:
                what = f"waiting for {self.lock} (process {', '.join(map(str, holders))})" if theirs else "compiling"
                _say(f"DeepSpeed CPU extension: {what}, {elapsed:.0f} s")


def build_shm_extension(timeout_s: float, announce: bool) -> None:
    """Build (once per environment) and load DeepSpeed's shm_comm extension before DeepSpeed asks
    for it (its op loader then returns the loaded module). TORCH_EXTENSIONS_DIR is set to
    `extensions_dir()` for this process and its children. Needs DS_ACCELERATOR=cpu."""
    root = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    build_dir = root / SHM_COMM
    wait_for_lock(build_dir / LOCK, timeout_s, announce)
    built = any(build_dir.glob("*.so"))
    if announce and not built:
        _say(f"compiling DeepSpeed's CPU extension ({SHM_COMM}) into {root}, once per environment, ~1-2 min")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible(False):  # DeepSpeed then uses gloo alone, as here
        return
    reporter = _BuildReporter(build_dir / LOCK, timeout_s, announce and not built)
    reporter.start()
    try:
        builder.load(verbose=False)
    except KeyboardInterrupt:
        if reporter.expired:
            raise UserError(f"DeepSpeed build lock {build_dir / LOCK} still held by another process after "
                            f"{timeout_s:g} s (deepspeed.extension_wait_s); wait for that build to finish, or remove "
                            "the file if no build is running") from None
        raise
    finally:
        reporter.done.set()
    if announce and not built:
        _say(f"DeepSpeed CPU extension built in {time.monotonic() - reporter.start_time:.0f} s ({build_dir})")


def single_process_accelerator() -> None:
    """Tell DeepSpeed's CPU accelerator that it has no shared-memory communication op, for a
    process group of one (module docstring). Call after DS_ACCELERATOR=cpu is set."""
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class SingleProcessCPU(CPU_Accelerator):
        def create_op_builder(self, op_name):
            return None if op_name == "ShareMemCommBuilder" else super().create_op_builder(op_name)

    if type(get_accelerator()) is CPU_Accelerator:
        set_accelerator(SingleProcessCPU())

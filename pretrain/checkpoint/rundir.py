"""The files of a run directory that more than one layer reads (docs/training.md, outputs).

    LOCK              the process training in it: host, pid, since when (see below)
    metrics.jsonl     train and eval records, one JSON object per line (the trainer writes it;
                      plots, exports and resume checks read it)
    checkpoints/      DeepSpeed tags (pretrain.checkpoint.sharded)
    export/           the fp32 export of the last checkpoint (pretrain.checkpoint.export)
    model/            the same in a fine-tuning run (pretrain.finetune), with its label layout

One writer per run directory: two runs resuming the same checkpoints would rotate each other's
files away and write the same steps twice into metrics.jsonl. `take_lock` creates LOCK
atomically (a complete file hard-linked into place, which fails if one exists). A lock whose
holder is dead (same host: its pid is gone or belongs to another process; another host: not
refreshed for `stale_after_s`, the holder touches it at every log step and save) is taken over
with a note; a live holder is a UserError naming it. Readers (export, inference) only name the
holder when what they read changes under them.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

from data_pipeline.errors import UserError

METRICS = "metrics.jsonl"
EXPORT = "export"
FINETUNED = "model"
LOCK = "LOCK"
_HELD: set[Path] = set()  # lock files this process holds (refresh_lock touches them)


def read_metrics(run_dir) -> list[dict]:
    """Every record of run_dir/metrics.jsonl ([] when there is none)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_eval(run_dir, step: int) -> dict | None:
    """The validation matrix the run logged at `step`, if any."""
    try:
        records = read_metrics(run_dir)
    except (OSError, TypeError, ValueError):
        return None
    found = [r["tasks"] for r in records if r.get("kind") == "eval" and r.get("step") == step]
    return found[-1] if found else None


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): a pid reused
    by another process has another start time."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def lock_holder(run_dir) -> dict | None:
    """What run_dir/LOCK says of its holder ({"host", "pid", "since", ...}), None without one;
    an unreadable lock reads as {} (a holder nobody can name)."""
    return _read_lock(Path(run_dir) / LOCK)


def describe(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('since', '?')})"


def holder_alive(holder: dict, path: Path, stale_after_s: float) -> bool:
    """Same host: its pid runs and started when the lock says. Another host (no way to ask): the
    lock was refreshed within stale_after_s."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        ticks = _start_ticks(holder["pid"])
        return ticks is not None and holder.get("start_ticks") in (None, ticks)
    try:
        return time.time() - path.stat().st_mtime < stale_after_s
    except OSError:
        return False


def take_lock(run_dir, stale_after_s: float = 3600.0) -> dict | None:
    """Make this process the run directory's one writer (run_dir/LOCK). Returns the dead holder
    whose lock it took over (for a note), else None; a UserError naming the holder when a live
    process holds it."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
          "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    mine = run_dir / f".{LOCK}.{os.getpid()}.tmp"
    mine.write_text(json.dumps(me))
    replaced = None
    try:
        for _ in range(5):
            try:
                os.link(mine, path)  # atomic: fails when a lock exists
                _HELD.add(path)
                return replaced
            except FileExistsError:
                pass
            holder = lock_holder(run_dir)
            if holder is None:  # released meanwhile
                continue
            if holder and holder_alive(holder, path, stale_after_s):
                raise UserError(f"{run_dir} is in use: {describe(holder)} is training in it ({path}); wait for it to "
                                f"end or use another run_dir (if that process is gone, remove {path})")
            # Dead: move its lock aside, then make sure it was that one (not a lock taken over meanwhile).
            aside = run_dir / f".{LOCK}.stale-{os.getpid()}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            if _read_lock(aside) != holder:
                try:
                    os.link(aside, path)  # someone else's fresh lock: put it back
                except FileExistsError:
                    pass
            else:
                replaced = holder
            aside.unlink(missing_ok=True)
        raise UserError(f"{run_dir}: could not take {path}: other processes keep taking it")
    finally:
        mine.unlink(missing_ok=True)


def refresh_lock(run_dir) -> None:
    """Touch this process's lock (a holder on another host is judged alive by it)."""
    path = Path(run_dir) / LOCK
    if path in _HELD:
        try:
            os.utime(path)
        except OSError:
            pass


def release_lock(run_dir) -> None:
    """Remove run_dir/LOCK if this process holds it."""
    path = Path(run_dir) / LOCK
    if path in _HELD:
        _HELD.discard(path)
        holder = lock_holder(run_dir)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            path.unlink(missing_ok=True)

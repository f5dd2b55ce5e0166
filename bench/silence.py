"""How long a command stays silent: run it on a pseudo-terminal (as a person would see it: line
buffering, progress bars), timestamp every line of its output (a progress bar's redraw counts as
a line), and print the longest gaps, when training's progress bar first moved (the first
training step), whether anything was compiled, and the machine's load.

    python bench/silence.py -- make demo
    python bench/silence.py --log runs/silence.log -- python -m pretrain.experiments.demo

The goal (issue 30, docs/benchmarks.md "No silent minute"): no gap over 10 s from start to end,
and a second `make demo` at its first training step within 20 s of launch.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

# tqdm's training bar ("train:  12%|###   | 61/500 ..."): the count after the bar.
TRAIN_BAR = re.compile(r"train:\s*\d+%\|[^|]*\|\s*(\d+)/")
COMPILE = re.compile(r"compiling DeepSpeed|Building extension module|ninja: ", re.IGNORECASE)


def run(command: list[str], log_path: str | None) -> dict:
    """Run `command` on a pty, echo its output, and return the timings (seconds from launch)."""
    master, slave = pty.openpty()
    # A terminal's size (a fresh pty has 0 columns, and progress bars then draw nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    load_start = os.getloadavg()
    start = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    lines: list[tuple[float, str]] = []
    events: list[float] = []  # when anything visible was written
    pending, pending_since = b"", 0.0  # a line still arriving counts from its first byte (a bar's
    # redraw is "\rtext" and ends only when the next one starts)
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the pty closes (EIO) when the command and its children are done
            break
        if not chunk:
            break
        now = time.monotonic() - start
        if chunk.strip():
            events.append(now)
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        if not pending.strip():
            pending_since = now
        pending += chunk
        *complete, rest = re.split(rb"[\r\n]", pending)
        for part in complete:
            if part.strip():
                lines.append((pending_since, part.decode(errors="replace")))
            pending_since = now
        pending = rest
    returncode = process.wait()
    end = time.monotonic() - start
    if pending.strip():
        lines.append((pending_since, pending.decode(errors="replace")))
    os.close(master)
    if log_path:
        with open(log_path, "w") as log:
            log.writelines(f"{t:8.2f}  {text}\n" for t, text in lines)

    first_step, first_count = None, None
    for t, text in lines:
        match = TRAIN_BAR.search(text)
        if match:
            count = int(match.group(1))
            first_count = count if first_count is None else first_count
            if count > first_count:
                first_step = t
                break
    times = [0.0] + events + [end]
    gaps = sorted(((b - a, a) for a, b in zip(times, times[1:])), reverse=True)[:3]

    def line_at(t: float) -> str:
        before = [text for started, text in lines if started <= t]
        return before[-1] if before else "(launch)"

    return {"returncode": returncode, "seconds": end, "lines": len(lines), "first_step": first_step,
            "compiled": any(COMPILE.search(text) for _, text in lines), "load": (load_start, os.getloadavg()),
            "gaps": [(gap, at, line_at(at)) for gap, at in gaps]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", help="write every line with its time since launch to this file")
    parser.add_argument("command", nargs="+", help="the command (after --)")
    args = parser.parse_args(argv)
    result = run(args.command, args.log)
    first = f"{result['first_step']:.1f} s" if result["first_step"] is not None else "never"
    (a1, a5, a15), (b1, b5, b15) = result["load"]
    print("\n| command | exit | wall | output lines | first training step | compiled | longest silence | load (1/5/15 min) at start -> end |")
    print("|---|---|---|---|---|---|---|---|")
    gap, at, after = result["gaps"][0]
    print(f"| `{' '.join(args.command)}` | {result['returncode']} | {result['seconds']:.1f} s | {result['lines']} | {first} | "
          f"{'yes' if result['compiled'] else 'no'} | {gap:.1f} s (from {at:.1f} s) | "
          f"{a1:.2f} {a5:.2f} {a15:.2f} -> {b1:.2f} {b5:.2f} {b15:.2f} |")
    print("\nlongest gaps:")
    for gap, at, after in result["gaps"]:
        print(f"  {gap:6.1f} s from {at:7.1f} s, after: {after.strip()[:110]}")
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())

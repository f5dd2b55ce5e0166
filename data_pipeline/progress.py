"""A line every few seconds while a step that reports nothing runs (no silent stretch over 10 s).

    with heartbeat("sentencepiece training"):
        ...   # prints "sentencepiece training: 5 s", "...: 10 s", ... on stderr until the block ends

Used where a library call works for long without a word: sentencepiece's trainer (it releases
the GIL while it works), and the first DeepSpeed engine of a process (its imports alone take
5-10 s, and much longer with a cold disk cache).
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time

EVERY_S = 5.0  # a line at least every 10 s, whatever follows the last one


@contextlib.contextmanager
def heartbeat(message: str, enabled: bool = True, every_s: float | None = None):
    """Print `message: N s` on stderr every `every_s` (default EVERY_S) seconds while the block runs."""
    if not enabled:
        yield
        return
    done, start, interval = threading.Event(), time.monotonic(), every_s or EVERY_S

    def beat():
        while not done.wait(interval):
            print(f"{message}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()

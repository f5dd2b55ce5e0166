"""Console output of a run: log records that never land on a progress bar's line, and the
third-party messages that tell a user nothing, filtered once, where they are emitted.

The filters name each message exactly (warning category + text), so anything else those
libraries say still reaches the user."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

# torch 2.13 deprecates the collective DeepSpeed's ZeRO optimiser calls; nothing a user can change.
_WARNING_NOISE = ((FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),)


def quiet_third_party() -> None:
    """Install the filters above (an identical warnings filter replaces itself: calling this
    again adds nothing). DeepSpeed's "get learning rate from scheduler before it has started"
    is gone at its source: the engine steps our schedule (engine.WarmupCosine), not DeepSpeed's."""
    for category, message in _WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def console_around_bar():
    """A context in which log records to the console (the root logger's and DeepSpeed's own
    handler) are written through tqdm, above the bar instead of onto its line."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm([logging.root, logging.getLogger("DeepSpeed")])


@contextlib.contextmanager
def run_logging(run_dir: Path, rank: int):
    """Root logging for one run: stderr (and train.log on rank 0), put back as it was at exit so
    that a later run or the caller's own logging (a notebook, pytest) finds no closed streams."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    formatter = logging.Formatter(f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
    root.handlers = handlers
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_third_party()
    try:
        yield
    finally:
        for handler in handlers:
            handler.close()
        root.handlers, root.level = saved_handlers, saved_level

"""Console output of a run: log records that never land on a progress bar's line, and the
third-party messages that tell a user nothing, filtered once, where they are emitted.

The filters name each message exactly (warning category + text), so anything else those
libraries say still reaches the user."""
from __future__ import annotations

import contextlib
import logging
import warnings

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
def no_stdout():
    """Swallow what a library prints (DeepSpeed's zero_to_fp32 prints a dozen progress lines
    per consolidation and has no switch for them)."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield

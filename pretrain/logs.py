"""Console output of a run: log records that never land on a progress bar's line, and the
third-party messages that tell a user nothing, filtered once, where they are emitted.

The filters name each message exactly (logger + text, or warning category + text), so anything
else those libraries say still reaches the user."""
from __future__ import annotations

import contextlib
import logging
import warnings

# DeepSpeed's engine reads its own schedule's learning rate while it builds the engine, before
# step 0, and the schedule warns about being asked; the run's learning rate is logged from step 1.
_DEEPSPEED_NOISE = ("Attempting to get learning rate from scheduler before it has started",)
# torch 2.13 deprecates the collective DeepSpeed's ZeRO optimiser calls; nothing a user can change.
_WARNING_NOISE = ((FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),)


class _DropMessages(logging.Filter):
    def __init__(self, messages: tuple[str, ...]):
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.messages)


def quiet_third_party() -> None:
    """Install the filters above; calling it again adds nothing (an identical warnings filter
    replaces itself, the logging filter is added once)."""
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessages) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropMessages(_DEEPSPEED_NOISE))
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

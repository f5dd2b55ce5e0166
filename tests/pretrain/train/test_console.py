"""What a run prints: a progress bar whose horizon is the real end (steps or time budget),
log records above the bar instead of on its line, uninformative third-party messages dropped
(and only those), the first-run DeepSpeed extension build detected."""
import io
import logging
import sys
import warnings

import numpy as np

from pretrain.train.console import console_around_bar, quiet_third_party
from pretrain.train.trainer import step_horizon


def test_horizon_is_the_step_the_budget_or_max_steps_ends_at():
    rng = np.random.default_rng()
    for _ in range(200):
        max_steps = int(rng.integers(1, 5000))
        step = int(rng.integers(1, max_steps + 1))
        seconds_per_step = float(rng.uniform(0.01, 3.0))
        minutes = float(rng.uniform(0.1, 30.0))
        # the first step (not timed) was slow; the timed steps ran at seconds_per_step
        first_s, timed = float(rng.uniform(0, 20)), int(rng.integers(0, step))
        elapsed = first_s + (step - 1) * seconds_per_step
        # count the steps one by one until the budget runs out (brute force)
        expected, clock = step, elapsed
        while timed and expected < max_steps and clock + seconds_per_step <= 60 * minutes + 1e-9:
            expected, clock = expected + 1, clock + seconds_per_step
        if not timed:
            expected = max_steps  # nothing measured yet
        got = step_horizon(max_steps, minutes, step, elapsed, timed, timed * seconds_per_step)
        assert abs(got - expected) <= 1, (got, expected)
        assert step_horizon(max_steps, 0.0, step, elapsed, timed, timed * seconds_per_step) == max_steps
    assert step_horizon(100, 1.0, 70, 90.0, 10, 10.0) == 70  # over budget already: ends now


def test_log_records_go_above_the_bar_not_onto_its_line(monkeypatch):
    from tqdm import tqdm

    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    handler = logging.StreamHandler(sys.stderr)  # a console handler, as the run's logging setup makes
    logging.root.addHandler(handler)
    try:
        bar = tqdm(total=10, desc="train", file=sys.stderr, mininterval=0)
        with console_around_bar():
            bar.update(3)
            logging.getLogger("pretrain.test").warning("a log record")
            bar.update(3)
        bar.close()
    finally:
        logging.root.removeHandler(handler)
    text = captured.getvalue()
    assert "a log record" in text
    for line in text.replace("\r", "\n").split("\n"):
        if "a log record" in line:
            assert line.strip() == "a log record", repr(line)


def test_only_the_named_third_party_warnings_are_dropped():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        quiet_third_party()  # a second call adds nothing
        filters = list(warnings.filters)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("another FutureWarning", FutureWarning)
    assert [str(w.message) for w in caught] == ["another FutureWarning"]
    assert sum("all_gather_into_tensor" in str(f[1].pattern if f[1] else "") for f in filters) == 1


def test_deepspeed_steps_our_schedule_so_its_lr_warning_never_fires():
    """The DeepSpeed warning "get learning rate from scheduler before it has started" came from
    its WarmupCosineLR, which the engine no longer uses (the DeepSpeed config has no scheduler)."""
    from pretrain.train.config import load_config
    from pretrain.train.engine import deepspeed_config

    config = load_config(["experiment=demo"])
    assert "scheduler" not in deepspeed_config(config.deepspeed, config.trainer, config.data.batch_size, world_size=1,
                                               on_cpu=True)


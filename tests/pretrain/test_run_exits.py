"""A training run always exits: at its normal end, on SIGTERM or SIGUSR1 (sent to the whole
process group, as a scheduler's pre-emption does) and at trainer.max_minutes, with 0, 1 and 2
data workers: it saves a checkpoint, exits 0 within 30 s, and leaves no worker behind."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_data")


def _descendants(pid):
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("stop", ["end", "SIGTERM", "SIGUSR1", "max_minutes"])
def test_training_run_exits_and_leaves_no_worker(tmp_path, demo_dir, workers, stop):
    run_dir = tmp_path / "run"
    steps = {"end": "trainer.max_steps=12"}.get(stop, "trainer.max_steps=100000")
    extra = ["trainer.max_minutes=0.5"] if stop == "max_minutes" else []
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", "experiment=smoke", f"data.num_workers={workers}",
                             f"data.demo_dir={demo_dir}", f"run_dir={run_dir}", "resume=never", "trainer.progress=false",
                             "eval.plot=false", "trainer.export_at_end=false", steps, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    children, metrics = set(), run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:  # until training has logged a step
        children |= _descendants(proc.pid)
        if metrics.is_file() and metrics.read_text().strip() and (workers == 0 or len(children) >= workers):
            break
        time.sleep(0.2)
    if stop.startswith("SIG"):
        os.killpg(proc.pid, getattr(signal, stop))
    out, err = proc.communicate(timeout=30 if stop.startswith("SIG") else 600)
    assert proc.returncode == 0, err[-3000:]
    assert list((run_dir / "checkpoints").glob("step_*")), "no checkpoint saved"
    if workers:
        assert len(children) >= workers  # the data workers were seen ...
    time.sleep(1)
    assert [pid for pid in children if _alive(pid)] == []  # ... and none outlived the run

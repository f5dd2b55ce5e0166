"""A training run always exits: at its normal end, on SIGTERM or SIGUSR1 (sent to the whole
process group, as a scheduler's pre-emption does) and at trainer.max_minutes, with 0, 1 and 2
data workers: it saves a checkpoint, exits 0 within 30 s, and leaves no worker behind; when the
training process itself is SIGKILLed its workers notice and exit. The same at the level of one
BatchStream, in seconds, runs in the default suite (tests/pretrain/test_data.py)."""
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


def _start_run(tmp_path, demo_dir, workers, *overrides):
    """Start a smoke training run; return it, its run directory and its descendants once it has
    logged a step (and its data workers have started)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", "experiment=smoke", f"data.num_workers={workers}",
                             f"data.demo_dir={demo_dir}", f"run_dir={run_dir}", "resume=never", "trainer.progress=false",
                             "eval.plot=false", "trainer.export_at_end=false", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    children, metrics = set(), run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:  # until training has logged a step
        children |= _descendants(proc.pid)
        if metrics.is_file() and metrics.read_text().strip() and (workers == 0 or len(children) >= workers):
            break
        time.sleep(0.2)
    return proc, run_dir, children


def _wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [pid for pid in pids if _alive(pid)]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("stop", ["end", "SIGTERM", "SIGUSR1", "max_minutes"])
def test_training_run_exits_and_leaves_no_worker(tmp_path, demo_dir, workers, stop):
    steps = {"end": "trainer.max_steps=12"}.get(stop, "trainer.max_steps=100000")
    extra = ["trainer.max_minutes=0.5"] if stop == "max_minutes" else []
    proc, run_dir, children = _start_run(tmp_path, demo_dir, workers, steps, *extra)
    if stop.startswith("SIG"):
        os.killpg(proc.pid, getattr(signal, stop))
    out, err = proc.communicate(timeout=30 if stop.startswith("SIG") else 600)
    assert proc.returncode == 0, err[-3000:]
    assert list((run_dir / "checkpoints").glob("step_*")), "no checkpoint saved"
    if workers:
        assert len(children) >= workers  # the data workers were seen ...
    assert _wait_gone(children, 1) == []  # ... and none outlived the run


@pytest.mark.slow
def test_workers_exit_when_the_training_process_is_killed(tmp_path, demo_dir):
    proc, _, children = _start_run(tmp_path, demo_dir, 2, "trainer.max_steps=100000")
    assert proc.poll() is None and len(children) >= 2
    proc.kill()  # the training process only, as the OOM killer does: no handler, no clean-up
    left = _wait_gone(children, 30)
    for pid in left:  # a failure leaves nothing behind either
        os.kill(pid, signal.SIGKILL)
    assert left == []  # the kernel kills the workers with their parent (PR_SET_PDEATHSIG)
    proc.communicate(timeout=30)  # the workers held its pipes open

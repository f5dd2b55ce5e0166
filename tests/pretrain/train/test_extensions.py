"""DeepSpeed's CPU extension (pretrain/train/extensions.py): a single-process CPU run never
builds, loads or waits for it; a held build lock is reported and ends in one line within its
timeout; a lock no process holds, or one older than a build takes, is removed with a line."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.errors import UserError
from pretrain.train.extensions import (LOCK, SHM_COMM, build_shm_extension, clear_stale_lock, extensions_dir,
                                       lock_holders, wait_for_lock)

REPO = Path(__file__).resolve().parents[3]
linux_only = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lock holders are read from /proc")


def hold_open(path: Path) -> subprocess.Popen:
    """A process that creates `path` as torch's FileBaton does (O_CREAT | O_EXCL) and keeps it open."""
    code = ("import os, sys, time\nfd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)\nprint('held', flush=True)\n"
            "time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.fixture
def held_lock(tmp_path):
    lock = tmp_path / "ext" / SHM_COMM / LOCK
    lock.parent.mkdir(parents=True)
    process = hold_open(lock)
    yield lock, process
    process.kill()
    process.wait()


def test_extensions_dir_is_the_environments_own():
    assert extensions_dir({"TORCH_EXTENSIONS_DIR": "/x/y"}) == Path("/x/y")
    chosen = extensions_dir({})
    if os.access(sys.prefix, os.W_OK):
        assert chosen == Path(sys.prefix) / "torch_extensions"
    else:
        assert chosen.parent == Path.home() / ".cache" / "torch_extensions" and chosen.name.startswith("env-")


@linux_only
def test_lock_holders_are_the_processes_that_have_the_file_open(held_lock, tmp_path):
    lock, process = held_lock
    assert lock_holders(lock) == [process.pid]
    other = tmp_path / "other"
    other.write_text("")
    assert lock_holders(other) == []


@linux_only
def test_a_held_lock_ends_in_one_line_naming_it_within_the_timeout(held_lock, monkeypatch, capsys):
    lock, process = held_lock
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(lock.parent.parent))
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        build_shm_extension(timeout_s=2.0, announce=True)
    waited = time.monotonic() - start
    assert 2.0 <= waited < 5.0
    message = str(caught.value)
    assert "\n" not in message and str(lock) in message and str(process.pid) in message
    said = capsys.readouterr().err
    assert f"waiting for {lock}: process {process.pid}" in said
    assert lock.exists()  # a live build's lock is never taken away


@linux_only
def test_a_lock_no_process_holds_is_reported_and_removed(tmp_path, capsys):
    lock = tmp_path / LOCK
    lock.write_text("")  # its builder was killed: the file stayed, nobody has it open
    start = time.monotonic()
    wait_for_lock(lock, timeout_s=30.0)
    assert time.monotonic() - start < 2.0 and not lock.exists()
    assert f"removing the stale DeepSpeed build lock {lock} (no running process holds it)" in capsys.readouterr().err


def test_a_lock_older_than_a_build_takes_is_removed_even_if_held(held_lock, capsys):
    lock, _ = held_lock
    two_hours_ago = time.time() - 7200
    os.utime(lock, (two_hours_ago, two_hours_ago))
    assert clear_stale_lock(lock) == [] and not lock.exists()
    assert "it is 120 min old" in capsys.readouterr().err


def test_a_single_process_cpu_run_never_touches_the_extensions_directory(tmp_path, manifest):
    """With a lock left in the extensions directory, DeepSpeed's own loader would wait on it
    forever; a single-process run must neither wait, nor build, nor write there."""
    extensions = tmp_path / "ext"
    (extensions / SHM_COMM).mkdir(parents=True)
    (extensions / SHM_COMM / LOCK).write_text("")
    before = sorted(p.name for p in extensions.rglob("*"))
    command = [sys.executable, "-m", "pretrain.train", "deepspeed=cpu", "model.d_model=32", "model.n_layers=2",
               "model.n_heads=2", "data.batch_size=4", "trainer.progress=false", "trainer.loggers=[jsonl]",
               "trainer.max_steps=2", "eval.batches=1", "eval.plot=false", "trainer.export_at_end=false",
               "trainer.eval_every=0", "data.kind=manifest", f"data.manifest={manifest}", f"run_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in extensions.rglob("*")) == before
    assert "shm_comm" not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.dist
def test_two_cpu_processes_build_the_extension_once_per_environment_and_say_so(tmp_path, manifest):
    """The first 2-rank run compiles into TORCH_EXTENSIONS_DIR with a line at the start and one
    every 10 s; the second compiles nothing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    outputs = []
    for attempt in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(29500 + os.getpid() % 1000 + attempt), "-m", "pretrain.train", "deepspeed=cpu",
                   "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.batch_size=4",
                   "trainer.progress=false", "trainer.loggers=[jsonl]", "trainer.max_steps=1", "eval.batches=1",
                   "eval.plot=false", "trainer.export_at_end=false", "data.kind=manifest", f"data.manifest={manifest}",
                   f"run_dir={tmp_path / f'run{attempt}'}"]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stderr)
    # Rank 0 says it: "compiling ..." when it takes the build lock, "waiting for <lock>: process N is
    # building ..." when rank 1 took it first (a race the ranks run before they can talk).
    assert "compiling DeepSpeed's CPU extension" in outputs[0] or "is building DeepSpeed's CPU extension" in outputs[0]
    assert any((tmp_path / "ext" / SHM_COMM).glob("*.so"))
    assert "compiling" not in outputs[1]

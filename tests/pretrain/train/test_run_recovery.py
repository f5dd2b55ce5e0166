"""A run directory in a bad state, resumed by real training processes (docs/reliability.md): a
damaged newest checkpoint is named in one line and the run resumes from the newest intact one;
a dead holder's lock is taken over with a note, a temporary file a killed save left is removed,
changed optimiser and schedule keys are applied and logged, and a dataset without a validation
split trains with a one-line note. Slow ones: two writers at once, the shards deleted under a
running run, a disk with room for the checkpoint but not the export, the divergence guard's
advice followed as printed."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.train.engine import WarmupCosine

REPO = Path(__file__).resolve().parents[3]


def records(run: Path, kind: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == kind]


def without_validation(manifest: Path, directory: Path) -> Path:
    """A copy of the dataset whose manifest lists no validation shard (the training split unchanged)."""
    shutil.copytree(manifest.parent, directory)
    meta = json.loads((directory / "manifest.json").read_text())
    meta["shards"] = [s for s in meta["shards"] if s["split"] != "val"]
    meta["splits"]["val"] = {"shards": 0, "samples": 0, "tokens": 0}
    (directory / "manifest.json").write_text(json.dumps(meta))
    return directory / "manifest.json"


def dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def test_resume_from_a_run_dir_in_a_bad_state(cli, tmp_path, trained_run, manifest, tiny_train):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "checkpoints" / "step_00000003" / "meta.json").write_text('{"progress": {"st')  # damaged newest
    stale = run / "checkpoints" / ".latest.k3j9x0aa.tmp"  # a kill between atomic_write's write and rename
    stale.write_text("step_00000003")
    (run / "LOCK").write_text(json.dumps({"host": os.uname().nodename, "pid": dead_pid(), "since": "earlier"}))
    data = without_validation(manifest, tmp_path / "data")
    ran = cli(f"biglearn train {tiny_train} data.manifest={data} run_dir={run} trainer.max_steps=5 trainer.lr=3e-4 "
              "trainer.save_every=1 trainer.keep_last=5 trainer.export_at_end=false").succeeded()
    damaged = [line for line in ran.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "step_00000003" in damaged[0] and "meta.json" in damaged[0], ran.stderr
    assert "using the newest intact one, step_00000002" in damaged[0]
    assert len(re.findall(r"note: .*LOCK was held by process \d+ .*no longer running; taken over", ran.stderr)) == 1
    assert len([line for line in ran.stderr.splitlines() if "no validation split" in line]) == 1
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "step_00000002 (step 2)" in log
    assert "trainer.lr 0.003 -> 0.0003" in log and "trainer.max_steps 3 -> 5" in log
    steps = [r["step"] for r in records(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 5  # no step twice
    # The schedule continues at its place with the new peak and length (a record's lr is the rate
    # the next step will use): steps 4 and 6 of a 5-step schedule with a 2-step warm-up.
    schedule = WarmupCosine(total=5, warmup=2, min_ratio=0.1)
    lr = {r["step"]: r["lr"] for r in records(run)}
    assert math.isclose(lr[3], 3e-4 * schedule.factor(4), rel_tol=1e-6) and math.isclose(lr[5], 3e-5, rel_tol=1e-6)
    assert not stale.exists() and not (run / "LOCK").exists()
    # the copied run's evaluations up to the step resumed from (its step-0 baseline), and no new one
    assert records(run, "eval") == [r for r in records(trained_run, "eval") if r["step"] <= 2]
    assert json.loads((run / "checkpoints" / "step_00000005" / "COMPLETE").read_text())["files"]


def _start(tmp_path, run, manifest, tiny_train, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pretrain", "train", *tiny_train.split(), f"data.manifest={manifest}",
               f"run_dir={run}", *overrides]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_step(proc, run, step, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and any(r["step"] >= step for r in records(run)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} logged: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}")


@pytest.mark.slow
def test_two_writers_one_run_dir(cli, tmp_path, manifest, tiny_train):
    """A second `train` on a run directory in use (a requeued job overlapping its predecessor) is
    refused in one line naming the first; the first trains on, saves at SIGTERM and exits 0;
    metrics.jsonl holds every step once."""
    run = tmp_path / "run"
    first = _start(tmp_path, run, manifest, tiny_train, "trainer.max_steps=100000", "trainer.save_every=5",
                   "trainer.log_every=1")
    try:
        _wait_for_step(first, run, 2)
        before = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        cli(f"biglearn train {tiny_train} data.manifest={manifest} run_dir={run} trainer.max_steps=3"
            ).refused(2, "is in use", f"process {first.pid}")
        _wait_for_step(first, run, 12)  # the first run goes on, its rotation undisturbed:
        # checkpoints every 5 steps, the newest keep_last = 3 kept (4 between a save's rename and
        # its pruning), and every one of `before` that rotation has not reached yet still there.
        # (The first run may be far past step 12 by now: the refused command took seconds.)
        now = sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))
        assert now and len(now) <= 4 and all(b - a == 5 for a, b in zip(now, now[1:])), now
        assert {int(name.removeprefix("step_")) for name in before} & set(range(now[0], now[-1] + 1)) <= set(now)
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    steps = [r["step"] for r in records(run)]
    assert steps == sorted(set(steps))
    assert not (run / "LOCK").exists()


@pytest.mark.slow
def test_shards_deleted_under_a_running_run(tmp_path, manifest, tiny_train):
    """Every training shard removed while the run reads them: the run stops with a checkpoint of
    its last step and one line naming the shards, exit 2."""
    data = tmp_path / "data"
    shutil.copytree(manifest.parent, data)
    run = tmp_path / "run"
    proc = _start(tmp_path, run, data / "manifest.json", tiny_train, "trainer.max_steps=100000",
                  "trainer.save_every=100000", "trainer.log_every=1")
    _wait_for_step(proc, run, 2)
    for shard in data.glob("train-*.tar"):
        shard.unlink()
    out, err = proc.communicate(timeout=600)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert proc.returncode == 2 and "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert "found no readable sample" in errors[0] and "train-000000.tar" in errors[0]
    last = records(run)[-1]["step"]
    assert (run / "checkpoints" / f"step_{last:08d}" / "COMPLETE").is_file(), errors[0]


@pytest.fixture
def small_fs(tmpfs):
    """An 8 MB tmpfs (tests/conftest.py)."""
    return tmpfs("8m")


def fill(path: Path, leave: int) -> None:
    """Write `path` until its filesystem has `leave` bytes free."""
    with open(path, "wb") as f:
        while (free := shutil.disk_usage(path.parent).free) > leave:
            f.write(b"\0" * min(1 << 16, free - leave))
            f.flush()


@pytest.mark.slow
def test_room_for_the_checkpoint_but_not_the_export(cli, small_fs, manifest, tiny_train, nothing_left):
    """The end-of-run export on a disk that the final checkpoint filled: one line, exit 2, the
    checkpoint complete, no export/ and nothing partial."""
    from pretrain.checkpoint.sharded import BYTES_PER_PARAMETER, FREE_SPACE_FACTOR, FREE_SPACE_SLACK
    from pretrain.model import ModelConfig

    # the run's model: two streams, so that no offset table sized by max_seq_len enters the count
    parameters = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, streams=2).parameter_count()
    save_needs = int(BYTES_PER_PARAMETER * parameters * FREE_SPACE_FACTOR) + FREE_SPACE_SLACK
    run = small_fs / "run"
    fill(small_fs / "filler", save_needs + (160 << 10))  # the save's check passes, the checkpoint then takes ~0.8 MiB
    ran = cli(f"biglearn train {tiny_train} model.streams=2 data.manifest={manifest} run_dir={run} trainer.max_steps=1 "
              "trainer.save_every=1000 trainer.export_at_end=true")
    ran.refused(2, "not enough free space", f"{run}")
    assert "for export in" in ran.error_lines()[0]
    assert (run / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    assert not (run / "export").exists() and not nothing_left(run)


@pytest.mark.slow
def test_the_divergence_advice_is_a_command_that_works(cli, tmp_path, manifest, tiny_train):
    """lr=300 diverges after a few steps (AdamW's decoupled decay multiplies the weights by
    1 - lr x 0.1 = -29 per step); the command its error line prints resumes from the last good
    checkpoint with a 10x lower learning rate (applied and logged). Followed as printed until a
    run ends normally, it gets there."""
    run = tmp_path / "run"
    ran = cli(f"biglearn train {tiny_train} data.manifest={manifest} run_dir={run} trainer.max_steps=30 "
              "trainer.save_every=1 trainer.keep_last=2 trainer.lr=300 trainer.max_bad_steps=2 "
              "trainer.export_at_end=false")
    lr = 300.0
    for _ in range(4):
        line = ran.refused(1, "diverged", "with a 10x lower learning rate:")
        advice = line.split("learning rate: ", 1)[1]
        assert advice.startswith("biglearn train ") and f"trainer.lr={lr / 10:g}" in advice.split(), advice
        assert re.search(r"resume=\S+/step_\d{8}", advice), advice
        ran, lr = cli(advice), lr / 10
        assert re.search(rf"resume: trainer.lr \S+ -> {re.escape(repr(lr))} changed since step_\d+; applied",
                         (run / "train.log").read_text())
        if ran.status == 0:
            break
    ran.succeeded()
    assert records(run)[-1]["step"] == 30

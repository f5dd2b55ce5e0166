"""Full disks, on a real 20 MB tmpfs (mounting needs root; skipped with the reason otherwise):
the trainer refuses to start a save without room for it, in one line naming the path and the
numbers, and a save that runs out of space half-way leaves no COMPLETE marker and removes no
older complete checkpoint, not even one of the same step."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint.sharded import COMPLETE, LATEST, complete_checkpoints, directory_bytes

REPO = Path(__file__).resolve().parents[3]
TINY = ["deepspeed=cpu", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "data.batch_size=4",
        "trainer.progress=false", "trainer.loggers=[jsonl]", "eval.batches=1", "eval.plot=false",
        "trainer.eval_every=0", "trainer.export_at_end=false", "trainer.save_every=1", "trainer.keep_last=3"]


@pytest.fixture
def small_fs(tmpfs):
    """A 20 MB tmpfs (tests/conftest.py)."""
    return tmpfs("20m")


def fill(path: Path, leave: int = 0) -> None:
    """Write `path` until the filesystem has `leave` bytes free (or is full)."""
    with open(path, "ab") as f:
        for chunk in (1 << 20, 1 << 14, 1 << 10, 1):
            try:
                while os.statvfs(path).f_bavail * os.statvfs(path).f_frsize - chunk >= leave:
                    f.write(b"\0" * chunk)
                    f.flush()
            except OSError:  # ENOSPC: full
                break


def snapshot(checkpoint_dir: Path) -> dict:
    return {str(p.relative_to(checkpoint_dir)): p.stat().st_mtime_ns for p in checkpoint_dir.rglob("*")}


@pytest.mark.slow
def test_save_without_room_stops_with_one_line_and_keeps_checkpoints(small_fs, manifest):
    run_dir = small_fs / "run"
    base = [sys.executable, "-m", "pretrain.train", *TINY, "data.kind=manifest", f"data.manifest={manifest}",
            f"run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*base, "trainer.max_steps=2"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    kept = complete_checkpoints(checkpoints)
    assert [p.name for p in kept] == ["step_00000001", "step_00000002"]
    size = directory_bytes(kept[-1])
    fill(small_fs / "filler", leave=size // 2 + (1 << 20) // 2)  # logs still fit, a checkpoint does not
    before = snapshot(checkpoints)
    second = subprocess.run([*base, "trainer.max_steps=4"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode != 0
    line = [x for x in second.stderr.splitlines() if "error: " in x]
    assert len(line) == 1, second.stderr[-3000:]
    assert f"not enough free space to save a checkpoint in {checkpoints}" in line[0]
    assert f"newest checkpoint step_00000002 is {size / 2**20:.1f} MiB" in line[0] and "MiB free, need" in line[0]
    assert snapshot(checkpoints) == before and (checkpoints / LATEST).read_text() == "step_00000002"


SAVE_WHILE_THE_DISK_FILLS = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from pretrain.checkpoint import sharded as ckpt
from pretrain.train.config import load_config
from pretrain.train.engine import build_engine, init_distributed
from pretrain.train.task import LossModel
from pretrain.model import BigLearner
from test_sharded_disk import fill

checkpoints, filler = Path(sys.argv[1]), Path(sys.argv[2])
config = load_config(["deepspeed=cpu", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
                      "model.vocab_size=512", "deepspeed.zero_stage=1"])
init_distributed(True)
engine, _ = build_engine(config.deepspeed, config.trainer, config.data.batch_size, 1, LossModel(BigLearner(config.model)), 1,
                         True)
ckpt.save_checkpoint(engine, checkpoints, 1, {"step": 1}, {"cursor": 1}, keep_last=3)
check = ckpt.check_free_space

def check_then_fill(*args):  # another writer fills the disk between the check and the write
    check(*args)
    fill(filler)

ckpt.check_free_space = check_then_fill
for step in (2, 1):  # a new step, then the step of the complete checkpoint
    try:
        ckpt.save_checkpoint(engine, checkpoints, step, {"step": step}, {"cursor": step}, keep_last=3)
    except ckpt.CheckpointError as err:
        print("error:", err)
    filler.unlink()
"""


def test_save_that_runs_out_of_space_midway_loses_nothing(small_fs):
    checkpoints = small_fs / "checkpoints"
    result = subprocess.run([sys.executable, "-c", SAVE_WHILE_THE_DISK_FILLS, str(checkpoints), str(small_fs / "filler"),
                             str(Path(__file__).parent)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stdout + result.stderr[-3000:]
    for step, line in zip((2, 1), errors):
        assert f"saving the step-{step} checkpoint into {checkpoints}/.partial-step_{step:08d} failed: " \
               "no space left on device" in line, line
    assert [p.name for p in checkpoints.iterdir()] and not list(checkpoints.glob(".partial-*"))
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_00000001"]
    assert (checkpoints / "step_00000001" / COMPLETE).is_file() and not (checkpoints / "step_00000002").exists()
    assert (checkpoints / LATEST).read_text() == "step_00000001"

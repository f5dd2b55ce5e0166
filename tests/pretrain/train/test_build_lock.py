"""The lock of DeepSpeed's first-use CPU extension build (torch's FileBaton), with real processes:
one left by a build killed with SIGKILL is removed with a note and `train` runs; one a live
process still holds past the build limit is one `error:` line naming that process, exit 2,
instead of a silent wait for ever (docs/reliability.md, "The extension build lock")."""
import shutil
import signal
import subprocess
import sys

import pytest

from pretrain.train.engine import SHM_EXTENSION, _extensions_root, shm_extension_built

HOLD = ("import sys, time; from torch.utils.file_baton import FileBaton; "
        "assert FileBaton(sys.argv[1]).try_acquire(); print('held', flush=True); time.sleep(600)")


@pytest.fixture
def extensions(tmp_path):
    """A private copy of this machine's built extension (loading it needs no build), as
    TORCH_EXTENSIONS_DIR: a lock put there stalls no one else."""
    import os
    if not shm_extension_built():
        pytest.skip("DeepSpeed's CPU extension is not built on this machine (the first CPU run builds it)")
    root = _extensions_root(os.environ)
    built = next(p for p in [root / SHM_EXTENSION, *root.glob(f"*/{SHM_EXTENSION}")] if any(p.glob("*.so")))
    copy = tmp_path / "extensions" / built.parent.name
    shutil.copytree(built, copy / SHM_EXTENSION, ignore=shutil.ignore_patterns("lock"))
    return copy


@pytest.fixture
def holder(extensions):
    """A process holding the build lock as torch's cpp_extension does while it compiles."""
    lock = extensions / SHM_EXTENSION / "lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc, lock
    proc.kill()
    proc.wait()


TRAIN = "biglearn train {tiny} data.manifest={manifest} run_dir={run} trainer.max_steps=1 trainer.export_at_end=false"


def test_a_lock_left_by_a_killed_build_is_removed_with_a_note(cli, holder, tmp_path, manifest, tiny_train):
    proc, lock = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock.exists()  # what a kill -9 during the build leaves
    ran = cli(TRAIN.format(tiny=tiny_train, manifest=manifest, run=tmp_path / "run"),
              env={"TORCH_EXTENSIONS_DIR": str(lock.parent.parent)}).succeeded()
    notes = [line for line in ran.stderr.splitlines() if "note: removed" in line]
    assert len(notes) == 1 and str(lock) in notes[0] and "no process holds it" in notes[0], ran.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()


def test_a_lock_held_past_the_build_limit_is_one_line_naming_the_holder(cli, holder, tmp_path, manifest,
                                                                          tiny_train):
    proc, lock = holder
    ran = cli(TRAIN.format(tiny=tiny_train, manifest=manifest, run=tmp_path / "run"),
              env={"TORCH_EXTENSIONS_DIR": str(lock.parent.parent), "BIGLEARN_BUILD_LIMIT_S": "3"})
    ran.refused(2, str(lock), f"process {proc.pid}", "BIGLEARN_BUILD_LIMIT_S=3")
    assert "waiting for process" in ran.stderr  # said at once, not after the limit
    assert proc.poll() is None and lock.exists()  # a live holder's lock is not taken from it
    assert not (tmp_path / "run" / "LOCK").exists()

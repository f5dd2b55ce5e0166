"""Signals to `launch/local.sh` (what `kill`, `timeout`, a supervisor, a cancelled CI job or Ctrl-C
send), with a real DeepSpeed launch of two CPU ranks: the script forwards SIGTERM, SIGINT and
SIGUSR1 to the training ranks, each saves one checkpoint and exits 0, the launchers exit by
themselves, the script exits 0, and no process is left; signals repeated while the ranks save
change nothing (docs/reliability.md, "Signals")."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGINT"], ["SIGUSR1"], ["SIGTERM"] * 4],
                         ids=["term", "int", "usr1", "term-repeated"])
def test_a_signal_to_the_launcher_saves_once_and_leaves_nothing(tmp_path, manifest, tiny_train, signals):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(
        ["bash", str(REPO / "launch" / "local.sh"), "cpu", "-n", "2", *tiny_train.split(), f"data.manifest={manifest}",
         f"run_dir={run}", "trainer.max_steps=100000", "trainer.save_every=100000", "trainer.log_every=1",
         "data.num_workers=1"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    family = set()
    try:
        deadline = time.monotonic() + 600
        while not any(r["step"] >= 3 for r in _records(run)):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()[-5000:]
            time.sleep(0.2)
        family = {p.pid for p in psutil.Process(launcher.pid).children(recursive=True)}
        assert len(family) >= 2 + 2 + 2, family  # deepspeed runner + launch.py, 2 ranks, their 2 data workers
        for name in signals:
            os.kill(launcher.pid, getattr(signal, name))
            time.sleep(0.3)
        output, _ = launcher.communicate(timeout=180)
    finally:
        for pid in family:  # whatever a failure left
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-5000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-5000:]
    stopped = [line for line in output.splitlines() if "[rank 0]" in line and "stopping at step" in line]
    assert len(stopped) == 1, output[-5000:]  # rank 0 logs it once: one save, not one per signal
    step = _records(run)[-1]["step"]
    tags = [p.name for p in (run / "checkpoints").glob("step_*")]
    assert tags == [f"step_{step:08d}"] and (run / "checkpoints" / tags[0] / "COMPLETE").is_file(), output[-3000:]
    time.sleep(1)
    alive = [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}"
    assert not (run / "LOCK").exists()

"""launch/local.sh: the commands it builds (DRY_RUN) and real runs through the DeepSpeed launcher
with CPU processes on gloo."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "launch" / "local.sh"
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def _local(*args, dry_run=True, timeout=60, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("CUDA_VISIBLE_DEVICES", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full_env.update(PYTHON=sys.executable, DRY_RUN="1" if dry_run else "0", **env)
    return subprocess.run(["bash", str(LOCAL), *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def _command(stdout):
    lines = [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]
    return shlex.split(lines[-1])


def test_cpu_mode_command():
    proc = _local("cpu", "-n", "3", "lr=0.1", MASTER_PORT="29123")
    assert proc.returncode == 0, proc.stderr
    assert "+ export DS_ACCELERATOR=cpu LOCAL_SIZE=3" in proc.stdout
    cmd = _command(proc.stdout)
    assert cmd[:-2] == [DEEPSPEED, "--master_port", "29123", "--no_local_rank", "--num_gpus", "3",
                        "--module", "pretrain.train", "experiment=smoke", "lr=0.1"]
    assert cmd[-2].startswith(f"run_dir={REPO}/runs/local-cpu-") and cmd[-1] == "deepspeed=cpu"
    proc = _local("cpu", "deepspeed=zero2", "run_dir=/tmp/r", MASTER_PORT="29123")
    assert _command(proc.stdout)[-4:] == ["pretrain.train", "experiment=smoke", "deepspeed=zero2", "run_dir=/tmp/r"]


def test_gpu_mode_command():
    proc = _local("gpu", "experiment=base", "run_dir=/tmp/r", MASTER_PORT="29124")
    assert _command(proc.stdout) == [DEEPSPEED, "--master_port", "29124", "--no_local_rank", "--num_gpus", "1",
                                     "--module", "pretrain.train", "experiment=base", "run_dir=/tmp/r"]
    # CUDA_VISIBLE_DEVICES picks the physical devices, which DeepSpeed's --include understands
    proc = _local("gpu", "-n", "2", MASTER_PORT="29124", CUDA_VISIBLE_DEVICES="3,5,6")
    assert _command(proc.stdout)[3:6] == ["--no_local_rank", "--include", "localhost:3,5"]
    proc = _local("gpu", "-n", "4", CUDA_VISIBLE_DEVICES="3,5,6")
    assert proc.returncode != 0 and "CUDA_VISIBLE_DEVICES lists 3" in proc.stderr


def test_bad_arguments():
    for args, message in [((), "Usage"), (("tpu",), "'gpu' or 'cpu'"), (("cpu", "-n", "0"), "positive")]:
        proc = _local(*args)
        assert proc.returncode == 2 and message in proc.stdout + proc.stderr
    proc = _local("--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout


@pytest.mark.dist
def test_cpu_mode_preflight_failure_reaches_exit_status(dataset):
    """The launch path of training (deepspeed launcher, DS_ACCELERATOR=cpu, gloo) with preflight as
    the module: two ranks meet in an all-reduce, and a missing shard or a bandwidth below the
    floor fails the whole launch."""
    shards, tok, out = dataset
    (shards / "shard-000002.tar").unlink()
    proc = _local("cpu", "-n", "2", "--preflight", "--manifest", str(shards), "--tokenizer", str(tok),
                  "--output-dir", str(out), "--min-free-gb", "0.001", "--allreduce-mb", "0.5", "--iters", "2",
                  "--timeout-s", "60", "--min-busbw-gbps", "1e6", dry_run=False, timeout=120)
    assert proc.returncode != 0
    assert "preflight: 2 rank(s) on 1 node(s)" in proc.stdout
    assert "[FAIL] all-reduce" in proc.stdout and "busbw below --min-busbw-gbps 1e+06; gloo, 2 rank(s)" in proc.stdout
    assert "'shard-000002.tar' missing" in proc.stdout and "preflight FAILED" in proc.stdout


@pytest.mark.dist
@pytest.mark.slow
def test_cpu_mode_trains_smoke(tmp_path):
    """Real trainer, 2 CPU processes, experiment=smoke: must train its few steps and exit 0."""
    run_dir = tmp_path / "run"
    proc = _local("cpu", "-n", "2", f"run_dir={run_dir}", dry_run=False, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "| 2 ranks | cpu |" in (run_dir / "train.log").read_text()  # both ranks joined, on the CPU
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps and steps == sorted(steps) and steps[-1] > 0
    assert any((run_dir / "checkpoints").glob("step_*")), "no checkpoint saved"

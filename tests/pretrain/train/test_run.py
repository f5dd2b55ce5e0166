"""The training loop end to end, through its command line (subprocesses, DeepSpeed on CPU/gloo):
signals save loadable checkpoints, non-finite losses stop the run cleanly, and a run killed
with SIGKILL resumes to exactly the losses and data of an uninterrupted run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
TINY = ["deepspeed=cpu", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.batch_size=4",
        "trainer.progress=false", "trainer.loggers=[jsonl]", "trainer.warmup_steps=2", "trainer.lr=3e-3",
        "eval.batches=1", "eval.plot=false", "trainer.export_at_end=false", "trainer.eval_every=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(run_dir, manifest, *overrides, nproc=1):
    launcher = [sys.executable, "-m", "pretrain.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(_free_port()), "-m", "pretrain.train"]
    return launcher + [*TINY, "data.kind=manifest", f"data.manifest={manifest}", f"run_dir={run_dir}", *overrides]


def run(run_dir, manifest, *overrides, nproc=1, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command(run_dir, manifest, *overrides, nproc=nproc), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start(run_dir, manifest, *overrides, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command(run_dir, manifest, *overrides, nproc=nproc), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def train_records(run_dir) -> dict[int, dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records if r["kind"] == "train"}


def eval_steps(run_dir) -> list[int]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "eval"]


def wait_for_step(process, run_dir, step, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(train_records(run_dir), default=0) >= step:
            return
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early ({process.returncode}):\n{process.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_sigterm_saves_a_loadable_checkpoint_and_exits_zero(tmp_path, manifest):
    from pretrain.checkpoint.loading import load_for_inference
    from pretrain.checkpoint.sharded import find_checkpoint
    run_dir = tmp_path / "run"
    process = start(run_dir, manifest, "trainer.max_steps=100000", "trainer.save_every=0", "trainer.log_every=1")
    wait_for_step(process, run_dir, 3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    tag = find_checkpoint(run_dir)
    assert tag is not None, output[-3000:]
    meta = json.loads((tag / "meta.json").read_text())
    assert meta["progress"]["step"] >= 3 and tag.name == f"step_{meta['progress']['step']:08d}"
    model, loaded_meta = load_for_inference(run_dir, trust_checkpoint=True)  # no export after a signal
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert loaded_meta["progress"]["step"] == meta["progress"]["step"]


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, manifest):
    """Resume from a checkpoint whose weights hold a NaN: every loss is non-finite, each micro-batch
    is skipped and counted, and trainer.max_bad_steps in a row stop the run with exit code 1,
    writing nothing over the last checkpoint."""
    from pretrain.checkpoint.sharded import find_checkpoint
    run_dir = tmp_path / "run"
    common = ["deepspeed.zero_stage=0", "trainer.save_every=2", "trainer.max_bad_steps=3"]
    first = run(run_dir, manifest, *common, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert eval_steps(run_dir) == [0, 2]  # a fresh run evaluates its untrained weights first (the plot's baseline)
    tag = find_checkpoint(run_dir)
    weights = tag / "mp_rank_00_model_states.pt"
    state = torch.load(weights, weights_only=True)
    state["module"]["model.blocks.0.wq.weight"][0, 0] = float("nan")
    torch.save(state, weights)
    before = {p.name: p.stat().st_mtime_ns for p in tag.iterdir()}
    result = run(run_dir, manifest, *common, "trainer.max_steps=10")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    for count in (1, 2):
        assert f"bad step 3: non-finite loss on 1 rank(s), micro-batch skipped ({count} in a row)" in result.stderr
    assert "diverged: 3 bad steps in a row (trainer.max_bad_steps=3), from step 3 to step 3" in result.stderr
    assert find_checkpoint(run_dir) == tag and {p.name: p.stat().st_mtime_ns for p in tag.iterdir()} == before
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [tag.name]
    assert eval_steps(run_dir).count(0) == 1  # a resumed run does not evaluate step 0 again


@pytest.mark.slow
@pytest.mark.dist
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, manifest):
    """2 ranks, fp32, deterministic: kill -9 after the step-10 checkpoint, resume=auto, and
    every later step has the same loss, learning rate, token count and consumed-sample digest."""
    common = ["trainer.max_steps=40", "trainer.save_every=10", "trainer.log_every=1", "trainer.deterministic=true",
              "data.batch_size=8",
              "deepspeed.zero_stage=2", "trainer.keep_last=10"]
    reference = run(tmp_path / "reference", manifest, *common, nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "interrupted"
    process = start(run_dir, manifest, *common, nproc=2)
    wait_for_step(process, run_dir, 12)
    for pid in [*descendants(process.pid), process.pid]:  # both ranks and the launcher, no clean-up
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)
    killed_at = max(train_records(run_dir))
    assert 12 <= killed_at < 40
    resumed = run(run_dir, manifest, *common, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    expected, got = train_records(tmp_path / "reference"), train_records(run_dir)
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        for key in ("loss", "data_digest", "tokens_seen", "lr"):
            assert got[step][key] == expected[step][key], (step, key, got[step][key], expected[step][key])
    for rank in (0, 1):  # the data cursor at the end: the same samples were consumed
        name = f"checkpoints/step_00000040/rank_{rank:05d}.pt"
        a = torch.load(tmp_path / "reference" / name, weights_only=True)["data"]
        b = torch.load(run_dir / name, weights_only=True)["data"]
        assert a == b


@pytest.mark.slow
@pytest.mark.dist
def test_sigusr1_to_the_ranks_saves_and_resume_continues(tmp_path, manifest):
    """What launch/slurm does on pre-emption: USR1 to every rank, checkpoint, exit 0, resume=auto."""
    from pretrain.checkpoint.sharded import find_checkpoint
    run_dir = tmp_path / "run"
    process = start(run_dir, manifest, "trainer.max_steps=100000", "trainer.save_every=0", "trainer.log_every=1",
                    nproc=2)
    wait_for_step(process, run_dir, 3)
    ranks = [pid for pid in descendants(process.pid) if "pretrain.train" in Path(f"/proc/{pid}/cmdline").read_text()]
    for pid in ranks:
        os.kill(pid, signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    step = json.loads((find_checkpoint(run_dir) / "meta.json").read_text())["progress"]["step"]
    resumed = run(run_dir, manifest, f"trainer.max_steps={step + 2}", "trainer.log_every=1", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max(train_records(run_dir)) == step + 2


@pytest.mark.slow  # two in-process runs: ~30-60 s on 2 cores
def test_in_process_runs_leave_no_launcher_variables_and_no_log_handlers(tmp_path, manifest, monkeypatch):
    """train() twice in one process (a notebook): the launcher variables a run set for its
    one-process group are gone after it (a child process would try to join that group), the
    second run reuses the group, and the root logger is put back as it was."""
    import logging

    from pretrain.train.config import CONFIG_DIR, load_config
    from pretrain.train.run import train

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for name in ("first", "second"):
        config = load_config([*TINY, "trainer.max_steps=2", "data.kind=manifest", f"data.manifest={manifest}",
                              f"run_dir={tmp_path / name}"], CONFIG_DIR)
        assert train(config)["step"] == 2
        assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ
        assert root.handlers == handlers and root.level == level
        assert "run dir" in (tmp_path / name / "train.log").read_text()


def test_an_epoch_limit_ends_the_run_after_that_many_passes(tmp_path, manifest):
    """trainer.epochs with no step limit: the run ends after that many passes over the training
    split, ceil(epochs x batches per epoch / grad_accum) optimizer steps, its schedule sized to them."""
    import math

    from pretrain.data import BatchStream

    epochs = 0.02  # of the tiny corpus's 800-odd batches of 4: a few steps
    per_epoch = len(BatchStream(manifest, batch_size=4))
    done = run(tmp_path / "run", manifest, "trainer.max_steps=0", f"trainer.epochs={epochs}", "trainer.grad_accum=2",
               "trainer.log_every=1", "trainer.save_every=0")
    assert done.returncode == 0, done.stderr[-3000:]
    records = train_records(tmp_path / "run")
    assert max(records) == math.ceil(epochs * per_epoch / 2)
    assert records[max(records)]["lr"] == pytest.approx(3e-3 * 0.1, rel=1e-6)  # cosine ended at min_lr_ratio


def test_a_failed_start_leaves_no_run_directory(tmp_path, manifest):
    """Bad data at the start: exit 2 with one line, and neither the run directory nor the parent
    it had to create is left behind (with its train.log); an existing directory is kept."""
    run_dir = tmp_path / "new" / "run"
    done = run(run_dir, tmp_path / "no_such_manifest.json")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("python -m pretrain.train: error:")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    assert run(tmp_path / "kept", tmp_path / "no_such_manifest.json").returncode == 2
    assert (tmp_path / "kept").is_dir()

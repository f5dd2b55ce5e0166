"""The divergence guard. Unit: on random step outcomes it stops exactly where a brute-force scan
finds max_bad_steps bad steps in a row, ignores the fp16 loss scaler's warm-up, and protects
the newest checkpoint whose weights then gave a good step. End to end: trainer.lr=1e6 on ZeRO-1 (DeepSpeed
skips every step from step 4 on with "OVERFLOW!") and model.init_std=1e30 stop the run with
exit 1 naming the step; the checkpoint before the first bad step survives rotation and
nothing is exported."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.checkpoint.sharded import complete_checkpoints
from pretrain.train.guard import BadStepGuard, TrainingError

REPO = Path(__file__).resolve().parents[3]
TINY = ["deepspeed=cpu", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.batch_size=4",
        "trainer.progress=false", "trainer.loggers=[jsonl]", "eval.batches=1", "eval.plot=false",
        "trainer.eval_every=0", "trainer.log_every=1", "trainer.warmup_steps=1"]


def first_stop(outcomes: list[str], k: int) -> int | None:
    """Brute force: index of the first outcome that completes k consecutive bad ones."""
    for end in range(len(outcomes)):
        if end + 1 >= k and all(o != "good" for o in outcomes[end + 1 - k:end + 1]):
            return end
    return None


def test_guard_stops_where_a_brute_force_scan_does():
    rng = np.random.default_rng()
    for _ in range(300):
        k = int(rng.integers(1, 5))
        outcomes = list(rng.choice(["good", "loss", "skipped", "inf_norm"], size=30, p=[0.55, 0.15, 0.15, 0.15]))
        guard, stopped = BadStepGuard(k), None
        for step, outcome in enumerate(outcomes):
            try:
                if outcome == "loss":
                    guard.bad(step, "non-finite loss")
                else:
                    guard.optimizer_step(step, applied=outcome != "skipped",
                                         grad_norm=math.inf if outcome == "inf_norm" else 1.0)
            except TrainingError as err:
                stopped = step
                assert f"to step {step}" in str(err) and f"trainer.max_bad_steps={k}" in str(err)
                break
        assert stopped == first_stop(outcomes, k), (k, outcomes)


def test_fp16_warm_up_is_not_divergence_and_protection_follows_the_streak():
    guard = BadStepGuard(3)
    for step in range(1, 11):  # the scaler halves 2**16 down: skipped, but not bad
        guard.optimizer_step(step, applied=False, grad_norm=None, loss_scale=2.0 ** (16 - step), min_loss_scale=1.0)
    assert guard.healthy
    guard.optimizer_step(11, applied=True, grad_norm=0.5, loss_scale=64.0, min_loss_scale=1.0)
    guard.saved("step_11")
    assert guard.protected is None  # no good step from its weights yet
    guard.optimizer_step(12, applied=True, grad_norm=0.5, loss_scale=64.0, min_loss_scale=1.0)
    assert guard.protected == "step_11"  # its weights gave a good step
    guard.saved("step_12")
    guard.optimizer_step(13, applied=False, grad_norm=None, loss_scale=32.0, min_loss_scale=1.0)  # after warm-up: bad
    assert not guard.healthy and guard.protected == "step_11"  # step_12's weights gave only bad steps
    guard.saved("step_13")  # saved during the streak: never the one to protect
    assert guard.protected == "step_11"
    state = guard.state_dict()
    resumed = BadStepGuard(3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.optimizer_step(14, applied=True, grad_norm=math.nan)
    with pytest.raises(TrainingError, match="from step 13 to step 15.*last good checkpoint is step_11") as stop:
        resumed.bad(15, "non-finite loss")
    assert stop.value.last_good == "step_11"
    guard.optimizer_step(14, applied=True, grad_norm=0.4)
    assert guard.healthy and guard.protected == "step_11" and guard.first_bad_step is None
    stuck = BadStepGuard(2)  # a scale already at its floor is no warm-up
    stuck.optimizer_step(1, applied=False, grad_norm=None, loss_scale=1.0, min_loss_scale=1.0)
    with pytest.raises(TrainingError):
        stuck.optimizer_step(2, applied=False, grad_norm=None, loss_scale=1.0, min_loss_scale=1.0)


def train(run_dir, manifest, *overrides):
    return subprocess.run([sys.executable, "-m", "pretrain.train", *TINY, "data.kind=manifest",
                           f"data.manifest={manifest}", f"run_dir={run_dir}", *overrides],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


def test_huge_learning_rate_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, manifest):
    """lr=1e6 blows the weights up after a step or two. Whether the first bad event is a
    non-finite gradient norm (the step is taken, and counted bad) or a non-finite loss (the
    micro-batch is skipped, the step does not advance) depends on where the overflow surfaces;
    either way the run stops after 3 bad events in a row with exit 1, names the steps, keeps the
    last good checkpoint and exports nothing."""
    run_dir = tmp_path / "run"
    result = train(run_dir, manifest, "trainer.lr=1e6", "deepspeed.zero_stage=1", "trainer.max_steps=40",
                   "trainer.save_every=1", "trainer.keep_last=2", "trainer.max_bad_steps=3")
    assert result.returncode == 1, result.stderr[-3000:]
    found = re.search(r"diverged: 3 bad steps in a row \(trainer.max_bad_steps=3\), from step (\d+) to step (\d+)",
                      result.stderr)
    assert found, result.stderr[-3000:]
    first_bad, last_bad = map(int, found.groups())
    assert first_bad <= last_bad <= first_bad + 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert all(math.isfinite(r["grad_norm"]) and math.isfinite(r["loss"]) for r in train_records if r["step"] < first_bad)
    assert all(not math.isfinite(r["grad_norm"]) for r in train_records if first_bad <= r["step"] <= last_bad)
    kept = [p.name for p in complete_checkpoints(run_dir / "checkpoints")]
    # The last good checkpoint is the newest whose weights then gave a good step: step_{first_bad - 2}
    # (step_{first_bad - 1}'s weights gave the first bad step), none when that is step 0.
    if first_bad > 2:
        last_good = f"step_{first_bad - 2:08d}"
        assert last_good in kept and f"last good checkpoint is {run_dir / 'checkpoints' / last_good}" in result.stderr
    else:
        assert "last good checkpoint is (none saved)" in result.stderr
    assert len(kept) <= 3  # keep_last=2 newest + the protected last good one
    assert not (run_dir / "export").exists()


@pytest.mark.slow
def test_huge_init_never_trains_and_exports_nothing(tmp_path, manifest):
    run_dir = tmp_path / "run"
    result = train(run_dir, manifest, "model.init_std=1e30", "deepspeed.zero_stage=2", "trainer.max_steps=40",
                   "trainer.max_bad_steps=4")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "diverged: 4 bad steps in a row (trainer.max_bad_steps=4), from step 1 to step" in result.stderr
    assert "last good checkpoint is (none saved)" in result.stderr
    assert not (run_dir / "export").exists() and not complete_checkpoints(run_dir / "checkpoints")

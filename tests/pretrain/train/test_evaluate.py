"""Evaluation tasks follow their definitions, the matrix equals exact per-order scoring, and a
trained demo model beats an untrained one on every task (also through the command line)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.train.evaluate import EvalConfig
from pretrain.train.evaluate import eval_batches, evaluate, validation_windows
from pretrain.objectives import EVAL_TASKS, eval_split
from pretrain.infer import score
from pretrain.model import BigLearner, ModelConfig

REPO = Path(__file__).resolve().parents[3]


def parts(spec):
    source = spec.order[:spec.n_source]
    targets = spec.order[spec.n_source:spec.n_source + spec.n_target]
    return source, targets, spec.target_groups


def test_draws_are_fixed_by_the_seed():
    rng = np.random.default_rng(0)
    windows = [[rng.integers(4, 100, size=24) for _ in range(3)] for _ in range(2)]
    first = eval_batches(windows, EvalConfig(), pad_id=0)
    again = eval_batches(windows, EvalConfig(), pad_id=0)
    other = eval_batches(windows, EvalConfig(seed=99), pad_id=0)
    for task in EVAL_TASKS:
        for a, b in zip(first[task], again[task]):
            assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.positions, b.positions)
    assert not all(np.array_equal(a.positions, b.positions) for a, b in zip(first["joint"], other["joint"]))


def test_matrix_equals_exact_scores_of_each_order():
    """NLL per token of the one-target-per-group tasks = -sum(log p(x_T | x_S)) / |T| from
    pretrain.infer.score, the exact chain-rule score of the same order."""
    torch.manual_seed(0)
    model = BigLearner(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2)).eval()
    rng = np.random.default_rng(1)
    windows = [[rng.integers(0, 50, size=20) for _ in range(3)] for _ in range(2)]
    config = EvalConfig(tasks=["joint", "left_to_right", "infill"])
    batches = eval_batches(windows, config, pad_id=0)
    matrix = evaluate(model.loss, batches, torch.device("cpu"))
    for task in config.tasks:
        total, count = 0.0, 0
        for batch_index, batch_windows in enumerate(windows):
            draw = np.random.default_rng([config.seed, 7919, batch_index, EVAL_TASKS.index(task)])
            for window in batch_windows:
                source, targets, _ = parts(eval_split(task, len(window), draw,
                                                 mlm_ratio=config.mlm_ratio, infill_ratio=config.infill_ratio))
                total -= float(score(model, window, source, targets))
                count += len(targets)
        assert matrix[task]["tokens"] == count
        assert matrix[task]["nll"] == pytest.approx(total / count, rel=1e-5)
        assert matrix[task]["ppl"] == pytest.approx(np.exp(total / count), rel=1e-5)


def test_trained_demo_model_beats_untrained_on_every_task(tmp_path, manifest):
    from pretrain.checkpoint.loading import load_for_inference
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "deepspeed=cpu", "model.d_model=32", "model.n_layers=2",
         "model.n_heads=2", "data.batch_size=8", "trainer.progress=false", "trainer.loggers=[jsonl]",
         "trainer.warmup_steps=2", "trainer.lr=1e-2", "trainer.max_steps=30", "trainer.log_every=5",
         "trainer.eval_every=15", "eval.batches=2", "data.kind=manifest", f"data.manifest={manifest}",
         f"run_dir={run_dir}"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "training.png").stat().st_size > 10_000
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Step 0 is the run's own untrained baseline (evaluated before the first step), then every 15 steps.
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 15, 30]

    trained, meta = load_for_inference(run_dir)
    torch.manual_seed(0)
    untrained = BigLearner(trained.config).eval()
    config = EvalConfig(batches=2)
    batches = eval_batches(validation_windows(manifest, config.batches, 8), config, pad_id=0)
    after = evaluate(trained.loss, batches, torch.device("cpu"))
    before = evaluate(untrained.loss, batches, torch.device("cpu"))
    for task in EVAL_TASKS:
        assert after[task]["nll"] < before[task]["nll"] - 0.1, (task, after[task], before[task])
    # The trainer's own final matrix (DeepSpeed engine) is the same numbers.
    baseline, final = [r["tasks"] for r in records if r["kind"] == "eval"][::2]
    for task in EVAL_TASKS:
        assert final[task]["nll"] == pytest.approx(after[task]["nll"], rel=1e-5)
        assert final[task]["nll"] < baseline[task]["nll"] - 0.1, (task, final[task], baseline[task])

    # Standalone: python -m pretrain.train.evaluate ckpt=RUN_DIR reproduces it.
    out = tmp_path / "matrix.json"
    cli = subprocess.run([sys.executable, "-m", "pretrain.train.evaluate", f"ckpt={run_dir}", f"out={out}",
                          f"plot={tmp_path / 'eval.png'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    standalone = json.loads(out.read_text())
    for task in EVAL_TASKS:
        assert standalone[task]["nll"] == pytest.approx(after[task]["nll"], rel=1e-5)
    assert (tmp_path / "eval.png").is_file()


def test_command_line_help_and_errors():
    help_text = subprocess.run([sys.executable, "-m", "pretrain.train.evaluate", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert help_text.returncode == 0 and "ckpt" in help_text.stdout
    bad = subprocess.run([sys.executable, "-m", "pretrain.train.evaluate", "ckpt=/nonexistent", "batchez=3"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "batchez" in bad.stderr


@pytest.mark.parametrize("overrides, message", [
    (["ckpt=/x", "batches=many"], "batches='many': expected int"),
    (["batches=3"], "ckpt=... is required"),
    (["ckpt=/x", "tasks=[joint,mlm]", "device=cpu"], None),
    (["ckpt=/x", "tasks=[foo]"], "tasks entries must be among joint, left_to_right, mlm, infill, biglearn, prefix, "
                                 "suffix; got 'foo'"),
])
def test_overrides_compose_onto_the_schema(overrides, message):
    from data_pipeline.errors import UserError
    from pretrain.train.evaluate import parse_args

    if message is None:
        args = parse_args(overrides)
        assert args.ckpt == "/x" and args.tasks == ["joint", "mlm"] and args.device == "cpu" and args.batches is None
        return
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_args(overrides)

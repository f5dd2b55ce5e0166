"""The demo's report: unigram baseline against brute force, and (slow) a demo run, evaluation
shortened to 2 batches, whose trained model beats the unigram baseline at left-to-right NLL and
prefers a held-out sentence to its scrambled tokens. Infilling top-1 accuracy is NOT asserted
above the unigram baseline: at the demo's 2.5 minutes the two are within a point (9.3% vs 8.3%
in one run, 7.2% vs 7.7% in another; README), a goal of issue 17 still missed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.collate import collate
from pretrain.demo_report import unigram_scores
from pretrain.objectives import eval_split

REPO = Path(__file__).resolve().parents[2]


def test_unigram_baseline_equals_brute_force():
    rng = np.random.default_rng()
    vocab = int(rng.integers(20, 60))
    log_unigram = np.log(rng.dirichlet(np.ones(vocab)))
    windows = [rng.integers(4, vocab, size=int(rng.integers(8, 20))) for _ in range(6)]
    infill = [collate(windows, [eval_split("infill", len(w), rng) for w in windows], 0)]
    l2r = [collate(windows, [eval_split("left_to_right", len(w), rng) for w in windows], 0)]
    got = unigram_scores(log_unigram, infill, l2r)
    best = int(np.argmax(log_unigram))
    middles = [int(infill[0].labels[b, t]) for b in range(len(windows)) for t in range(infill[0].n_target[b])]
    assert got["infill_top1"] == pytest.approx(np.mean([m == best for m in middles]))
    every = np.concatenate(windows)  # left to right predicts every token of every window
    assert got["left_to_right_nll"] == pytest.approx(-log_unigram[every].mean())


@pytest.mark.slow
def test_demo_beats_the_baselines_at_left_to_right_nll(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pretrain.demo", f"run_dir={tmp_path / 'run'}", "resume=never",
                          "eval.batches=2", "trainer.progress=false"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "unigram" in run.stdout and "scrambled" in run.stdout
    numbers = json.loads((tmp_path / "run" / "demo_report.json").read_text())
    nll = numbers["left_to_right_nll"]
    assert nll["trained"] < nll["unigram"] < nll["untrained"], nll
    accuracy = numbers["infill_top1"]
    assert accuracy["trained"] > accuracy["untrained"], accuracy
    log_p = numbers["sentence_log_p"]
    assert log_p["original"] > log_p["scrambled"], log_p

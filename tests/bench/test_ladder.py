"""bench/shootout.py --ladder: the quick ladder run as the docs write it (a subprocess from the
repository root); every rung's numbers are the evaluation at that CPU time and the minimum of the
evaluations up to it; epochs are tokens read over corpus tokens; each epoch reads every corpus
window once."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ROWS = {"clm", "llama", "clm_drop0.1_wd0.1", "clm_drop0.3_wd0.5", "mlm", "span", "mdm", "biglearn",
        "biglearn_1stream", "mixture", "mixture_1stream", "near_causal_1stream"}


def test_quick_ladder_reports_every_rung_as_documented(manifest, tmp_path):
    done = subprocess.run([sys.executable, "bench/shootout.py", "--ladder", "--quick", "--manifest", str(manifest),
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "ladder.json").read_text())
    args = record["args"]
    budgets, first = sorted(args["budgets"]), args["first_eval"]
    schedule = sorted({*budgets, *(first * 2 ** (k / 3) for k in range(100) if first * 2 ** (k / 3) < budgets[-1])})
    window = {"hmm": args["length"], "text": json.loads(Path(manifest).read_text())["seq_len"]}
    for data in ("hmm", "text"):
        rows = {r["model"]: r for r in record["rows"] if r["data"] == data}
        assert set(rows) == ROWS
        for rung in budgets:
            assert f"**{data} | {rung:g} CPU s per model" in done.stdout
        for name, row in rows.items():
            assert f"| {name} |" in done.stdout
            assert row["corpus_tokens"] == args["train_windows"] * window[data]
            evaluations = row["evaluations"]
            assert [e["due"] for e in evaluations] == schedule
            for e in evaluations:
                assert e["seconds"] >= e["due"] and e["tokens"] == e["steps"] * args["batch_size"] * window[data]
                assert math.isclose(e["epochs"], e["tokens"] / row["corpus_tokens"])
                for task, value in e["nll"].items():
                    assert (value is None) == (name == "llama" and task != "left_to_right")
                    assert value is None or (math.isfinite(value) and value > 0)
            assert [r["budget"] for r in row["rungs"]] == budgets
            for rung in row["rungs"]:
                upto = [e for e in evaluations if e["due"] <= rung["budget"]]
                assert rung["nll"] == upto[-1]["nll"] and rung["epochs"] == upto[-1]["epochs"]
                for task, best in rung["best"].items():
                    assert best == min(e["nll"][task] for e in upto)
                    assert rung["best_epochs"][task] in [e["epochs"] for e in upto if e["nll"][task] == best]
        goals = [g for g in record["goals"] if g["data"] == data]
        assert {g["model"] for g in goals} == {"biglearn_1stream", "mixture_1stream", "near_causal_1stream"}
        assert all(g["met"] == (g["gap"] < 0 if g["limit"] == 0 else g["gap"] <= g["limit"]) for g in goals)
    assert (tmp_path / "ladder.png").stat().st_size > 10_000
    assert "goals at the largest rung" in done.stdout and f"left_to_right @ {budgets[-1]:g} s" in done.stdout


def test_each_epoch_reads_every_window_once(bench_script):
    ladder = bench_script("ladder")
    rng = np.random.default_rng()
    n_windows, batch_size, length = int(rng.integers(3, 12)), int(rng.integers(1, 7)), 6
    corpus = np.arange(n_windows)[:, None].repeat(length, axis=1)  # window i holds token i
    batches = ladder["epoch_batches"](corpus, ladder["base"].objective_sampler("clm"), batch_size, seed=0)
    epochs = 4
    read = np.concatenate([np.asarray(next(batches).labels)[:, 0]
                           for _ in range(math.ceil(epochs * n_windows / batch_size))])[:epochs * n_windows]
    for epoch in read.reshape(epochs, n_windows):
        assert sorted(epoch) == list(range(n_windows))
    assert len({tuple(epoch) for epoch in read.reshape(epochs, n_windows)}) > 1 or n_windows < 4

"""bench/shootout.py: the quick run prints every row and column with finite numbers; the causal
yardstick scores exactly what transformers' Llama computes; two briefly trained objectives each
win on their own task."""
import json
import math

import numpy as np
import pytest
import torch

from pretrain.model import ModelConfig
from pretrain.objectives import EVAL_TASKS, ObjectiveSampler, eval_split



@pytest.fixture
def shootout(bench_script):
    return bench_script("shootout")


def test_quick_run_prints_every_row_and_column(shootout, manifest, tmp_path, capsys):
    rows = shootout["main"](["--quick", "--manifest", str(manifest), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    names = [c.name for c in shootout["contestants"]("mixture")]
    for data in ("hmm", "text"):
        for budget in ("time", "tokens"):
            header = f"{data} | budget: {budget}"
            assert header in printed
            block = printed.split(header)[1].split("\n\n")[0]
            assert all(task in block for task in EVAL_TASKS)
            assert all(f"\n{name} " in block for name in names), block
        trained = [r for r in rows if r["data"] == data and "unavailable" not in r]
        assert {r["model"] for r in trained} | {r["model"] for r in rows if "unavailable" in r} == set(names)
        for row in trained:
            scorable = ("left_to_right", "suffix") if row["model"] == "llama" else EVAL_TASKS
            for task in EVAL_TASKS:
                value = row["nll"][task]
                assert (value is not None and math.isfinite(value) and value > 0) == (task in scorable), (row, task)
            if data == "hmm":
                assert all(row["exact_nll"][t] > 0 for t in EVAL_TASKS)
    same_tokens = [r for r in rows if r.get("budget") == "tokens" and r["data"] == "hmm"]
    assert all(r["tokens"] >= same_tokens[0]["tokens"] for r in same_tokens)  # at least the first row's budget
    record = json.loads((tmp_path / "shootout.json").read_text())
    assert len(record["rows"]) == len(rows) and record["goals"]
    assert (tmp_path / "shootout.png").stat().st_size > 10_000 and (tmp_path / "curves.png").stat().st_size > 10_000


def test_causal_yardstick_scores_what_llama_computes(shootout):
    """left_to_right log-probs = log_softmax of LlamaForCausalLM's logits on [BOS] + x, over the
    real vocabulary; the suffix task's terms are the tail of the same chain; other splits refused."""
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    vocab, length = 11, 9
    yardstick = shootout["CausalYardstick"](ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2,
                                                         attention_backend="torch")).eval()
    rng = np.random.default_rng()
    x = rng.integers(0, vocab, size=(3, length))
    from pretrain.experiments.synthetic import model_target_log_probs
    left = model_target_log_probs(yardstick, x, [eval_split("left_to_right", length, rng) for _ in x])
    with torch.no_grad():
        ids = torch.cat([torch.full((3, 1), vocab), torch.from_numpy(x)], dim=1)
        logits = yardstick.llama(input_ids=ids).logits[:, :-1, :vocab]
        expected = torch.log_softmax(logits.double(), -1).gather(2, torch.from_numpy(x)[:, :, None])[..., 0]
    np.testing.assert_allclose(np.stack(left), expected.numpy(), atol=1e-5)
    suffix = model_target_log_probs(yardstick, x, [eval_split("suffix", length, rng) for _ in x])
    np.testing.assert_allclose(np.stack(suffix), expected.numpy()[:, length // 2:], atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        model_target_log_probs(yardstick, x, [eval_split("prefix", length, rng) for _ in x])
    with pytest.raises(ValueError, match="causal"):
        model_target_log_probs(yardstick, x, [ObjectiveSampler("mlm")(length, rng) for _ in x])


def test_bad_flags_name_the_flag(shootout, tmp_path, capsys):
    for argv, flag in ((["--models", "gpt"], "--models"), (["--data", "images"], "--data"),
                       (["--seconds", "0"], "--seconds"), (["--manifest", str(tmp_path / "none.json")], "--manifest"),
                       (["--ladder", "--budgets", "10", "0"], "--budgets"), (["--causal-grid", "0.1"], "--causal-grid"),
                       (["--causal-grid", "1.5:0.1"], "--causal-grid"), (["--train-windows", "0"], "--train-windows")):
        with pytest.raises(SystemExit):
            shootout["parse_args"](argv)
        assert flag in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.slow
def test_each_objective_wins_on_its_own_task():
    """clm and mlm trained briefly on the HMM with the shared step: each is closer to exact on
    its own task than the other."""
    from pretrain.experiments.synthetic import HiddenMarkovSource, fit, model_target_log_probs
    source = HiddenMarkovSource.random(seed=1)
    models = {name: fit(source, ObjectiveSampler(name), length=32, steps=300, batch_size=32, seed=0)
              for name in ("clm", "mlm")}
    rng = np.random.default_rng(2)
    x = source.sample(256, 32, rng)
    nll = {}
    for task in ("left_to_right", "mlm"):
        specs = [eval_split(task, 32, rng) for _ in x]
        for name, model in models.items():
            nll[name, task] = -np.concatenate(model_target_log_probs(model, x, specs)).mean()
    assert nll["clm", "left_to_right"] < nll["mlm", "left_to_right"], nll
    assert nll["mlm", "mlm"] < nll["clm", "mlm"], nll

"""Fine-tuning on the Trainer: FT vs big-learn ("Big Learning", fine-tuning), data checks, metrics,
the sweep list, and exact resume after SIGKILL on 2 ranks with ZeRO-2 (slow)."""
import json
from dataclasses import replace
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from pretrain.finetune import FinetuneConfig, FinetuneData, run, summarize
from pretrain.finetune.config import default_trainer
from pretrain.train.composition import to_schema
from pretrain.checkpoint.loading import load_model
from pretrain.infer import LabelLayout, classification_metrics, classify, main as infer_main, read_examples

ROOT = Path(__file__).resolve().parents[3]
WORDS_A = "apple pear plum grape lemon melon cherry mango".split()
WORDS_B = "train plane boat truck bike ship rocket tram".split()


@pytest.fixture(autouse=True, scope="module")
def restore_environment():
    """In-process runs set DS_ACCELERATOR=cpu for DeepSpeed (and, while they run, the launcher
    variables of their one-process group): put the environment back after this module."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def subprocess_env() -> dict:
    """The environment for a fresh run: without the process-group variables that an in-process
    run of this session set (a child would try to join or re-open that group's port)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def write_task(path: Path, n: int, rng, fmt: str, pairs: bool = False):
    """Label 'b' iff the text holds more vehicle words than fruit words (a learnable rule)."""
    rows = []
    for _ in range(n):
        n_a, n_b = rng.integers(0, 6, 2)
        while n_a == n_b:
            n_a, n_b = rng.integers(0, 6, 2)
        words = list(rng.choice(WORDS_A, n_a)) + list(rng.choice(WORDS_B, n_b))
        rng.shuffle(words)
        half = len(words) // 2
        text, pair = (" ".join(words[:half]) or "x", " ".join(words[half:])) if pairs else (" ".join(words), None)
        rows.append({"text": text, **({"text_pair": pair} if pairs else {}), "label": "b" if n_b > n_a else "a"})
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(rows[0])
        path.write_text("\t".join(keys) + "\n" + "".join("\t".join(r[k] for k in keys) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    corpus = directory / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS_A + WORDS_B, 8)) for _ in range(400)))
    train_tokenizer([corpus], directory / "tokenizer",
                    TokenizerConfig(vocab_size=40, n_sentinels=4, byte_fallback=False, num_threads=1))
    return directory / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


def make_config(tmp_path, rng, n_train=64, epochs=1, **overrides):
    write_task(tmp_path / "train.jsonl", n_train, rng, "jsonl", pairs=True)
    write_task(tmp_path / "dev.jsonl", 32, rng, "jsonl", pairs=True)
    trainer = replace(default_trainer(), lr=3e-3, epochs=epochs, seed=int(rng.integers(1000)), progress=False)
    values = dict(data=FinetuneData(train=str(tmp_path / "train.jsonl"), dev=str(tmp_path / "dev.jsonl"), max_len=24,
                                    batch_size=16),
                  model=dict(d_model=32, n_layers=2, n_heads=4, dropout=0.1, attention_backend="torch"),
                  trainer=trainer, out=str(tmp_path / "out"), resume="never")
    return FinetuneConfig(**{**values, **overrides})


def test_biglearn_with_beta_zero_equals_ft_exactly(tmp_path, tokenizer):
    rng = np.random.default_rng()
    ft = run(make_config(tmp_path, np.random.default_rng(1), strategy="ft"), tokenizer)
    seed = make_config(tmp_path, np.random.default_rng(1)).trainer.seed
    big0 = run(make_config(tmp_path, np.random.default_rng(1), strategy="biglearn", beta=0.0), tokenizer)
    assert [h["loss_ft"] for h in ft["history"]] == [h["loss_ft"] for h in big0["history"]]
    assert [h["loss"] for h in ft["history"]] == [h["loss"] for h in big0["history"]]
    assert ft["dev_accuracy"] == big0["dev_accuracy"] and ft["seed"] == seed
    assert "loss_biglearn" not in big0["history"][0]  # beta = 0: the big-learning pass is skipped, not weighted 0
    # ... and a positive beta really trains on the big-learning term (the check above can fail).
    big = run(make_config(tmp_path, np.random.default_rng(1), strategy="biglearn", beta=float(rng.uniform(0.3, 1))),
              tokenizer)
    assert big["history"][0]["loss_ft"] == ft["history"][0]["loss_ft"]  # same start
    assert big["history"][-1]["loss_ft"] != ft["history"][-1]["loss_ft"]
    for h in big["history"]:
        assert abs(h["loss"] - (h["loss_ft"] + big["beta"] * h["loss_biglearn"])) < 1e-5


def test_finetuning_learns_a_simple_rule_and_exports_a_classifier(tmp_path, tokenizer, tokenizer_dir, capsys):
    rng = np.random.default_rng()
    # 256 examples x 6 epochs: with 64 a fresh draw landed below 0.8 now and then (0.78 seen).
    cfg = make_config(tmp_path, rng, n_train=256, strategy="biglearn", beta=0.3, epochs=6, save_model=True)
    result = run(cfg, tokenizer)
    assert result["dev_accuracy"] >= 0.8, result
    model, meta = load_model(Path(cfg.out) / "model", tokenizer=tokenizer)
    layout = LabelLayout(**meta["label_layout"])
    examples = read_examples(cfg.data.dev, layout)
    probs, _ = classify(model, [layout.encode(tokenizer, e.text, e.text_pair) for e in examples], 0,
                        layout.label_token_ids)
    accuracy = np.mean([layout.labels[int(p.argmax())] == e.label for p, e in zip(probs, examples)])
    assert abs(accuracy - result["dev_accuracy"]) < 1e-9
    # The model directory carries its tokenizer: TextModel loads it, and the CLI, given the run
    # directory alone, reads the label layout from the exported metadata and predicts the same.
    from pretrain.infer import TextModel
    assert TextModel.load(Path(cfg.out) / "model").tokenizer.sha256 == tokenizer.sha256
    infer_main(["classify", "--model", cfg.out, "--input", cfg.data.dev, "--device", "cpu"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prediction"] for line in lines[:-1]] == [layout.labels[int(p.argmax())] for p in probs]
    assert abs(lines[-1]["accuracy"] - accuracy) < 1e-9


def test_label_slot_layout_and_tsv_reading(tmp_path, tokenizer):
    rows = write_task(tmp_path / "d.tsv", 5, np.random.default_rng(), "tsv", pairs=True)
    examples = read_examples(tmp_path / "d.tsv", FinetuneData())
    assert [(e.text, e.text_pair, e.label) for e in examples] == [(r["text"], r["text_pair"], r["label"]) for r in rows]
    layout = LabelLayout.from_tokenizer(tokenizer, ["a", "b"], max_len=64)
    sample = layout.encode(tokenizer, "apple boat", "plum", label="b")
    assert sample[0] == tokenizer.sentinel_ids[1] and layout.separator_id == tokenizer.sentinel_ids[2]
    assert list(sample[1:]) == tokenizer.encode("apple boat") + [layout.separator_id] + tokenizer.encode("plum")
    assert len(LabelLayout.from_tokenizer(tokenizer, ["a", "b"], max_len=3).encode(tokenizer, "apple boat plum")) == 3



def test_the_documented_tsv_example_reads_as_documented(tmp_path):
    """docs/capabilities.md's example file (a header row naming the columns, fields separated by
    tabs) is what read_examples reads, and a TSV row with a field missing is refused with its line."""
    section = (ROOT / "docs" / "capabilities.md").read_text().split("## Fine-tuning", 1)[1]
    lines = [line[4:] for line in re.search(r"\n\n((?:    [^\n]*\t[^\n]*\n)+)", section).group(1).splitlines()]
    assert lines[0].split("\t") == ["text", "label"] and len(lines) >= 3
    (tmp_path / "example.tsv").write_text("\n".join(lines) + "\n")
    examples = read_examples(tmp_path / "example.tsv")
    assert [(e.text, e.text_pair, e.label) for e in examples] == [
        (text, None, label) for text, label in (line.split("\t") for line in lines[1:])]
    (tmp_path / "short.tsv").write_text("\n".join(lines) + "\nno label here\n")
    with pytest.raises(ValueError, match=rf"short.tsv:{len(lines) + 1}: missing label field 'label'"):
        read_examples(tmp_path / "short.tsv")


def test_the_defaults_are_those_the_documented_sweep_chose():
    """configs/finetune.yaml, FinetuneConfig's own defaults and docs/capabilities.md agree (the
    defaults before the sweep, lr 4e-5 for 3 epochs, stayed below the majority class there)."""
    from omegaconf import OmegaConf
    yaml = OmegaConf.load(ROOT / "configs" / "finetune.yaml").trainer
    trainer = default_trainer()
    assert (yaml.lr, yaml.epochs) == (trainer.lr, trainer.epochs)
    docs = (ROOT / "docs" / "capabilities.md").read_text()
    assert f"Defaults: `trainer.lr={trainer.lr:g}`, `trainer.epochs={trainer.epochs:g}`" in docs


def test_bad_inputs_name_the_problem(tmp_path, tokenizer):
    rng = np.random.default_rng()
    write_task(tmp_path / "t.jsonl", 4, rng, "jsonl")
    layout = LabelLayout.from_tokenizer(tokenizer, ["a", "b"], 32)
    (tmp_path / "bad.jsonl").write_text('{"text": "apple", "label": "a"}\n{"text": "pear", "label": "zzz"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: unknown label 'zzz'"):
        read_examples(tmp_path / "bad.jsonl", layout)
    (tmp_path / "empty.jsonl").write_text('{"text": "  ", "label": "a"}\n')
    with pytest.raises(ValueError, match=r"empty.jsonl:1: empty"):
        read_examples(tmp_path / "empty.jsonl", FinetuneData())
    with pytest.raises(ValueError, match="sentinel"):
        LabelLayout.from_tokenizer(tokenizer, list("abcd"), 32)
    cfg = make_config(tmp_path, rng)
    (tmp_path / "dev.jsonl").write_text('{"text": "apple", "label": "c"}\n')
    with pytest.raises(ValueError, match="unknown label 'c'"):
        run(cfg, tokenizer)
    with pytest.raises(ValueError, match="beta"):
        FinetuneConfig(strategy="ft", beta=0.5)
    with pytest.raises(ValueError, match="strategy"):
        FinetuneConfig(strategy="lora")
    with pytest.raises(ValueError, match=r"data.trian"):
        to_schema({"data": {"trian": "x"}}, FinetuneConfig)
    with pytest.raises(ValueError, match="segments"):
        to_schema({"objective": {"name": "biglearn", "segments": []}}, FinetuneConfig)


def test_metrics_match_sklearn_and_summary_table():
    from sklearn.metrics import accuracy_score, f1_score
    rng = np.random.default_rng()
    for n_labels in (2, 4):
        gold, predicted = rng.integers(0, n_labels, 50), rng.integers(0, n_labels, 50)
        metrics = classification_metrics(predicted, gold, n_labels)
        assert abs(metrics["accuracy"] - accuracy_score(gold, predicted)) < 1e-12
        expected = f1_score(gold, predicted, average="binary" if n_labels == 2 else "macro")
        assert abs(metrics["f1"] - expected) < 1e-12
    results = [{"beta": b, "dev_accuracy": a, "dev_f1": a} for b, a in
               [(0, 0.5), (0, 0.7), (0, 0.6), (0.2, 0.8), (0.4, 0.9)]]
    table = summarize(results)
    assert "| FT (beta = 0) | 3 | 70.00 / 70.00 | 60.00 / 10.00 |" in table
    assert "| big-learn (beta > 0) | 2 | 90.00 / 90.00 | 85.00 / 5.00 |" in table


def test_sweep_list_runs_each_entry_and_writes_the_summary(tmp_path, tokenizer_dir):
    """The command line: compose API overrides, one run per `sweep` entry, summary.md in `out`."""
    rng = np.random.default_rng()
    write_task(tmp_path / "train.tsv", 32, rng, "tsv")
    write_task(tmp_path / "dev.tsv", 16, rng, "tsv")
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "pretrain.finetune", f"data.train={tmp_path / 'train.tsv'}",
               f"data.dev={tmp_path / 'dev.tsv'}", f"tokenizer={tokenizer_dir}", "data.max_len=16",
               "+model.d_model=16", "+model.n_layers=1", "+model.n_heads=2", "+model.attention_backend=torch",
               "trainer.lr=1e-3", "trainer.epochs=1", "trainer.progress=false", f"out={out}",
               "sweep=[{beta: 0.0}, {beta: 0.5}]"]
    env = subprocess_env()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("run_*/result.json"))]
    assert [r["beta"] for r in results] == [0.0, 0.5]
    summary = (out / "summary.md").read_text()
    assert "FT (beta = 0) | 1 |" in summary and "big-learn (beta > 0) | 1 |" in summary
    bad = subprocess.run([c for c in command if not c.startswith(("trainer.lr=", "sweep="))] + ["trainer.lr=-1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr and "trainer.lr" in bad.stderr, bad.stderr[-2000:]


def test_a_missing_file_exits_2_in_one_line_and_leaves_no_out_directory(tmp_path, tokenizer_dir):
    write_task(tmp_path / "dev.tsv", 16, np.random.default_rng(), "tsv")
    out = tmp_path / "new" / "out"
    command = [sys.executable, "-m", "pretrain.finetune", f"data.train={tmp_path / 'missing.tsv'}",
               f"data.dev={tmp_path / 'dev.tsv'}", f"tokenizer={tokenizer_dir}", f"out={out}"]
    done = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (f"python -m pretrain.finetune: error: data.train: "
                                                    f"{tmp_path / 'missing.tsv'} does not exist")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.dist
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tokenizer_dir):
    """Fine-tuning on the Trainer, 2 CPU ranks, ZeRO-2, fp32, deterministic: kill -9 every process
    after the step-4 checkpoint, rerun the same command (resume=auto), and every step's losses,
    learning rate and consumed-sample digest equal those of an uninterrupted run."""
    import signal
    import socket
    import time

    import psutil  # a DeepSpeed dependency: finds torchrun's workers, which run in their own sessions

    rng = np.random.default_rng(3)
    write_task(tmp_path / "train.jsonl", 96, rng, "jsonl", pairs=True)
    write_task(tmp_path / "dev.jsonl", 16, rng, "jsonl", pairs=True)

    def command(out):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "pretrain.finetune", f"data.train={tmp_path / 'train.jsonl'}", f"data.dev={tmp_path / 'dev.jsonl'}",
                f"tokenizer={tokenizer_dir}", "data.max_len=24", "+model.d_model=32", "+model.n_layers=2",
                "+model.n_heads=4", "+model.dropout=0.1", "+model.attention_backend=torch", "trainer.lr=3e-3", "trainer.epochs=4",
                "data.batch_size=4", "beta=0.5", "trainer.save_every=4", "trainer.keep_last=10", "trainer.deterministic=true", "trainer.progress=false",
                "deepspeed.zero_stage=2", "deepspeed.accelerator=cpu", f"out={out}"]

    def records(out) -> dict[int, dict]:
        path = out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return {r["step"]: r for r in map(json.loads, filter(str.strip, lines)) if r["kind"] == "train"}

    env = subprocess_env()
    reference = subprocess.run(command(tmp_path / "reference"), cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "interrupted"
    process = subprocess.Popen(command(out), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while max(records(out), default=0) < 6 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    victims = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    for pid in victims:  # both ranks and the launcher, no clean-up
        os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)
    killed_at = max(records(out))
    expected = records(tmp_path / "reference")
    assert 6 <= killed_at < max(expected)
    resumed = subprocess.run(command(out), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    got = records(out)
    assert sorted(got) == sorted(expected) == list(range(1, max(expected) + 1))
    for step in expected:
        for key in ("loss", "loss_ft", "loss_biglearn", "lr", "data_digest"):
            assert got[step][key] == expected[step][key], (step, key, got[step][key], expected[step][key])
    result = json.loads((out / "result.json").read_text())
    assert result["dev_accuracy"] == json.loads((tmp_path / "reference" / "result.json").read_text())["dev_accuracy"]

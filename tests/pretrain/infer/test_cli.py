"""`biglearn score / complete / classify`: outputs against the API, and one-line errors for bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from data_pipeline.errors import UserError
from pretrain.checkpoint.export import export_model
from pretrain.checkpoint.loading import load_model
from pretrain.infer import classify, complete, main, parse_gaps, score
from pretrain.model import BigLearner, ModelConfig

VOCAB = 29



def test_bad_inputs_give_clear_errors(tmp_path, tiny_model):
    rng = np.random.default_rng()
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        complete(model, rng.integers(0, VOCAB, (1, 70)), [[0]], [[5, 6]])
    with pytest.raises(ValueError, match="strategy"):
        complete(model, rng.integers(0, VOCAB, (1, 8)), [[0]], [[5]], strategy="best")
    with pytest.raises(ValueError, match="disjoint"):
        complete(model, rng.integers(0, VOCAB, (1, 8)), [[0, 5]], [[5]])
    with pytest.raises(ValueError, match="label_token_ids"):
        classify(model, [rng.integers(0, VOCAB, 5)], 0, [VOCAB + 1, 2])
    export_model(model.float(), tmp_path / "m", {"tokenizer_sha256": "aaaa"})
    with pytest.raises(ValueError, match="tokenizer sha256 aaaa"):
        load_model(tmp_path / "m", tokenizer_sha256="bbbb")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def user_error(capsys, argv) -> str:
    """The CLI's message for a user mistake: one line on stderr, exit status 2."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m pretrain.infer: error: ") and err.count("\n") == 1, err
    return err


def test_cli_score_and_orders(tmp_path, capsys, tiny_model):
    rng = np.random.default_rng()
    model = tiny_model().float()
    export_model(model, tmp_path)
    ids = rng.integers(0, VOCAB, 9)
    main(["score", "--model", str(tmp_path), "--ids", " ".join(map(str, ids)), "--source", "0-2",
          "--target", "8,3,5", "--orders", "3", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    expected = float(score(model, ids, [0, 1, 2], [8, 3, 5]))
    assert abs(out["log_prob"] - expected) < 1e-4 and len(out["per_order"]) == 3
    assert "empty" in user_error(capsys, ["score", "--model", str(tmp_path), "--ids", " ", "--device", "cpu"])


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    words = "the a cat dog sat lay on under mat rug".split()
    (directory / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(300)))
    train_tokenizer([directory / "corpus.txt"], directory / "tok",
                    TokenizerConfig(vocab_size=30, n_sentinels=2, byte_fallback=False, num_threads=1))
    tokenizer = Tokenizer.load(directory / "tok")
    model = BigLearner(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                   max_seq_len=24, attention_backend="torch"))
    export_model(model, directory / "model", {"tokenizer_sha256": tokenizer.sha256})
    export_model(model, directory / "other", {"tokenizer_sha256": "0" * 64})
    return directory, tokenizer


def test_cli_complete_fills_only_the_gaps(text_model, capsys):
    directory, tokenizer = text_model
    base = ["--model", str(directory / "model"), "--tokenizer", str(directory / "tok"), "--device", "cpu"]
    text = "the [___] sat on the [___:3]"
    main(["complete", *base, "--text", text, "--num-samples", "3", "--strategy", "confident", "--top-k", "5"])
    ids, gaps = parse_gaps(text, tokenizer.encode, 2, tokenizer.pad_id)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert line["gaps"] == gaps and len(line["ids"]) == len(ids)
        kept = [p for p in range(len(ids)) if p not in gaps]
        assert [line["ids"][p] for p in kept] == [ids[p] for p in kept]
    main(["complete", *base, "--text", "the cat", "--continue", "4", "--temperature", "0"])
    line = json.loads(capsys.readouterr().out)
    n_prompt = len(tokenizer.encode("the cat"))
    assert line["gaps"] == list(range(n_prompt, n_prompt + 4)) and line["ids"][:n_prompt] == tokenizer.encode("the cat")


@pytest.mark.parametrize("options", [["--strategy", "group_parallel", "--group-size", "2", "--schedule", "random"],
                                     ["--strategy", "remask_random", "--steps", "3"],
                                     ["--strategy", "block", "--block-size", "2", "--steps", "2"],
                                     ["--strategy", "speculative", "--draft", "2", "--schedule", "random"],
                                     ["--strategy", "speculative", "--adaptive-draft", "--top-p", "0.9"]])
def test_cli_parallel_and_masked_diffusion_strategies_fill_only_the_gaps(text_model, capsys, options):
    directory, tokenizer = text_model
    base = ["--model", str(directory / "model"), "--tokenizer", str(directory / "tok"), "--device", "cpu"]
    assert main(["complete", *base, "--text", "the [___:4] sat", "--num-samples", "2", *options]) == 0
    ids, gaps = parse_gaps("the [___:4] sat", tokenizer.encode, 2, tokenizer.pad_id)
    for line in map(json.loads, capsys.readouterr().out.splitlines()):
        assert line["gaps"] == gaps and [t for p, t in enumerate(line["ids"]) if p not in gaps] == \
            [t for p, t in enumerate(ids) if p not in gaps]


def test_speculative_complete_as_typed_is_greedy_left_to_right(text_model, capsys):
    """`python -m pretrain complete --strategy speculative --draft 4` from the repository root, as a
    user types it: with --temperature 0 the tokens of left-to-right decoding, and the passes it took."""
    directory, _ = text_model
    options = ["complete", "--model", str(directory / "model"), "--tokenizer", str(directory / "tok"), "--device",
               "cpu", "--text", "the cat [___:6] on the mat", "--temperature", "0"]
    typed = subprocess.run([sys.executable, "-m", "pretrain", *options, "--strategy", "speculative", "--draft", "4"],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[3], timeout=300)
    assert typed.returncode == 0, typed.stderr
    assert main(options) == 0
    fast, slow = json.loads(typed.stdout), json.loads(capsys.readouterr().out)
    assert fast["ids"] == slow["ids"] and slow["passes"] == 6 and 1 <= fast["passes"] <= 6
    assert 0 <= fast["accepted"] <= fast["drafted"]


def test_cli_sampler_flags_out_of_range_name_the_flag(text_model, capsys):
    directory, _ = text_model
    base = ["complete", "--model", str(directory / "model"), "--tokenizer", str(directory / "tok"), "--device", "cpu",
            "--text", "the [___:4] sat"]
    assert "--steps must be an integer >= 1" in user_error(capsys, [*base, "--strategy", "remask_random", "--steps", "0"])
    assert "--steps 5 exceeds the 4 masked tokens" in user_error(
        capsys, [*base, "--strategy", "remask_low_confidence", "--steps", "5"])
    assert "--block-size 3 does not divide the 4 tokens" in user_error(
        capsys, [*base, "--strategy", "block", "--block-size", "3", "--steps", "2"])
    assert "--group-size" in user_error(capsys, [*base, "--strategy", "group_parallel", "--group-size", "0"])
    # Without --steps too, a block size is checked (it used to reach numpy's reshape error).
    assert "--block-size 3 does not divide the 4 tokens" in user_error(capsys, [*base, "--strategy", "block",
                                                                                  "--block-size", "3"])
    assert "--temperature must be >= 0" in user_error(capsys, [*base, "--temperature", "-1"])
    assert "--top-p must lie in (0, 1]" in user_error(capsys, [*base, "--temperature", "0", "--top-p", "0"])
    assert "--num-samples must be >= 1" in user_error(capsys, [*base, "--num-samples", "0"])
    speculative = [*base, "--strategy", "speculative"]
    assert "--draft must be an integer >= 1" in user_error(capsys, [*speculative, "--draft", "0"])
    assert "decodes a fixed order: --schedule must be one of" in user_error(
        capsys, [*speculative, "--schedule", "confidence"])
    assert "--steps and --block-size belong to the remasking" in user_error(capsys, [*speculative, "--steps", "2"])
    assert "--no-cache" in user_error(capsys, [*speculative, "--no-cache"])
    assert "apply to --strategy speculative" in user_error(capsys, [*base, "--draft", "2"])


def test_cli_errors_name_the_problem(text_model, capsys):
    directory, _ = text_model
    base = ["--model", str(directory / "model"), "--tokenizer", str(directory / "tok"), "--device", "cpu"]
    assert "max_seq_len=24" in user_error(capsys, ["complete", *base, "--text", "the [___:30] sat"])
    assert "nothing to complete" in user_error(capsys, ["complete", *base, "--text", "the cat"])
    assert "empty" in user_error(capsys, ["score", *base, "--text", ""])
    other = ["score", "--model", str(directory / "other"), "--tokenizer", str(directory / "tok"), "--text", "the cat"]
    assert "tokenizer sha256 0000" in user_error(capsys, other)
    assert "label_layout" in user_error(capsys, ["classify", *base, "--input", str(directory / "corpus.txt")])
    assert "tok2 not found" in user_error(
        capsys, ["score", "--model", str(directory / "model"), "--tokenizer", str(directory / "tok2"), "--text", "a"])
    # A truncated download names the file; --debug shows the traceback instead of the one line.
    broken = directory / "truncated"
    shutil.copytree(directory / "model", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert f"{weights}: unreadable safetensors" in user_error(capsys, ["score", "--model", str(broken), "--ids", "1 2"])
    with pytest.raises(UserError, match="unreadable safetensors"):
        main(["score", "--model", str(broken), "--ids", "1 2", "--debug"])

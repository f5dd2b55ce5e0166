import hashlib
import json
import os
import time

import numpy as np
import pytest

from data_pipeline.sources import SourceConfig
from data_pipeline.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_demo):
    return Tokenizer.load(tiny_demo.parent / "tokenizer")


def test_output_dir_has_model_info_and_hash(tiny_demo, tokenizer):
    directory = tiny_demo.parent / "tokenizer"
    info = json.loads((directory / "biglearn_tokenizer.json").read_text())
    assert info["model_sha256"] == hashlib.sha256((directory / "tokenizer.model").read_bytes()).hexdigest()
    assert info["sha256"] == tokenizer.sha256 != info["model_sha256"]  # the identity: what it maps
    assert (info["pad_id"], info["unk_id"], info["bos_id"], info["eos_id"]) == (0, 1, 2, 3)
    assert info["vocab_size"] == 400 == tokenizer.processor.get_piece_size()
    assert info["sentinel_ids"] == list(range(4, 4 + 16))
    assert [tokenizer.processor.id_to_piece(i) for i in info["sentinel_ids"][:2]] == ["<sentinel_0>", "<sentinel_1>"]


def test_encode_decode_batches(tokenizer):
    texts = ["Return the value of the attribute.", "A <sentinel_0> in text is plain text.", "Ünïcode ☃ too"]
    ids = tokenizer.encode_batch(texts)
    assert ids == [tokenizer.encode(t) for t in texts]
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, *tokenizer.sentinel_ids}
    assert not specials & {i for seq in ids for i in seq}  # text never becomes a special token
    assert tokenizer.decode_batch(ids) == texts  # byte fallback: nothing lost, even unseen characters
    joined = ids[0] + [tokenizer.eos_id] + ids[1] + [tokenizer.pad_id] * 3
    assert tokenizer.decode(joined) == texts[0] + "\n" + texts[1]


def test_tampered_model_is_rejected(tmp_path, tiny_demo):
    directory = tiny_demo.parent / "tokenizer"
    for name in ("tokenizer.model", "biglearn_tokenizer.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    with open(tmp_path / "tokenizer.model", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="sha256"):
        Tokenizer.load(tmp_path)


def test_bpe_with_sentinels_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "c.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "token", "window", "shard", "reader"]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)))
    tok = train_tokenizer([corpus], tmp_path / "tok", TokenizerConfig(
        vocab_size=300, model_type="bpe", n_sentinels=3, num_threads=1))
    assert tok.info["model_type"] == "bpe" and tok.sentinel_ids == [4, 5, 6]
    assert tok.decode(tok.encode("gamma window")) == "gamma window"


@pytest.mark.parametrize("content, message", [
    (b"", "no usable text"),
    (os.urandom(4096) + b"\xff\xfe", "not text"),
    ("caf\xe9 cr\xe8me\n".encode("latin-1") * 50, "non utf8"),
    (b"only one short line here\n", "sentencepiece could not train"),
])
def test_unusable_corpora_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        train_tokenizer([path], tmp_path / "out", TokenizerConfig(vocab_size=400, num_threads=1))
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def test_config_is_validated():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(ValueError, match="model_type"):
        TokenizerConfig(model_type="wordpiece")


def _reference_cut(line: str, limit: int) -> list[str]:
    """Definition of the cutting rule: the longest prefix (of at most `limit` characters) that ends
    before a space, else `limit` characters; then the rest, without its leading whitespace."""
    line = line.strip()
    if len(line) <= limit:
        return [line] if line else []
    cut = line.rfind(" ", 0, limit)
    cut = cut if cut > 0 else limit
    return [line[:cut]] + _reference_cut(line[cut:], limit)


def test_long_lines_are_cut_at_spaces_like_the_reference():
    # The cutter walks one index through each line (each character is looked at a bounded number
    # of times: linear), where the old one re-sliced the remainder after every cut (quadratic);
    # the slow test below runs a 50 MB line through the whole tokenizer.
    from data_pipeline.tokenizer import _MAX_LINE_CHARS, _training_lines
    rng = np.random.default_rng()
    for _ in range(200):
        parts = [rng.choice([" ", "\t", "  ", "\n", "w" * int(rng.integers(1, 3 * _MAX_LINE_CHARS)), "ab cd"])
                 for _ in range(int(rng.integers(0, 40)))]
        text = "".join(parts)
        expected = [p for line in text.splitlines() for p in _reference_cut(line, _MAX_LINE_CHARS)]
        assert list(_training_lines(text)) == expected


@pytest.mark.slow
def test_a_50_mb_single_line_trains_a_tokenizer(tmp_path):
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "token", "window", "shard", "reader", "epoch"])
    line = " ".join(rng.choice(words, 9_000_000))[:50_000_000]
    (tmp_path / "one_line.jsonl").write_text(json.dumps({"text": line}) + "\n")
    # Every line is cut (the part that was quadratic); sentencepiece trains on a sample of them.
    tok = train_tokenizer([tmp_path / "one_line.jsonl"], tmp_path / "tok",
                          TokenizerConfig(vocab_size=300, input_sentence_size=5000, num_threads=1))
    assert tok.info["training"]["lines_seen"] >= len(line) // 2000
    assert tok.decode(tok.encode("gamma window")) == "gamma window"


def test_outputs_honour_the_umask(tmp_path, tiny_demo):
    from data_pipeline import build_shards
    from data_pipeline.shards import ShardConfig
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(50)))
    previous = os.umask(0o027)
    try:
        train_tokenizer([tmp_path / "c.jsonl", "stdlib"], tmp_path / "tok",
                        TokenizerConfig(vocab_size=400, num_threads=1), SourceConfig(stdlib_limit=20))
        build_shards([tmp_path / "c.jsonl"], tmp_path / "tok", tmp_path / "data",
                     ShardConfig(seq_len=16, num_workers=0), progress=False)
    finally:
        os.umask(previous)
    written = [p for p in (tmp_path / "tok").iterdir()] + [p for p in (tmp_path / "data").iterdir()]
    assert {p.name for p in written} >= {"tokenizer.model", "biglearn_tokenizer.json", "manifest.json", "train-000000.tar",
                                         "train-000000.info.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o640" for p in written}


def _corpus(path, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "token", "window", "shard", "reader", "écrire", "naïve"]
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))
    return path


def test_two_builds_of_the_same_input_are_byte_identical(tmp_path):
    """Same inputs, seed and threads, two build directories: the same bytes and the same sha256."""
    corpus = _corpus(tmp_path / "corpus.txt")
    config = TokenizerConfig(vocab_size=288, n_sentinels=2, num_threads=1)
    first = train_tokenizer([corpus], tmp_path / "a", config)
    second = train_tokenizer([corpus], tmp_path / "deeper" / "b", config)
    for name in ("tokenizer.model", "biglearn_tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "deeper" / "b" / name).read_bytes(), name
    assert first.sha256 == second.sha256 == Tokenizer.load(tmp_path / "a").sha256
    assert str(tmp_path).encode() not in (tmp_path / "a" / "tokenizer.model").read_bytes()
    other = train_tokenizer([corpus], tmp_path / "c", TokenizerConfig(vocab_size=292, n_sentinels=2, num_threads=1))
    assert other.sha256 != first.sha256


def test_identity_is_what_the_tokenizer_maps_not_the_file(tmp_path, tiny_demo):
    """The same mapping read from other files (a directory written before identities, whose
    metadata holds the model file's hash; the bare sentencepiece file) has the same sha256, and
    the file hash that old records hold is still accepted."""
    directory = tiny_demo.parent / "tokenizer"
    ours = Tokenizer.load(directory)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "tokenizer.model").write_bytes((directory / "tokenizer.model").read_bytes())
    info = json.loads((directory / "biglearn_tokenizer.json").read_text())
    info["sha256"] = info.pop("model_sha256")  # what files written before identities hold
    (legacy / "biglearn_tokenizer.json").write_text(json.dumps(info))
    old = Tokenizer.load(legacy)
    assert old.sha256 == ours.sha256 and old.file_sha256 == info["sha256"]
    assert ours.matches(ours.sha256) and ours.matches(info["sha256"]) and not ours.matches("0" * 64)
    plain = Tokenizer.load(directory / "tokenizer.model")  # the bare sentencepiece file: same mapping
    assert plain.kind == "sentencepiece" and plain.sha256 == ours.sha256


def test_training_reports_every_5_s_and_the_command_ends_with_a_summary(tmp_path, monkeypatch, capsys):
    import data_pipeline.progress as progress_module
    from data_pipeline.__main__ import main

    monkeypatch.setattr(progress_module, "EVERY_S", 0.01)
    # sentencepiece trains inside C++ holding the GIL, and on an idle machine in under 10 ms: the
    # heartbeat thread gets its turn only if the call lasts, so it lasts 0.1 s more, in Python.
    import sentencepiece as spm
    train = spm.SentencePieceTrainer.train

    def slow_train(*args, **kwargs):
        time.sleep(0.1)
        return train(*args, **kwargs)

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", slow_train)
    corpus = _corpus(tmp_path / "corpus.txt")
    assert main(["tokenizer", "--input", str(corpus), "--output", str(tmp_path / "tok"), "--vocab-size", "288",
                 "--sentinels", "2", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "training a 288-piece unigram model on 400 lines" in captured.err
    assert "sentencepiece training: " in captured.err  # the heartbeat
    out = captured.out.splitlines()
    assert out[0] == f"tokenizer: {tmp_path / 'tok' / 'tokenizer.model'}, {tmp_path / 'tok' / 'biglearn_tokenizer.json'}"
    assert "288 pieces (unigram): pad 0, unk 1, bos 2, eos 3, 2 sentinels (ids 4-5)" in out[1]
    assert out[2].endswith(f"sha256 {Tokenizer.load(tmp_path / 'tok').sha256}")
    assert out[3].startswith("sources: 1 documents") and len(out) <= 6 and "{" not in captured.out

import hashlib
import json
import os

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
    assert info["sha256"] == hashlib.sha256((directory / "tokenizer.model").read_bytes()).hexdigest()
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
    (os.urandom(4096) + b"\xff\xfe", "non utf8"),
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

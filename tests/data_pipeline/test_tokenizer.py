import hashlib
import json
import os

import numpy as np
import pytest

from data_pipeline.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_demo):
    return Tokenizer.load(tiny_demo.parent / "tokenizer")


def test_output_dir_has_model_info_and_hash(tiny_demo, tokenizer):
    directory = tiny_demo.parent / "tokenizer"
    info = json.loads((directory / "tokenizer.json").read_text())
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
    for name in ("tokenizer.model", "tokenizer.json"):
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

"""Existing tokenizers: a plain sentencepiece .model and a Hugging Face tokenizer.json build shards
that decode back to the source text; our metadata file's old name still loads."""
import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from data_pipeline import build_shards, load_manifest
from data_pipeline.inspection import inspect_dataset
from data_pipeline.shards import ShardConfig
from data_pipeline.shard_format import read_shard, token_dtype
from data_pipeline.sources import SourceConfig
from data_pipeline.tokenizer import Tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "token", "window", "shard", "reader", "Ünïcode", "☃", "x=1;", "  "]


@pytest.fixture(scope="module")
def documents():
    rng = np.random.default_rng(7)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 40)))).strip() for _ in range(120)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return path


def plain_sentencepiece(directory, corpus_lines):
    """A Llama-style sentencepiece model: unk 0, bos 1, eos 2, no pad, byte fallback; no info file."""
    (directory / "lines.txt").write_text("\n".join(corpus_lines))
    spm.SentencePieceTrainer.train(input=str(directory / "lines.txt"), model_prefix=str(directory / "llama"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   remove_extra_whitespaces=False)
    return directory / "llama.model"


def hf_byte_level(directory, corpus_lines):
    """A GPT-2-style byte-level BPE tokenizer.json trained with the tokenizers library."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus_lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def decoded_documents(manifest_path) -> list[str]:
    manifest = load_manifest(manifest_path)
    tokenizer = Tokenizer.load(manifest_path.parent)
    dtype = token_dtype(manifest["vocab_size"])
    tokens = [t for entry in manifest["shards"]
              for sample in read_shard(manifest_path.parent / entry["path"], dtype) for t in sample.tokens.tolist()]
    return tokenizer.decode(tokens).split("\n")[:-1]  # each document ends with eos


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_shards_from_an_existing_tokenizer_decode_to_the_source(tmp_path, documents, corpus, kind):
    make = plain_sentencepiece if kind == "sentencepiece" else hf_byte_level
    path = make(tmp_path, documents)
    tokenizer = Tokenizer.load(path)
    assert tokenizer.kind == kind and tokenizer.eos_id == (2 if kind == "sentencepiece" else 1)
    manifest_path = build_shards([corpus], path, tmp_path / "ds", ShardConfig(seq_len=32, val_fraction=0.0,
                                                                              num_workers=0), SourceConfig(),
                                 progress=False)
    assert decoded_documents(manifest_path) == documents
    manifest = load_manifest(manifest_path)
    assert manifest["tokenizer"]["kind"] == kind and manifest["tokenizer"]["sha256"] == tokenizer.sha256
    assert Tokenizer.load(tmp_path / "ds").sha256 == tokenizer.sha256  # the dataset carries it
    assert inspect_dataset(manifest_path)["ok"]


def test_tokenizer_json_beside_a_config_takes_its_special_tokens(tmp_path, documents):
    hf_byte_level(tmp_path, documents)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}, "bos_token": "<s>"}))
    tokenizer = Tokenizer.load(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 2)


def test_unusable_tokenizers_fail_with_the_file_named(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model is not a sentencepiece model"):
        Tokenizer.load(tmp_path / "bad.model")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json is not a Hugging Face tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        Tokenizer.load(tmp_path / "empty")


def test_old_metadata_name_still_loads(tmp_path, tiny_demo):
    ours = Tokenizer.load(tiny_demo.parent / "tokenizer")
    shutil.copyfile(tiny_demo.parent / "tokenizer" / "tokenizer.model", tmp_path / "tokenizer.model")
    shutil.copyfile(tiny_demo.parent / "tokenizer" / "biglearn_tokenizer.json", tmp_path / "tokenizer.json")
    old = Tokenizer.load(tmp_path)
    assert old.kind == "biglearn" and old.sha256 == ours.sha256 and old.sentinel_ids == ours.sentinel_ids

"""Fixtures shared by the launch tests."""

import hashlib
import json
import os

import pytest

from data_pipeline.shards import FORMAT, FORMAT_VERSION


@pytest.fixture
def dataset(tmp_path):
    """manifest.json with three random shards and the sha256 of a random tokenizer.model."""
    shards_dir, tok_dir = tmp_path / "shards", tmp_path / "tokenizer"
    shards_dir.mkdir()
    tok_dir.mkdir()
    entries = []
    for i in range(3):
        data = os.urandom(1000 + 37 * i)
        (shards_dir / f"shard-{i:06d}.tar").write_bytes(data)
        entries.append({"path": f"shard-{i:06d}.tar", "sha256": hashlib.sha256(data).hexdigest(),
                        "bytes": len(data)})
    tok = os.urandom(512)
    (tok_dir / "tokenizer.model").write_bytes(tok)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "seq_len": 8, "pad_id": 0, "vocab_size": 16,
                "token_dtype": "uint16", "shards": entries, "tokenizer": {"sha256": hashlib.sha256(tok).hexdigest()}}
    (shards_dir / "manifest.json").write_text(json.dumps(manifest))
    return shards_dir, tok_dir, tmp_path / "out"

"""Fixtures shared by the launch tests."""

import hashlib
import json
import os

import numpy as np
import pytest

from data_pipeline.manifest import FORMAT, FORMAT_VERSION
from data_pipeline.shard_format import write_shard


@pytest.fixture
def dataset(tmp_path):
    """manifest.json with three shards of random 8-token windows (ids < 16) and the sha256 of a
    random tokenizer.model."""
    shards_dir, tok_dir = tmp_path / "shards", tmp_path / "tokenizer"
    shards_dir.mkdir()
    tok_dir.mkdir()
    entries, rng = [], np.random.default_rng()
    for i in range(3):
        windows = [rng.integers(0, 16, 8) for _ in range(5 + i)]
        info = write_shard(shards_dir / f"shard-{i:06d}.tar", f"shard-{i:06d}", windows, np.dtype("<u2"))
        entries.append({"path": f"shard-{i:06d}.tar", **{k: info[k] for k in ("sha256", "bytes", "samples")}})
    tok = os.urandom(512)
    (tok_dir / "tokenizer.model").write_bytes(tok)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "seq_len": 8, "pad_id": 0, "vocab_size": 16,
                "token_dtype": "uint16", "shards": entries, "tokenizer": {"sha256": hashlib.sha256(tok).hexdigest()}}
    (shards_dir / "manifest.json").write_text(json.dumps(manifest))
    return shards_dir, tok_dir, tmp_path / "out"

import pytest

from data_pipeline import build_demo


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small real dataset: docstrings of the first 60 stdlib modules, vocab 400, windows of 64."""
    out = tmp_path_factory.mktemp("demo")
    manifest = build_demo(out, vocab_size=400, seq_len=64, stdlib_limit=60, shard_size_mb=0.02,
                          val_fraction=0.1, num_workers=0, progress=False)
    return manifest

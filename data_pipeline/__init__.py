"""Raw text -> sentencepiece tokenizer -> token windows in webdataset shards + manifest.json.

Never imports torch (docs/design.md, "Package map"): the shards are read by ``pretrain.data.BatchStream``.
"""
from __future__ import annotations

from pathlib import Path

from .manifest import MANIFEST, load_manifest, shard_file
from .shards import ShardConfig, build_shards
from .sources import STDLIB, SourceConfig, SourceStats, iter_documents
from .tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

__all__ = ["build_demo", "build_shards", "train_tokenizer", "iter_documents", "load_manifest",
           "ShardConfig", "SourceConfig", "SourceStats", "Tokenizer", "TokenizerConfig", "STDLIB"]


def _manifest_is_current(path: Path, config: ShardConfig, source: SourceConfig, tokenizer: Tokenizer) -> bool:
    try:
        manifest = load_manifest(path)
    except ValueError:
        return False
    build = manifest["build"]
    recorded_source = {**SourceConfig().__dict__, **build["source"]}  # keys added since it was written: defaults
    same = (tokenizer.matches(manifest["tokenizer"]["sha256"]) and recorded_source == source.__dict__
            and all(build[k] == v for k, v in config.__dict__.items() if k != "num_workers"))
    return same and all(shard_file(manifest, s).is_file() and shard_file(manifest, s).stat().st_size == s["bytes"]
                        for s in manifest["shards"])


def build_demo(output_dir, vocab_size: int = 8000, seq_len: int = 512, val_fraction: float = 0.05,
               shard_size_mb: float = 0.125, mode: str = "concat", num_workers: int | None = None,
               stdlib_limit: int | None = None, progress: bool = True) -> Path:
    """Tokenizer + shards from the built-in corpus (standard-library docstrings) in `output_dir`.

    Work already done with the same settings is reused. Returns the path of manifest.json."""
    output_dir = Path(output_dir)
    source = SourceConfig(stdlib_limit=stdlib_limit)
    tokenizer_dir = output_dir / "tokenizer"
    tokenizer_config = TokenizerConfig(vocab_size=vocab_size)
    try:
        tokenizer = Tokenizer.load(tokenizer_dir)
        info = tokenizer.info
        wanted = {k: v for k, v in tokenizer_config.__dict__.items() if k != "num_threads"}
        current = all(info["training"].get(k) == v for k, v in wanted.items())
        current = current and info["training"]["sources"]["files"] == _stdlib_file_count(stdlib_limit)
        tokenizer = tokenizer if current else None
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    if tokenizer is None:
        tokenizer = train_tokenizer([STDLIB], tokenizer_dir, tokenizer_config, source, progress=progress)
    shard_config = ShardConfig(seq_len=seq_len, mode=mode, val_fraction=val_fraction, shard_size_mb=shard_size_mb)
    if num_workers is not None:
        shard_config.num_workers = num_workers
    manifest = output_dir / MANIFEST
    if _manifest_is_current(manifest, shard_config, source, tokenizer):
        return manifest
    return build_shards([STDLIB], tokenizer_dir, output_dir, shard_config, source, progress=progress)


def _stdlib_file_count(limit: int | None) -> int:
    from .sources import stdlib_files
    n = len(stdlib_files())
    return n if limit is None else min(n, limit)

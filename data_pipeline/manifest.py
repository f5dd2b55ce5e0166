"""The manifest of a token dataset (manifest.json, written last by the shard builder): format,
window length, token dtype, vocabulary, the shards with their sizes and checksums, and the
tokenizer the dataset carries (docs/data.md). `load_manifest` is the one reader; training,
evaluation, inspection and preflight all read a dataset through it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import contained

FORMAT = "biglearn-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_SEQ_LEN = 1 << 24  # no window is longer: a larger seq_len in a manifest is damage, not data


def _check_fields(path: Path, manifest: dict) -> None:
    """ValueError naming the first manifest field of the wrong kind or out of range."""
    def count(value, low=0):
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if not count(manifest["seq_len"], 2) or manifest["seq_len"] > MAX_SEQ_LEN:
        raise UserError(f"{path}: field 'seq_len' must be an integer in [2, {MAX_SEQ_LEN}]; got {manifest['seq_len']!r}")
    if not count(manifest["vocab_size"], 1) or manifest["vocab_size"] > 1 << 32:
        raise UserError(f"{path}: field 'vocab_size' must be an integer in [1, 2**32]; got {manifest['vocab_size']!r}")
    if not count(manifest["pad_id"]) or manifest["pad_id"] >= manifest["vocab_size"]:
        raise UserError(f"{path}: field 'pad_id' must be a token id below vocab_size; got {manifest['pad_id']!r}")
    try:
        dtype = np.dtype(manifest["token_dtype"])
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "u" or dtype.itemsize not in (2, 4) or dtype != dtype.newbyteorder("<"):
        raise UserError(f"{path}: field 'token_dtype' must be little-endian uint16 or uint32 ('<u2', '<u4'); got "
                        f"{manifest['token_dtype']!r}")
    if manifest["vocab_size"] > 1 << (8 * dtype.itemsize):
        raise UserError(f"{path}: vocab_size {manifest['vocab_size']} does not fit token_dtype {dtype.str}")
    if not isinstance(manifest["shards"], list) or not isinstance(manifest["tokenizer"], dict):
        raise UserError(f"{path}: fields 'shards' (a list) and 'tokenizer' (an object) are of the wrong kind")
    for i, entry in enumerate(manifest["shards"]):
        for key in ("samples", "tokens", "bytes", "documents"):
            if isinstance(entry, dict) and key in entry and not count(entry[key]):
                raise UserError(f"{path}: shards[{i}].{key} must be an integer >= 0; got {entry[key]!r}")


def load_manifest(path, allow_external_shards: bool = False) -> dict:
    """Parse and check a manifest.json; shard paths are resolved relative to its directory.

    Every field is checked for its kind and range (a seq_len of 1e9, a float token dtype or a
    negative count is a UserError naming the field). A shard path, and the tokenizer files it
    names, must stay inside that directory (data_pipeline.files.contained): a manifest from
    elsewhere must not make the reader open arbitrary files. Datasets that deliberately span
    directories pass allow_external_shards=True (shards only)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    for key in ("seq_len", "pad_id", "vocab_size", "token_dtype", "shards", "tokenizer"):
        if key not in manifest:
            raise UserError(f"{path}: manifest lacks field {key!r}")
    _check_fields(path, manifest)
    root = path.parent.resolve()
    for i, entry in enumerate(manifest["shards"]):
        shard = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(shard, str) or not shard:
            raise UserError(f"{path}: shards[{i}] has no path")
        if not allow_external_shards:
            try:
                contained(root, shard, f"{path}: shards[{i}].path")
            except UserError as err:
                raise UserError(f"{err} (allow_external_shards opts out)") from None
    tokenizer = manifest["tokenizer"]
    for key, names in (("path", [tokenizer.get("path")]), ("files", tokenizer.get("files") or [])):
        for name in names if isinstance(names, list) else [names]:
            if name is not None:
                contained(root, name, f"{path}: tokenizer.{key}")
    manifest["root"] = str(root)
    return manifest


def shard_file(manifest: dict, entry: dict) -> Path:
    return Path(manifest["root"]) / entry["path"]

"""The shard format on disk: one webdataset .tar per shard, one sample per window.

Each sample is the tar member ``<key>.tokens.u16`` (``.u32`` when the vocabulary exceeds 65536
ids) holding the window's tokens as a raw little-endian array, plus ``<key>.segments.u8`` (the
segment id of every token) in a multi-segment dataset (docs/data.md). Written by the builder
(data_pipeline.shards), read by inspection, preflight and the training reader
(pretrain.data.reader); this module holds both directions so they cannot drift apart.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from .files import file_sha256


class ShardError(Exception):
    """A shard that cannot be read as a tar file (truncated, missing, wrong size)."""



def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def member_suffix(dtype) -> str:
    return ".tokens.u16" if np.dtype(dtype).itemsize == 2 else ".tokens.u32"


SEGMENTS_FIELD = "segments.u8"  # per-token segment ids of a multi-segment sample, uint8


def write_shard(path, stem: str, windows, dtype, segments=None) -> dict:
    """Write windows (and their per-token segment ids, if given) as one shard with webdataset's
    TarWriter: temp name, fsync, rename. Returns samples/tokens/bytes/sha256.

    webdataset's ShardWriter is not used: it opens its files under their final names, so a kill
    would leave a half-written shard that looks finished."""
    import webdataset

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    field = member_suffix(dtype)[1:]
    try:
        with open(tmp, "wb") as f:
            # Fixed member metadata (mtime 0, mode, no owner): the same windows give the same bytes.
            with webdataset.TarWriter(f, encoder=False, mtime=0, mode=0o644, user="", group="") as sink:
                for i, window in enumerate(windows):
                    sample = {"__key__": f"{stem}-{i:07d}", field: np.asarray(window).astype(dtype).tobytes()}
                    if segments is not None:
                        sample[SEGMENTS_FIELD] = np.asarray(segments[i], dtype=np.uint8).tobytes()
                    sink.write(sample)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return {"samples": len(windows), "tokens": int(sum(len(w) for w in windows)),
            "bytes": path.stat().st_size, "sha256": file_sha256(path)}


class Sample(NamedTuple):
    index: int               # sample index in the shard
    key: str
    tokens: np.ndarray | None  # None for a bad sample
    error: str | None
    segments: np.ndarray | None = None  # per-token segment ids of a multi-segment sample


def decode_sample(key: str, fields: dict, dtype, seq_len: int | None = None, vocab_size: int | None = None,
                  n_segments: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens, segment ids or None) of one sample given its members {suffix: bytes}; ValueError
    naming the sample when it is malformed. Shared by read_shard and the training reader."""
    token_field = member_suffix(dtype)[1:]
    expected = {token_field, SEGMENTS_FIELD} if n_segments else {token_field}
    if set(fields) != expected:
        raise ValueError(f"sample {key!r} has members {sorted(fields)}, expected {sorted(expected)}")
    data = fields[token_field]
    itemsize = np.dtype(dtype).itemsize
    if len(data) % itemsize:
        raise ValueError(f"sample {key!r}: {len(data)} bytes is not a whole number of {itemsize}-byte tokens")
    tokens = np.frombuffer(data, dtype=dtype)
    if len(tokens) < 2 or (seq_len is not None and len(tokens) > seq_len):
        raise ValueError(f"sample {key!r}: {len(tokens)} tokens, expected 2..{seq_len}")
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise ValueError(f"sample {key!r}: token id {int(tokens.max())} >= vocab_size {vocab_size}")
    if not n_segments:
        return tokens, None
    segments = np.frombuffer(fields[SEGMENTS_FIELD], dtype=np.uint8)
    if len(segments) != len(tokens) or np.any(np.diff(segments.astype(np.int64)) < 0) or segments.max() >= n_segments:
        raise ValueError(f"sample {key!r}: segment ids must be one per token, non-decreasing, below {n_segments}")
    return tokens, segments


_BLOCK = 512  # tar block size
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular-file type flags, as tarfile counts them
_EXTENSION_TYPES = (b"x", b"g", b"L", b"K", b"S")  # pax, GNU long-name and sparse headers


def tar_members(path, select=None, handler=None, chunk: int = 1024):
    """The members of one shard as webdataset's tar expansion yields them ({"fname", "data",
    "__url__"}), to feed webdataset's `group_by_keys`; `select(name)` false skips a member's data.

    Our own stage instead of webdataset's `tar_file_expander` because of speed: that one parses
    each 512-byte header with Python's tarfile, field by field, about 30 us per member (as long as
    the objective sampler and the collator take for a sample), while here up to `chunk` headers
    are checksummed at once with numpy from a memory map (docs/data.md, "Machinery"). It reads
    by tarfile's rules: the archive ends at a zero block or, quietly, at the first damaged
    header (bad checksum or size field; the reader counts the samples lost behind it), and
    non-file members are skipped. Data running past the end of the file ends it through
    `handler(error)`, as webdataset's handler policy does; handler=None raises. At a pax or GNU
    extension header (a long or non-ASCII name, a huge member; TarWriter writes none for our
    short ASCII names) the rest of the shard is read by webdataset's own `tar_file_iterator`,
    which understands them, so any valid tar is read whole."""
    import mmap

    path = Path(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < _BLOCK:
            _tar_error(handler, ShardError(f"{path}: {size} bytes, too short for a tar header"))
            return
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            offset, done = 0, set()
            while offset is not None:
                members, offset = _checked_headers(data, offset, size, chunk)
                for name, kind, start, length in members:
                    if kind in _EXTENSION_TYPES:
                        yield from _tarfile_members(path, lambda n: n not in done and (select is None or select(n)),
                                                    handler)
                        return
                    if start + length > size:
                        _tar_error(handler, ShardError(f"{path}: member {name} runs past the end of the file"))
                        return
                    if kind in _FILE_TYPES and not name.endswith("/") and (select is None or select(name)):
                        done.add(name)
                        yield {"fname": name, "data": data[start:start + length], "__url__": str(path)}


def _tarfile_members(path: Path, select, handler):
    """webdataset's tarfile-based expansion of one shard, for the members tar_members leaves."""
    import webdataset

    with open(path, "rb") as stream:
        for member in webdataset.tariterators.tar_file_iterator(
                stream, skip_meta=None, select_files=select,
                handler=handler or webdataset.handlers.reraise_exception):
            yield member | {"__url__": str(path)}


def _tar_error(handler, error: Exception) -> None:
    if handler is None:
        raise error
    handler(error)


def _checked_headers(data, offset: int, size: int, limit: int) -> tuple[list, int | None]:
    """Up to `limit` members from the header at `offset` on: ([(name, type flag, data start,
    data length)], offset of the next header or None at the end of the archive). The list stops
    before the first header whose checksum or size field is damaged, which ends the archive."""
    members, offsets, stored = [], [], []
    while len(members) < limit:
        header = data[offset:offset + _BLOCK]
        if len(header) < _BLOCK or header == _ZERO_BLOCK:
            offset = None
            break
        try:
            length, checksum = int(_field(header[124:136]) or b"0", 8), int(_field(header[148:156]) or b"0", 8)
        except ValueError:
            offset = None
            break
        name = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0" and header[345]:  # ustar: a long name's directory part
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        members.append((name.decode("utf-8", "surrogateescape"), header[156:157], offset + _BLOCK, length))
        offsets.append(offset)
        stored.append(checksum)
        offset += _BLOCK + -(-length // _BLOCK) * _BLOCK
    if not members:
        return members, None
    # tar's checksum: the sum of the header's bytes with the checksum field read as 8 spaces,
    # unsigned or (some old writers) signed.
    blocks = np.frombuffer(data, dtype=np.uint8, count=size // _BLOCK * _BLOCK).reshape(-1, _BLOCK)
    headers = blocks[np.asarray(offsets) // _BLOCK]
    del blocks  # a view into the memory map must not outlive this call
    field = headers[:, 148:156]
    unsigned = headers.sum(axis=1, dtype=np.int64) - field.sum(axis=1, dtype=np.int64) + 8 * 32
    signed = headers.view(np.int8).sum(axis=1, dtype=np.int64) - field.view(np.int8).sum(axis=1, dtype=np.int64) + 8 * 32
    stored = np.asarray(stored)
    damaged = np.flatnonzero((stored != unsigned) & (stored != signed))
    if len(damaged):
        return members[:damaged[0]], None
    return members, offset


def _field(raw: bytes) -> bytes:
    """A numeric tar header field: up to its first NUL, without surrounding spaces."""
    return raw.split(b"\0", 1)[0].strip()


def count_samples(path) -> int:
    """Samples (distinct keys) of one shard, from its tar headers alone: no member data is read."""
    keys = set()

    def note(name):
        keys.add(_split_name(name)[0])
        return False

    for _ in tar_members(path, select=note):
        pass
    return len(keys)


def _split_name(name: str) -> tuple[str, str]:
    """('<stem>-<index>', 'tokens.u16') from a member name, as webdataset groups members: keys
    hold no dot (docs/data.md), the rest is the field."""
    key, _, field = name.partition(".")
    return key, field


def read_shard(path, dtype, *, seq_len=None, vocab_size=None, expected_bytes=None, start: int = 0,
               n_segments: int = 0) -> Iterator[Sample]:
    """Samples of one shard in stored order, from sample index `start` on.

    A malformed sample comes back with tokens=None and the reason; a shard that is missing,
    has the wrong size, is not a readable tar or ends at a damaged header raises ShardError
    (possibly after some samples)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ShardError(f"{path}: cannot read shard ({error})") from None
    if expected_bytes is not None and size != expected_bytes:
        raise ShardError(f"{path}: {size} bytes, manifest says {expected_bytes} (truncated or replaced)")

    def sample(index, key, fields):
        try:
            tokens, segments = decode_sample(key, fields, dtype, seq_len, vocab_size, n_segments)
        except ValueError as error:
            return Sample(index, key, None, str(error))
        return Sample(index, key, tokens, None, segments)

    try:
        with tarfile.open(path, mode="r:") as tar:
            index, key, fields = 0, None, {}
            while (member := tar.next()) is not None:
                tar.members = []  # keep memory flat on large shards (tarfile caches every header)
                if not member.isfile():
                    continue
                name_key, field = _split_name(member.name)
                if name_key != key and key is not None:
                    if index >= start:
                        yield sample(index, key, fields)
                    index, fields = index + 1, {}
                key = name_key
                # Members before `start` are only counted; their data is seeked over.
                fields[field] = tar.extractfile(member).read() if index >= start else b""
            if key is not None and index >= start:
                yield sample(index, key, fields)
            _check_end_of_archive(path, tar, index + (key is not None))
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"{path}: unreadable tar ({error})") from None


def _check_end_of_archive(path: Path, tar: tarfile.TarFile, members: int) -> None:
    """tarfile (and so webdataset) ends an archive quietly at the first damaged header after the
    first one; only zero padding may follow a real end, so anything else means members were lost."""
    tar.fileobj.seek(tar.offset)
    while block := tar.fileobj.read(1 << 16):
        if block.strip(b"\0"):
            raise ShardError(f"{path}: damaged tar header at byte {tar.offset} after {members} samples; "
                             f"the members behind it are unreadable")

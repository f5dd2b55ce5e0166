"""Shard format and builder: documents -> token windows -> webdataset .tar shards + manifest.json.

Format (docs/data.md): each sample of a shard is one tar member ``<key>.tokens.u16`` (or
``.u32`` when the vocabulary exceeds 65536 ids) holding the window's tokens as a raw
little-endian array, plus ``<key>.segments.u8`` (segment id per token) in a multi-segment dataset. Keys are ``<shard stem>-<index:07d>``, unique over the dataset. The build
is restartable: every shard is written to a temporary name, fsynced and renamed, with a small
``<stem>.info.json`` sidecar; a re-run skips shards whose sidecar matches the documents and
build settings, and ``manifest.json`` is written last, atomically.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from .errors import UserError
from .files import atomic_write, file_sha256
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, MAX_SEQ_LEN
from .resources import disk_full, free_disk, human
from .sources import SourceConfig, SourceStats, iter_documents
from .tokenizer import Tokenizer

MODES = ("concat", "documents")
SPLITS = ("train", "val")


class ShardError(Exception):
    """A shard that cannot be read as a tar file (truncated, missing, wrong size)."""


@dataclass
class ShardConfig:
    seq_len: int = 512
    mode: str = "concat"        # "concat": eos-joined stream cut into windows; "documents": whole docs packed + padded
    val_fraction: float = 0.01  # share of documents (by content hash) in the validation split
    shard_size_mb: float = 64.0  # target token payload per shard, MiB
    num_workers: int = os.cpu_count() or 1  # tokenizer processes; 0 tokenizes in this process

    def __post_init__(self):
        if not 2 <= self.seq_len <= MAX_SEQ_LEN:  # the manifest reader's bound: never write what it refuses
            raise ValueError(f"seq_len must be in [2, {MAX_SEQ_LEN}]; got {self.seq_len!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1); got {self.val_fraction!r}")
        if not self.shard_size_mb > 0:
            raise ValueError(f"shard_size_mb must be > 0; got {self.shard_size_mb!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0; got {self.num_workers!r}")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def member_suffix(dtype) -> str:
    return ".tokens.u16" if np.dtype(dtype).itemsize == 2 else ".tokens.u32"


def split_of(text: str, val_fraction: float) -> str:
    """Deterministic split from the document's content hash (duplicates share a split)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return "val" if h < val_fraction * 2.0 ** 64 else "train"


# --------------------------------------------------------------------------- windows

def _cut(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Chunks of seq_len; a 1-token remainder borrows a token from the chunk before it, because a
    window needs at least one source and one target token."""
    bounds = list(range(0, len(tokens), seq_len)) + [len(tokens)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds[-2] -= 1
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def make_windows(documents: list[list[int]], seq_len: int, eos_id: int, mode: str) -> list[np.ndarray]:
    """Token windows of 2..seq_len tokens from documents, each followed by eos; no token is lost.

    concat: the eos-joined stream cut every seq_len tokens (the last window may be shorter).
    documents: whole documents packed greedily in order, never cut unless longer than seq_len;
    windows are stored unpadded and the collator pads them. Documents that encode to no token
    are left out (they would be a lone eos)."""
    docs = [np.append(np.asarray(d, dtype=np.int64), eos_id) for d in documents if len(d)]
    if mode == "concat":
        return _cut(np.concatenate(docs), seq_len) if docs else []
    windows, current, used = [], [], 0
    for doc in docs:
        if len(doc) > seq_len:  # a long document starts a new window and is cut
            if current:
                windows.append(np.concatenate(current))
                current, used = [], 0
            *full, doc = _cut(doc, seq_len)
            windows.extend(full)
        if used + len(doc) > seq_len:
            windows.append(np.concatenate(current))
            current, used = [], 0
        current.append(doc)
        used += len(doc)
    if current:
        windows.append(np.concatenate(current))
    return windows


def segment_windows(records: list[tuple], tokenizer: Tokenizer, seq_len: int):
    """One window per multi-segment record: its fields' tokens in field order (a text field is
    tokenized, an integer label c becomes the sentinel token c), no eos, with the segment id of
    every token. A record of more than seq_len tokens (or fewer than 2) is dropped and counted,
    never cut: a cut would silently remove part of a segment.
    Returns (windows, segment ids, dropped count)."""
    texts = iter(tokenizer.encode_batch([v for record in records for v in record if isinstance(v, str)]))
    windows, segments, dropped = [], [], 0
    for record in records:
        parts = []
        for value in record:
            if isinstance(value, str):
                parts.append(next(texts))
            elif value < len(tokenizer.sentinel_ids):
                parts.append([tokenizer.sentinel_ids[value]])
            else:
                raise ValueError(f"label {value} needs sentinel token {value}, but the tokenizer has "
                                 f"{len(tokenizer.sentinel_ids)} (train it with --sentinels > {value})")
        lengths = [len(p) for p in parts]
        if not 2 <= sum(lengths) <= seq_len:
            dropped += 1
            continue
        windows.append(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))
        segments.append(np.repeat(np.arange(len(parts)), lengths))
    return windows, segments, dropped


# --------------------------------------------------------------------------- tar I/O

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


# --------------------------------------------------------------------------- builder

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _build_one(task: dict) -> dict:
    """Tokenize one shard's documents and write it (runs in a pool worker)."""
    tokenizer = _worker_tokenizer
    started = time.perf_counter()
    segments, too_long = None, 0
    if task["segmented"]:
        windows, segments, too_long = segment_windows(task["documents"], tokenizer, task["seq_len"])
    else:
        ids = tokenizer.encode_batch(task["documents"])
        windows = make_windows(ids, task["seq_len"], tokenizer.eos_id, task["mode"])
    out = Path(task["output_dir"])
    info = write_shard(out / f"{task['stem']}.tar", task["stem"], windows, np.dtype(task["dtype"]), segments)
    info.update(path=f"{task['stem']}.tar", split=task["split"], documents=len(task["documents"]), too_long=too_long,
                docs_sha256=task["docs_sha256"], fingerprint=task["fingerprint"],
                seconds=time.perf_counter() - started)
    atomic_write(out / f"{task['stem']}.info.json", json.dumps(info).encode())
    return info


def _finished(output_dir: Path, task: dict) -> dict | None:
    """Sidecar of an already written shard with the same documents and settings, else None."""
    try:
        info = json.loads((output_dir / f"{task['stem']}.info.json").read_text())
        tar_bytes = (output_dir / f"{task['stem']}.tar").stat().st_size
    except (OSError, ValueError):
        return None
    same = (info.get("docs_sha256") == task["docs_sha256"] and info.get("fingerprint") == task["fingerprint"]
            and info.get("bytes") == tar_bytes)
    return info if same else None


def _shard_tasks(documents, config: ShardConfig, target_tokens: int, chars_per_token: float, base: dict,
                 outcome: dict):
    """Group documents into shard tasks per split, in input order.

    With val_fraction > 0 the validation split is never empty while there are two documents: the
    hash split (split_of) decides, except when it put no document into it; then the last
    training document goes there instead. For that the newest training document is held back by
    one step, which leaves every shard as the hash split makes it. `outcome["val_moved"]` says
    whether a document was moved, `outcome["documents"]` how many were read."""
    pending = {split: ([], hashlib.sha256(), 0.0) for split in SPLITS}
    counters = dict.fromkeys(SPLITS, 0)
    held = None  # the newest training document (its text and the document), not yet in a shard
    outcome.update(documents=0, val_moved=False)

    def task(split):
        docs, digest, _ = pending[split]
        stem = f"{split}-{counters[split]:06d}"
        counters[split] += 1
        pending[split] = ([], hashlib.sha256(), 0.0)
        return {**base, "stem": stem, "split": split, "documents": docs, "docs_sha256": digest.hexdigest()}

    def add(split, text, document):
        docs, digest, estimate = pending[split]
        docs.append(document)
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        pending[split] = (docs, digest, estimate + len(text) / chars_per_token + 1)
        return task(split) if pending[split][2] >= target_tokens else None

    for document in documents:
        outcome["documents"] += 1
        text = document if isinstance(document, str) else json.dumps(document, ensure_ascii=False)
        split = split_of(text, config.val_fraction)
        if split == "train":
            previous, held = held, (text, document)
            if previous is None:
                continue
            text, document = previous
        done = add(split, text, document)
        if done is not None:
            yield done
    if held is not None:
        no_val = counters["val"] == 0 and not pending["val"][0]
        if config.val_fraction > 0 and no_val and (counters["train"] or pending["train"][0]):
            outcome["val_moved"] = True
            done = add("val", *held)
        else:
            done = add("train", *held)
        if done is not None:
            yield done
    for split in SPLITS:
        if pending[split][0]:
            yield task(split)


def _counted(documents, bar, every_s: float = 1.0):
    """The documents, with their count on the bar at most once a second: reading the first shard's
    worth (e.g. parsing the standard library) takes longer than a bar may sit still."""
    last = time.monotonic()
    for count, document in enumerate(documents, 1):
        if time.monotonic() - last >= every_s:
            bar.set_postfix_str(f"{count} documents read", refresh=True)
            last = time.monotonic()
        yield document


def build_shards(inputs, tokenizer_dir, output_dir, config: ShardConfig | None = None,
                 source_config: SourceConfig | None = None, progress: bool = True) -> Path:
    """Tokenize `inputs` into shards under `output_dir`; returns the path of manifest.json.
    `tokenizer_dir`: any kind `Tokenizer.load` reads (ours, an HF tokenizer.json, a sentencepiece .model)."""
    output_dir = Path(output_dir)
    try:
        return _build_shards(inputs, tokenizer_dir, output_dir, config or ShardConfig(), source_config or SourceConfig(),
                             progress)
    except (OSError, RuntimeError) as err:
        if not disk_full(err, output_dir):
            raise
        raise UserError(f"no space left on device while writing shards into {output_dir} ({human(free_disk(output_dir))} "
                        "free); the shards already complete are kept and a re-run continues from them") from None


def _build_shards(inputs, tokenizer_dir, output_dir: Path, config: ShardConfig, source_config: SourceConfig,
                  progress: bool) -> Path:
    from tqdm import tqdm

    tokenizer = Tokenizer.load(tokenizer_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".*.tmp"):  # leftovers of an interrupted build, never final names
        stale.unlink()
    for name, source in tokenizer.files.items():  # the dataset carries its tokenizer
        if source.resolve() != (output_dir / name).resolve():
            shutil.copyfile(source, output_dir / f".{name}.tmp")
            os.replace(output_dir / f".{name}.tmp", output_dir / name)

    dtype = token_dtype(tokenizer.vocab_size)
    segments = list(source_config.segments)
    fingerprint = {"format_version": FORMAT_VERSION, "seq_len": config.seq_len, "mode": config.mode,
                   "tokenizer_sha256": tokenizer.sha256, "dtype": dtype.str, **({"segments": segments} if segments else {})}
    base = {"output_dir": str(output_dir), "seq_len": config.seq_len, "mode": config.mode,
            "dtype": dtype.str, "fingerprint": fingerprint, "segmented": bool(segments)}
    target_tokens = max(1, int(config.shard_size_mb * 2 ** 20 / dtype.itemsize))
    stats = SourceStats()
    outcome: dict = {}
    entries, skipped, busy_seconds, total_tokens = [], 0, 0.0, 0
    bar = tqdm(desc="shards", unit="shard", disable=not progress)
    tasks = _shard_tasks(_counted(iter_documents(inputs, source_config, stats), bar), config, target_tokens,
                         tokenizer.info.get("chars_per_token", 4.0), base, outcome)

    def finish(info):
        nonlocal busy_seconds, total_tokens
        entries.append(info)
        busy_seconds += info.get("seconds", 0.0) if info.get("fresh") else 0.0
        total_tokens += info["tokens"]
        bar.update(1)
        bar.set_postfix(tokens=total_tokens, reused=skipped)

    started = time.perf_counter()
    if config.num_workers == 0:
        _init_worker(str(tokenizer_dir))
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(config.num_workers, _init_worker, (str(tokenizer_dir),))
    try:
        in_flight: deque = deque()
        for task in tasks:
            done = _finished(output_dir, task)
            if done is not None:
                skipped += 1
                in_flight.append(done)
            elif pool is None:
                in_flight.append({**_build_one(task), "fresh": True})
            else:
                in_flight.append(pool.apply_async(_build_one, (task,)))
            while in_flight and (isinstance(in_flight[0], dict) or len(in_flight) > 2 * config.num_workers):
                head = in_flight.popleft()
                finish(head if isinstance(head, dict) else {**head.get(), "fresh": True})
        while in_flight:
            head = in_flight.popleft()
            finish(head if isinstance(head, dict) else {**head.get(), "fresh": True})
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    if not entries:
        raise ValueError(f"no usable documents in inputs {[str(i) for i in inputs]}: {stats.report()}")
    elapsed = time.perf_counter() - started
    if outcome["val_moved"]:
        print(f"note: no document fell into the validation split by hash (--val-fraction {config.val_fraction:g}, "
              f"{outcome['documents']} documents); the last training document was put there", file=sys.stderr)
    elif config.val_fraction > 0 and not any(e["split"] == "val" for e in entries):
        print(f"warning: --val-fraction {config.val_fraction:g} but the inputs hold {outcome['documents']} usable "
              "document(s): no validation split (training runs without evaluation); add documents",
              file=sys.stderr)

    entries.sort(key=lambda e: (SPLITS.index(e["split"]), e["path"]))
    fresh_tokens = sum(e["tokens"] for e in entries if e.get("fresh"))
    shards = [{k: e[k] for k in ("path", "split", "samples", "tokens", "documents", "bytes", "sha256")}
              for e in entries]
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "seq_len": config.seq_len, "mode": config.mode, "token_dtype": dtype.str, "segments": segments or None,
        "pad_id": tokenizer.pad_id, "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size,
        "tokenizer": {"kind": tokenizer.kind, "path": tokenizer.defining_file, "files": sorted(tokenizer.files),
                      "sha256": tokenizer.sha256, "file_sha256": tokenizer.file_sha256,
                      "vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "unk_id": tokenizer.unk_id,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "sentinel_ids": tokenizer.sentinel_ids},
        "splits": {split: {"shards": sum(s["split"] == split for s in shards),
                           "samples": sum(s["samples"] for s in shards if s["split"] == split),
                           "tokens": sum(s["tokens"] for s in shards if s["split"] == split)} for split in SPLITS},
        "shards": shards,
        "sources": stats.to_dict(),
        "build": {**asdict(config), "inputs": [str(i) for i in inputs], "source": asdict(source_config),
                  "reused_shards": skipped, "seconds": elapsed, "tokens_written": fresh_tokens,
                  "too_long_samples": sum(e.get("too_long", 0) for e in entries),
                  "tokens_per_second_per_worker": fresh_tokens / busy_seconds if busy_seconds else None},
    }
    path = output_dir / MANIFEST
    atomic_write(path, (json.dumps(manifest, indent=1) + "\n").encode())
    return path

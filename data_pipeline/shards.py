"""Shard builder: documents -> token windows -> webdataset .tar shards + manifest.json.

Keys are ``<shard stem>-<index:07d>``, unique over the dataset; the member format is
data_pipeline.shard_format's. The build is restartable: every shard is written to a temporary
name, fsynced and renamed, with a small ``<stem>.info.json`` sidecar; a re-run skips shards whose
sidecar matches the documents and build settings, and ``manifest.json`` is written last, atomically.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import atomic_write
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, MAX_SEQ_LEN
from .resources import disk_full, free_disk, human
from .shard_format import token_dtype, write_shard
from .sources import SourceConfig, SourceStats, iter_documents
from .tokenizer import Tokenizer

MODES = ("concat", "documents")
SPLITS = ("train", "val")


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

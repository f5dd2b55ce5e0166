"""One reader of the shards: a worker's share of a rank's batches, from a Cursor on.

Each reader is a loader worker of torchdata's StatefulDataLoader (what torchtitan uses)
iterating a ShardReader (an IterableDataset) whose samples come from a memory-mapped tar
expansion (data_pipeline.shard_format.tar_members) and webdataset's `group_by_keys`; the objective
sampler and the collator run in the worker. A reader that comes up short because of corrupt data
re-reads its pieces (counted as `wraps`). Which parts are not webdataset's and why: docs/data.md.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.errors import UserError
from data_pipeline.manifest import shard_file
from data_pipeline.shard_format import decode_sample, tar_members

from ..layout import TaskBatch, collate
from .plan import (_SEED_BLOCK, _SEED_OBJECTIVE, Cursor, Piece, Position, ReaderContext, Tail, epoch_plan,
                   old_layout, rng)

log = logging.getLogger(__name__)


class UnreadableData(UserError):
    """A reader has no readable sample left in its shards (deleted, truncated or damaged, possibly
    while the run reads them): the run stops with a checkpoint and this one line."""


def _sample_index(key: str) -> int | None:
    """Sample index from a key `<stem>-<index:07d>` (docs/data.md); None for a foreign name."""
    tail = key.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _piece_samples(ctx: ReaderContext, piece: Piece, start: int, counters: dict):
    """Samples of one piece from sample index `start` on, read with our tar expansion
    (data_pipeline.shard_format.tar_members, for speed) and webdataset's grouping by key: yields
    (index, key, tokens, segment ids or None). Bad samples and shards are logged and
    counted; so are samples lost behind a damaged tar header (where the expansion, like
    tarfile, ends the archive quietly): the count falls short of the manifest's."""
    import webdataset

    entry = ctx.shards[piece.shard]
    path = shard_file(ctx.manifest, entry)
    try:
        size = path.stat().st_size
    except OSError as error:
        size = error
    if size != entry["bytes"]:
        counters["skipped_shards"] += 1
        log.warning("skipping corrupt shard %s: %s", entry["path"],
                    size if isinstance(size, OSError) else f"{size} bytes, manifest says {entry['bytes']}")
        return
    failures = []

    def stop_shard(error) -> bool:  # webdataset handler: note the error, give up on this shard
        failures.append(error)
        return False

    def wanted(name: str) -> bool:  # members before `start` or of other pieces are not even read
        index = _sample_index(name.split(".", 1)[0])
        return index is None or (index >= start and index % piece.stride == piece.part)

    dtype = np.dtype(ctx.manifest["token_dtype"])
    seen = 0
    members = tar_members(path, select=wanted, handler=stop_shard)
    for sample in webdataset.tariterators.group_by_keys(members, handler=stop_shard):
        seen += 1
        key = sample["__key__"]
        fields = {k: v for k, v in sample.items() if not k.startswith("__")}
        try:
            tokens, segments = decode_sample(key, fields, dtype, ctx.manifest["seq_len"], ctx.manifest["vocab_size"],
                                             ctx.n_segments)
        except ValueError as error:
            counters["skipped_samples"] += 1
            log.warning("skipping bad sample in %s: %s", entry["path"], error)
            continue
        yield _sample_index(key), key, tokens, segments
    expected = len(range(start + (piece.part - start) % piece.stride, entry["samples"], piece.stride))
    if failures or seen < expected:
        counters["skipped_shards"] += 1
        counters["skipped_samples"] += max(0, expected - seen)
        reason = failures[0] if failures else "damaged tar header"
        log.warning("corrupt shard %s: %d of its samples unreadable (%s)", entry["path"], max(0, expected - seen), reason)


def _tail_samples(ctx: ReaderContext, epoch: int, tail: Tail, start: int, counters: dict):
    """The tail's samples from index `start` on (indices count the old reader's unconsumed
    samples), read by replaying the old reader's stream: yields (index, key, tokens, segments)."""
    old = replace(old_layout(ctx, tail.rank), reader=tail.reader)
    pieces = epoch_plan(old, epoch)[0][tail.reader]
    index = -tail.skip
    for _, _, samples, _ in _blocks(old, epoch, pieces, Cursor(epoch), counters):
        for sample in samples:
            if index >= tail.count:
                return
            if index >= start and index >= 0 and index % tail.stride == tail.part:
                yield (index, *sample)
            index += 1


def _pass_samples(ctx: ReaderContext, epoch: int, pieces: list, position: Position, counters: dict):
    """Samples of one pass over `pieces` from `position`: yields (position after it, key, tokens, segments)."""
    wrap, first_piece, first_member = position
    for piece_index in range(first_piece, len(pieces)):
        start = first_member if piece_index == first_piece else 0
        piece = pieces[piece_index]
        samples = (_tail_samples(ctx, epoch, piece, start, counters) if isinstance(piece, Tail)
                   else _piece_samples(ctx, piece, start, counters))
        for index, key, tokens, segments in samples:
            yield Position(wrap, piece_index, index + 1), key, tokens, segments


def _blocks(ctx: ReaderContext, epoch: int, pieces: list[Piece], cursor: Cursor, counters: dict):
    """Shuffled blocks from the cursor's block on: yields (block index, start position, samples, end position).

    webdataset's own shuffle stage is not used: its buffer and random state cannot be saved, so a
    resumed run would see other samples. A block is a pure function of its start position and
    index, so the cursor only needs those two and the offset inside the block."""
    block, position = cursor.block, cursor.block_start
    while True:
        stream = _pass_samples(ctx, epoch, pieces, position, counters)
        found = False
        while True:
            samples, end = [], position
            for end, *sample in stream:
                samples.append(sample)
                if len(samples) == ctx.shuffle_buffer:
                    break
            if not samples:
                break
            found = True
            if ctx.shuffle:
                permutation = rng(ctx.seed, epoch, ctx.rank, ctx.reader, block, _SEED_BLOCK).permutation(len(samples))
                samples = [samples[i] for i in permutation]
            yield block, position, samples, end
            block, position = block + 1, end
        if not found and position.piece == position.member == 0:
            shards = sorted({ctx.shards[p.shard]["path"] for p in pieces if isinstance(p, Piece)})
            raise UnreadableData(f"reader {ctx.reader} of rank {ctx.rank} found no readable sample in its "
                                 f"{len(pieces)} pieces of shards {shards} (deleted, truncated or damaged)")
        counters["wraps"] += 1  # corrupt data left this reader short of its quota: read its pieces again
        position = Position(position.wrap + 1)


def _make_batch(ctx: ReaderContext, epoch: int, batch_index: int, samples: list) -> TaskBatch:
    """Sampler + collator on one batch of (key, tokens, segments) samples."""
    draws = rng(ctx.seed, epoch, ctx.rank, ctx.reader, batch_index, _SEED_OBJECTIVE)
    windows = [tokens for _, tokens, _ in samples]
    if not ctx.n_segments:
        return collate(windows, [ctx.sampler(len(w), draws) for w in windows], ctx.manifest["pad_id"])
    segments = [segs for _, _, segs in samples]
    segmented = bool(ctx.sampler.config.segments)  # else the rules ignore segments; the model still sees them
    specs = [ctx.sampler(len(w), draws, segment_lengths=np.bincount(s, minlength=ctx.n_segments).tolist() if segmented
                         else None) for w, s in zip(windows, segments)]
    return collate(windows, specs, ctx.manifest["pad_id"], segments=segments)


def reader_batches(ctx: ReaderContext, cursor: Cursor):
    """This reader's batches of the cursor's epoch from the cursor on: yields (TaskBatch, keys,
    cursor after it, counters of this iteration)."""
    counters = {"skipped_shards": 0, "skipped_samples": 0, "wraps": 0}
    epoch = cursor.epoch
    readers_pieces, schedule = epoch_plan(ctx, epoch)
    quota = schedule.count(ctx.reader)
    if cursor.batches >= quota:
        return
    blocks = _blocks(ctx, epoch, readers_pieces[ctx.reader], cursor, counters)
    block, start, samples, end = next(blocks)
    offset = cursor.offset
    for batch_index in range(cursor.batches, quota):
        chosen = []
        while len(chosen) < ctx.batch_size:
            if offset == len(samples):
                block, start, samples, end = next(blocks)
                offset = 0
            chosen.append(samples[offset])
            offset += 1
        batch = _make_batch(ctx, epoch, batch_index, chosen)
        if offset == len(samples):
            after = Cursor(epoch, batch_index + 1, block + 1, end, 0)
        else:
            after = Cursor(epoch, batch_index + 1, block, start, offset)
        yield batch, [key for key, _, _ in chosen], after, dict(counters)
    blocks.close()


class ShardReader(IterableDataset):
    """One epoch of one rank's batches; in a loader worker, the share of reader `worker id`.

    Each item is a dict: batch (TaskBatch), keys, reader, counters. state_dict() is this
    reader's cursor after the last batch it yielded (StatefulDataLoader takes it in the worker)."""

    def __init__(self, context: ReaderContext):
        self.context = context
        self.epoch = 0
        self._cursor: Cursor | None = None  # after the last batch yielded
        self._resume: Cursor | None = None  # a loaded cursor, used by the next iteration only

    def __iter__(self):
        info = get_worker_info()
        reader = 0 if info is None else info.id
        ctx = ReaderContext(**{**self.context.__dict__, "reader": reader})
        cursor, self._resume = self._resume, None
        self._cursor = cursor
        for batch, keys, after, counters in reader_batches(ctx, cursor or Cursor(self.epoch)):
            self._cursor = after
            yield {"batch": batch, "keys": keys, "reader": reader, "counters": counters}

    def state_dict(self) -> dict:
        return {"cursor": None if self._cursor is None else self._cursor.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._resume = None if state["cursor"] is None else Cursor.from_dict(state["cursor"])
        self._cursor = self._resume

"""Streaming reader of token shards -> TaskBatch, split by rank and worker, exactly resumable.

How one epoch is laid out (everything is a pure function of the manifest, seed, epoch, rank and
reader index, so every rank can compute every other rank's plan without communicating):

1. The split's shards become *pieces*. Normally a piece is a whole shard; when there are fewer
   shards than readers (world_size x workers) each shard is cut into `stride` interleaved pieces
   (members i with i % stride == part) so that every reader gets data.
2. Pieces are shuffled with rng(seed, epoch) (same order on every rank), dealt to ranks
   (pieces[rank::world_size]) and then to that rank's readers ([worker::num_workers]).
3. A reader streams its pieces, cuts the stream into blocks of `shuffle_buffer` samples, permutes
   each block with rng(seed, epoch, rank, reader, block), and forms batches; the objective sampler
   uses rng(seed, epoch, rank, reader, batch). Cursor = (epoch, batch, block, block start, offset).
4. Every rank yields the same number of batches per epoch: min over ranks of the full batches its
   readers can form (from the manifest's sample counts); readers are visited round robin. A reader
   that comes up short because of corrupt data re-reads its pieces (counted as `wraps`).

The consumer-side cursor is updated when a batch is handed out, never when it is prefetched.
"""
from __future__ import annotations

import logging
import multiprocessing
import queue as queue_module
import traceback
from dataclasses import dataclass

import numpy as np

from data_pipeline.shards import ShardError, load_manifest, read_shard, shard_file

from .collate import TaskBatch, collate
from .objectives import ObjectiveSampler

log = logging.getLogger(__name__)
STATE_VERSION = 1
_SEED_SHUFFLE, _SEED_BLOCK, _SEED_OBJECTIVE = 11, 12, 13  # domain tags for the seed sequences


@dataclass(frozen=True)
class Piece:
    shard: int   # index into the split's shard list
    part: int    # members with index % stride == part
    stride: int
    samples: int  # expected samples (from the manifest)


@dataclass
class ReaderContext:
    """What a reader (one worker of one rank) needs; picklable for worker processes."""
    manifest: dict
    shards: list            # manifest entries of the split
    sampler: ObjectiveSampler
    batch_size: int
    rank: int
    world_size: int
    n_readers: int
    reader: int
    seed: int
    shuffle: bool
    shuffle_buffer: int
    one_pass: bool


def _rng(*keys) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def epoch_pieces(shards: list, epoch: int, seed: int, shuffle: bool, n_units: int) -> list[Piece]:
    """All pieces of the split in this epoch's global order."""
    stride = -(-n_units // len(shards)) if len(shards) < n_units else 1
    pieces = [Piece(i, part, stride, len(range(part, entry["samples"], stride)))
              for i, entry in enumerate(shards) for part in range(stride)]
    if shuffle:
        pieces = [pieces[i] for i in _rng(seed, epoch, _SEED_SHUFFLE).permutation(len(pieces))]
    return pieces


def epoch_plan(ctx: ReaderContext, epoch: int) -> tuple[list[list[Piece]], list[int]]:
    """(pieces of each reader of ctx.rank, schedule: reader id of each batch the rank yields)."""
    pieces = epoch_pieces(ctx.shards, epoch, ctx.seed, ctx.shuffle, ctx.world_size * ctx.n_readers)
    capacity = []  # full batches each reader of each rank can form
    for rank in range(ctx.world_size):
        mine = pieces[rank::ctx.world_size]
        capacity.append([sum(p.samples for p in mine[w::ctx.n_readers]) // ctx.batch_size
                         for w in range(ctx.n_readers)])
    n_batches = min(sum(c) for c in capacity)
    if n_batches == 0:
        total = sum(entry["samples"] for entry in ctx.shards)
        raise ValueError(f"the split has {total} samples in {len(ctx.shards)} shards: too few for a batch of "
                         f"{ctx.batch_size} on every rank (world_size={ctx.world_size}, readers={ctx.n_readers})")
    left, schedule = list(capacity[ctx.rank]), []
    while len(schedule) < n_batches:
        for w in range(ctx.n_readers):
            if left[w] and len(schedule) < n_batches:
                schedule.append(w)
                left[w] -= 1
    mine = pieces[ctx.rank::ctx.world_size]
    return [mine[w::ctx.n_readers] for w in range(ctx.n_readers)], schedule


def start_cursor(epoch: int = 0) -> dict:
    # position = (wrap, piece index, member index) of the first sample of the current block
    return {"epoch": epoch, "batches": 0, "block": 0, "block_start": (0, 0, 0), "offset": 0}


def _pass_samples(ctx: ReaderContext, pieces: list[Piece], position, counters: dict):
    """Samples of one pass over `pieces` from `position`: yields (position after it, key, tokens)."""
    wrap, first_piece, first_member = position
    dtype = np.dtype(ctx.manifest["token_dtype"])
    for piece_index in range(first_piece, len(pieces)):
        piece = pieces[piece_index]
        entry = ctx.shards[piece.shard]
        start = first_member if piece_index == first_piece else 0
        try:
            for sample in read_shard(shard_file(ctx.manifest, entry), dtype, seq_len=ctx.manifest["seq_len"],
                                     vocab_size=ctx.manifest["vocab_size"], expected_bytes=entry["bytes"],
                                     start=start):
                if sample.index % piece.stride != piece.part:
                    continue
                if sample.tokens is None:
                    counters["skipped_samples"] += 1
                    log.warning("skipping bad sample in %s: %s", entry["path"], sample.error)
                    continue
                yield (wrap, piece_index, sample.index + 1), sample.key, sample.tokens
        except ShardError as error:
            counters["skipped_shards"] += 1
            log.warning("skipping corrupt shard %s: %s", entry["path"], error)


def _blocks(ctx: ReaderContext, epoch: int, pieces: list[Piece], cursor: dict, counters: dict):
    """Shuffled blocks from the cursor's block on: yields (block index, start position, samples, end position)."""
    block, position = cursor["block"], tuple(cursor["block_start"])
    while True:
        stream = _pass_samples(ctx, pieces, position, counters)
        found = False
        while True:
            samples, end = [], position
            for end, key, tokens in stream:
                samples.append((key, tokens))
                if len(samples) == ctx.shuffle_buffer:
                    break
            if not samples:
                break
            found = True
            if ctx.shuffle:
                permutation = _rng(ctx.seed, epoch, ctx.rank, ctx.reader, block, _SEED_BLOCK).permutation(len(samples))
                samples = [samples[i] for i in permutation]
            yield block, position, samples, end
            block, position = block + 1, end
        if not found and position[1:] == (0, 0):
            raise RuntimeError(f"reader {ctx.reader} of rank {ctx.rank} found no readable sample in its "
                               f"{len(pieces)} pieces of shards {sorted({ctx.shards[p.shard]['path'] for p in pieces})}")
        counters["wraps"] += 1  # corrupt data left this reader short of its quota: read its pieces again
        position = (position[0] + 1, 0, 0)


def reader_batches(ctx: ReaderContext, cursor: dict):
    """This reader's batches from `cursor` on: yields (TaskBatch, keys, cursor after it, counters)."""
    counters = {"skipped_shards": 0, "skipped_samples": 0, "wraps": 0}
    pad_id = ctx.manifest["pad_id"]
    epoch = cursor["epoch"]
    while not (ctx.one_pass and epoch > 0):
        readers_pieces, schedule = epoch_plan(ctx, epoch)
        quota = schedule.count(ctx.reader)
        if cursor["batches"] < quota:
            blocks = _blocks(ctx, epoch, readers_pieces[ctx.reader], cursor, counters)
            block, start, samples, end = next(blocks)
            offset = cursor["offset"]
            for batch_index in range(cursor["batches"], quota):
                windows, keys = [], []
                while len(windows) < ctx.batch_size:
                    if offset == len(samples):
                        block, start, samples, end = next(blocks)
                        offset = 0
                    key, tokens = samples[offset]
                    windows.append(tokens)
                    keys.append(key)
                    offset += 1
                rng = _rng(ctx.seed, epoch, ctx.rank, ctx.reader, batch_index, _SEED_OBJECTIVE)
                specs = [ctx.sampler(len(w), rng) for w in windows]
                batch = collate(windows, specs, pad_id)
                if batch_index + 1 == quota:
                    after = start_cursor(epoch + 1)
                elif offset == len(samples):
                    after = {"epoch": epoch, "batches": batch_index + 1, "block": block + 1,
                             "block_start": end, "offset": 0}
                else:
                    after = {"epoch": epoch, "batches": batch_index + 1, "block": block,
                             "block_start": start, "offset": offset}
                yield batch, keys, after, dict(counters)
            blocks.close()
        epoch += 1
        cursor = start_cursor(epoch)


def _worker_main(ctx: ReaderContext, cursor: dict, out, stop) -> None:
    # Exit without flushing the queue once the consumer has said stop (it wants nothing more);
    # until then stay alive, so that a finished one-pass reader's last batches are delivered.
    out.cancel_join_thread()
    try:
        for item in reader_batches(ctx, cursor):
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue_module.Full:
                    continue
            if stop.is_set():
                return
    except BaseException:  # the consumer re-raises it with the traceback
        out.put(("error", traceback.format_exc()))
    stop.wait()


class BatchStream:
    """Batches (numpy TaskBatch) from a manifest's split; see the module docstring for the order.

    split="train" loops over epochs forever; any other split makes one pass per iteration.
    state_dict() after k consumed batches resumes at batch k + 1 (same settings required)."""

    def __init__(self, manifest_path, split: str = "train", sampler: ObjectiveSampler | None = None,
                 batch_size: int = 8, rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1024, prefetch: int = 4, mp_context: str | None = None):
        self.manifest = load_manifest(manifest_path)
        self.shards = [s for s in self.manifest["shards"] if s["split"] == split]
        if not self.shards:
            raise ValueError(f"{manifest_path}: no shards for split {split!r}; "
                             f"splits present: {sorted({s['split'] for s in self.manifest['shards']})}")
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 1),
                                 ("prefetch", prefetch, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank!r}")
        self.split, self.num_workers, self.prefetch, self.mp_context = split, num_workers, prefetch, mp_context
        self.pad_id = int(self.manifest["pad_id"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.seq_len = int(self.manifest["seq_len"])
        self.context = ReaderContext(
            manifest=self.manifest, shards=self.shards, sampler=sampler or ObjectiveSampler("biglearn"),
            batch_size=batch_size, rank=rank, world_size=world_size, n_readers=max(1, num_workers), reader=0,
            seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer, one_pass=split != "train")
        self.batches_per_epoch = len(epoch_plan(self.context, 0)[1])  # same on every rank
        self.last_keys: list[str] = []  # sample keys of the batch handed out last
        self._cursor = self._initial_cursor()
        self._reader_counters = [dict(skipped_shards=0, skipped_samples=0, wraps=0) for _ in range(self.context.n_readers)]
        self._samples = self._batches = 0
        self._generation = 0  # a new iteration retires the previous one (and its workers)
        self._resume_loaded = False
        self._active = None

    def _initial_cursor(self) -> dict:
        return {"epoch": 0, "batch": 0, "readers": [start_cursor(0) for _ in range(self.context.n_readers)]}

    # ------------------------------------------------------------------ state
    def _settings(self) -> dict:
        c = self.context
        return {"split": self.split, "seed": c.seed, "rank": c.rank, "world_size": c.world_size,
                "num_workers": c.n_readers, "batch_size": c.batch_size, "shuffle": c.shuffle,
                "shuffle_buffer": c.shuffle_buffer}

    def _shard_order(self, epoch: int) -> list:
        readers_pieces, _ = epoch_plan(self.context, epoch)
        return [[p.shard, p.part] for pieces in readers_pieces for p in pieces]

    def state_dict(self) -> dict:
        """Small picklable cursor: settings, epoch, batch in epoch, per-reader cursors, shard order."""
        cursor = self._cursor
        return {"version": STATE_VERSION, **self._settings(), "epoch": cursor["epoch"], "batch": cursor["batch"],
                "readers": [dict(r, block_start=list(r["block_start"])) for r in cursor["readers"]],
                "shard_order": self._shard_order(cursor["epoch"]), "batches_yielded": self._batches}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, value in self._settings().items():
            if state.get(key) != value:
                raise ValueError(f"data state was saved with {key}={state.get(key)!r} but this stream has "
                                 f"{key}={value!r}; resume with the same settings")
        if state["shard_order"] != self._shard_order(state["epoch"]):
            raise ValueError("data state's shard order differs from this manifest's: the dataset changed")
        self._cursor = {"epoch": state["epoch"], "batch": state["batch"],
                        "readers": [dict(r, block_start=tuple(r["block_start"])) for r in state["readers"]]}
        self._batches = state.get("batches_yielded", 0)
        self._samples = self._batches * self.context.batch_size  # every batch is full
        self.close()
        self._generation += 1
        self._resume_loaded = True

    @property
    def stats(self) -> dict:
        totals = {k: sum(c[k] for c in self._reader_counters) for k in ("skipped_shards", "skipped_samples", "wraps")}
        return {**totals, "samples": self._samples, "batches": self._batches, "epoch": self._cursor["epoch"],
                "batches_per_epoch": self.batches_per_epoch}

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        self.close()
        if self.context.one_pass and not self._resume_loaded:
            self._cursor = self._initial_cursor()
        self._resume_loaded = False
        self._generation += 1
        self._active = self._iterate(self._generation)
        return self._active

    def close(self) -> None:
        """Stop the current iteration's worker processes (a new iteration starts fresh ones)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def _reader_context(self, reader: int) -> ReaderContext:
        return ReaderContext(**{**self.context.__dict__, "reader": reader})

    def _iterate(self, generation: int):
        cursor = self._cursor
        processes, stop = [], None
        if self.num_workers == 0:
            readers = [reader_batches(self.context, cursor["readers"][0])]
        else:
            context = multiprocessing.get_context(self.mp_context)
            stop = context.Event()
            queues = [context.Queue(self.prefetch) for _ in range(self.num_workers)]
            processes = [context.Process(target=_worker_main, daemon=True,
                                         args=(self._reader_context(w), cursor["readers"][w], queues[w], stop))
                         for w in range(self.num_workers)]
            for process in processes:
                process.start()
            readers = [_drain(q, p, w) for w, (q, p) in enumerate(zip(queues, processes))]
        try:
            while True:
                schedule = epoch_plan(self.context, cursor["epoch"])[1]
                for index in range(cursor["batch"], len(schedule)):
                    reader = schedule[index]
                    batch, keys, after, counters = next(readers[reader])
                    if generation != self._generation:
                        raise RuntimeError("this BatchStream was re-iterated or reloaded; use the newest iterator")
                    readers_cursors = list(cursor["readers"])
                    readers_cursors[reader] = after
                    done = index + 1 == len(schedule)
                    cursor = {"epoch": cursor["epoch"] + done, "batch": 0 if done else index + 1,
                              "readers": readers_cursors}
                    self._cursor, self._reader_counters[reader] = cursor, counters
                    self._samples += batch.batch_size
                    self._batches += 1
                    self.last_keys = keys
                    yield batch
                if self.context.one_pass:
                    self._cursor = self._initial_cursor()
                    return
        finally:
            if stop is not None:
                stop.set()
                for process in processes:
                    process.join(timeout=5)
                    if process.is_alive():
                        process.terminate()

    def __len__(self) -> int:
        """Batches per epoch (per pass for a one-pass split), identical on every rank."""
        return self.batches_per_epoch


def _drain(q, process, reader: int):
    """Items a worker process put on its queue; raises if the worker failed or died."""
    while True:
        try:
            item = q.get(timeout=1.0)
        except queue_module.Empty:
            if not process.is_alive():
                raise RuntimeError(f"data worker {reader} exited with code {process.exitcode}") from None
            continue
        if isinstance(item, tuple) and len(item) == 2 and item[0] == "error":
            raise RuntimeError(f"data worker {reader} failed:\n{item[1]}")
        yield item


__all__ = ["BatchStream", "TaskBatch", "epoch_plan", "epoch_pieces", "reader_batches"]

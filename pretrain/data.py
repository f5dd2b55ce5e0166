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

Machinery: each reader is a loader worker of torchdata's StatefulDataLoader (what torchtitan
uses) iterating a ShardReader (an IterableDataset) whose samples come from a memory-mapped
tar expansion (data_pipeline.shards.tar_members) and webdataset's `group_by_keys`; the sampler
and the collator run in the worker. The loader snapshots every worker's cursor with each batch it hands out, so the
state is that of the consumer, never of what was prefetched. Which parts are not webdataset's
and why: docs/data.md.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import warnings
import weakref
from dataclasses import dataclass, replace

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipeline.shards import decode_sample, load_manifest, shard_file, tar_members

from .collate import TaskBatch, collate
from .objectives import ObjectiveSampler

log = logging.getLogger(__name__)
STATE_VERSION = 2
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
    n_segments: int = 0     # segments per sample in the manifest (0: plain windows)
    # Set while finishing an epoch begun under another layout: {"epoch", "world_size",
    # "num_workers", "batch"} of the saved run (see remainder_units).
    resize: dict | None = None


@dataclass(frozen=True)
class Tail:
    """Every `stride`-th (from `part`) of the samples an old reader (rank, reader of the saved
    layout) had not handed out when the run was saved: its stream's samples skip..skip+count."""
    rank: int
    reader: int
    skip: int
    count: int
    part: int
    stride: int

    @property
    def samples(self) -> int:
        return len(range(self.part, self.count, self.stride))


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


def remainder_units(ctx: ReaderContext, epoch: int) -> list[Tail]:
    """What is left of an epoch saved under another layout (world_size x num_workers), as units
    to deal to this layout's readers: every old reader's not-yet-consumed samples (known without
    communication: in lockstep every old rank had handed out resize["batch"] batches, whose
    readers the old schedule says), each cut into one interleaved part per new reader."""
    old_layout = ctx.resize
    old = replace(ctx, world_size=old_layout["world_size"], n_readers=old_layout["num_workers"], resize=None)
    stride = ctx.world_size * ctx.n_readers
    units = []
    for rank in range(old.world_size):
        _, schedule = epoch_plan(replace(old, rank=rank), epoch)
        done = schedule[:old_layout["batch"]]
        for reader in range(old.n_readers):
            skip, total = done.count(reader) * ctx.batch_size, schedule.count(reader) * ctx.batch_size
            units.extend(Tail(rank, reader, skip, total - skip, part, stride) for part in range(stride))
    return units


def epoch_plan(ctx: ReaderContext, epoch: int) -> tuple[list[list[Piece | Tail]], list[int]]:
    """(pieces of each reader of ctx.rank, schedule: reader id of each batch the rank yields)."""
    remainder = ctx.resize is not None and epoch == ctx.resize["epoch"]
    if remainder:
        pieces = remainder_units(ctx, epoch)
    else:
        pieces = epoch_pieces(ctx.shards, epoch, ctx.seed, ctx.shuffle, ctx.world_size * ctx.n_readers)
    capacity = []  # full batches each reader of each rank can form
    for rank in range(ctx.world_size):
        mine = pieces[rank::ctx.world_size]
        capacity.append([sum(p.samples for p in mine[w::ctx.n_readers]) // ctx.batch_size
                         for w in range(ctx.n_readers)])
    n_batches = min(sum(c) for c in capacity)
    if n_batches == 0 and not remainder:
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


def _sample_index(key: str) -> int | None:
    """Sample index from a key `<stem>-<index:07d>` (docs/data.md); None for a foreign name."""
    tail = key.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _piece_samples(ctx: ReaderContext, piece: Piece, start: int, counters: dict):
    """Samples of one piece from sample index `start` on, read with our tar expansion
    (data_pipeline.shards.tar_members, for speed) and webdataset's grouping by key: yields
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
    old = replace(ctx, rank=tail.rank, reader=tail.reader, world_size=ctx.resize["world_size"],
                  n_readers=ctx.resize["num_workers"], resize=None)
    pieces = epoch_plan(old, epoch)[0][tail.reader]
    index = -tail.skip
    for _, _, samples, _ in _blocks(old, epoch, pieces, start_cursor(epoch), counters):
        for sample in samples:
            if index >= tail.count:
                return
            if index >= start and index >= 0 and index % tail.stride == tail.part:
                yield (index, *sample)
            index += 1


def _pass_samples(ctx: ReaderContext, epoch: int, pieces: list, position, counters: dict):
    """Samples of one pass over `pieces` from `position`: yields (position after it, key, tokens, segments)."""
    wrap, first_piece, first_member = position
    for piece_index in range(first_piece, len(pieces)):
        start = first_member if piece_index == first_piece else 0
        piece = pieces[piece_index]
        samples = (_tail_samples(ctx, epoch, piece, start, counters) if isinstance(piece, Tail)
                   else _piece_samples(ctx, piece, start, counters))
        for index, key, tokens, segments in samples:
            yield (wrap, piece_index, index + 1), key, tokens, segments


def _blocks(ctx: ReaderContext, epoch: int, pieces: list[Piece], cursor: dict, counters: dict):
    """Shuffled blocks from the cursor's block on: yields (block index, start position, samples, end position).

    webdataset's own shuffle stage is not used: its buffer and random state cannot be saved, so a
    resumed run would see other samples. A block is a pure function of its start position and
    index, so the cursor only needs those two and the offset inside the block."""
    block, position = cursor["block"], tuple(cursor["block_start"])
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
                permutation = _rng(ctx.seed, epoch, ctx.rank, ctx.reader, block, _SEED_BLOCK).permutation(len(samples))
                samples = [samples[i] for i in permutation]
            yield block, position, samples, end
            block, position = block + 1, end
        if not found and position[1:] == (0, 0):
            shards = sorted({ctx.shards[p.shard]["path"] for p in pieces if isinstance(p, Piece)})
            raise RuntimeError(f"reader {ctx.reader} of rank {ctx.rank} found no readable sample in its "
                               f"{len(pieces)} pieces of shards {shards}")
        counters["wraps"] += 1  # corrupt data left this reader short of its quota: read its pieces again
        position = (position[0] + 1, 0, 0)


def _make_batch(ctx: ReaderContext, epoch: int, batch_index: int, samples: list) -> TaskBatch:
    """Sampler + collator on one batch of (key, tokens, segments) samples."""
    rng = _rng(ctx.seed, epoch, ctx.rank, ctx.reader, batch_index, _SEED_OBJECTIVE)
    windows = [tokens for _, tokens, _ in samples]
    if not ctx.n_segments:
        return collate(windows, [ctx.sampler(len(w), rng) for w in windows], ctx.manifest["pad_id"])
    segments = [segs for _, _, segs in samples]
    segmented = bool(ctx.sampler.config.segments)  # else the rules ignore segments; the model still sees them
    specs = [ctx.sampler(len(w), rng, segment_lengths=np.bincount(s, minlength=ctx.n_segments).tolist() if segmented
                         else None) for w, s in zip(windows, segments)]
    return collate(windows, specs, ctx.manifest["pad_id"], segments=segments)


def reader_batches(ctx: ReaderContext, cursor: dict):
    """This reader's batches of the cursor's epoch from the cursor on: yields (TaskBatch, keys,
    cursor after it, counters of this iteration)."""
    counters = {"skipped_shards": 0, "skipped_samples": 0, "wraps": 0}
    epoch = cursor["epoch"]
    readers_pieces, schedule = epoch_plan(ctx, epoch)
    quota = schedule.count(ctx.reader)
    if cursor["batches"] >= quota:
        return
    blocks = _blocks(ctx, epoch, readers_pieces[ctx.reader], cursor, counters)
    block, start, samples, end = next(blocks)
    offset = cursor["offset"]
    for batch_index in range(cursor["batches"], quota):
        chosen = []
        while len(chosen) < ctx.batch_size:
            if offset == len(samples):
                block, start, samples, end = next(blocks)
                offset = 0
            chosen.append(samples[offset])
            offset += 1
        batch = _make_batch(ctx, epoch, batch_index, chosen)
        if offset == len(samples):
            after = {"epoch": epoch, "batches": batch_index + 1, "block": block + 1, "block_start": end, "offset": 0}
        else:
            after = {"epoch": epoch, "batches": batch_index + 1, "block": block, "block_start": start, "offset": offset}
        yield batch, [key for key, _, _ in chosen], after, dict(counters)
    blocks.close()


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _worker_init(worker_id: int) -> None:
    # The process that owns the loader decides when its workers stop (BatchStream.close, the
    # loader's shutdown): a SIGTERM/SIGUSR1 sent to the whole process group (a pre-emption) must
    # not kill them before the trainer has saved its checkpoint, and the trainer's own handlers,
    # inherited through fork, must not run here. One that outlives the shutdown is killed by close().
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    # A worker whose parent dies (SIGKILL, the OOM killer) must go too. torch's worker watchdog
    # is not enough: it leaves its loop, but its exit then waits for the queue's feeder thread,
    # blocked forever on a full pipe nobody reads (seen: workers alive minutes after the parent).
    # On Linux the kernel kills the worker when its parent dies (PR_SET_PDEATHSIG).
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != multiprocessing.parent_process().pid:  # it died before prctl
            os._exit(0)


def _as_is(item: dict) -> dict:
    # The loader's collate_fn: items are finished batches (numpy, made in the worker); torch's
    # default would walk every item recursively looking for arrays to convert.
    return item


_LIVE_STREAMS: "weakref.WeakSet[BatchStream]" = weakref.WeakSet()


@atexit.register
def _close_live_streams() -> None:
    # At interpreter exit torch's loader no longer shuts its workers down (it skips that once its
    # own exit hook has run) and multiprocessing's terminate() is ignored by them (_worker_init):
    # close every stream first. Registered after torch's and multiprocessing's hooks, so it runs before them.
    for stream in list(_LIVE_STREAMS):
        stream.close()


class ShardReader(IterableDataset):
    """One epoch of one rank's batches; in a loader worker, the share of reader `worker id`.

    Each item is a dict: batch (TaskBatch), keys, reader, counters. state_dict() is this
    reader's cursor after the last batch it yielded (StatefulDataLoader takes it in the worker)."""

    def __init__(self, context: ReaderContext):
        self.context = context
        self.epoch = 0
        self._cursor: dict | None = None  # after the last batch yielded
        self._resume: dict | None = None  # a loaded cursor, used by the next iteration only

    def __iter__(self):
        info = get_worker_info()
        reader = 0 if info is None else info.id
        ctx = ReaderContext(**{**self.context.__dict__, "reader": reader})
        cursor, self._resume = self._resume, None
        self._cursor = cursor
        for batch, keys, after, counters in reader_batches(ctx, cursor or start_cursor(self.epoch)):
            self._cursor = after
            yield {"batch": batch, "keys": keys, "reader": reader, "counters": counters}

    def state_dict(self) -> dict:
        return {"cursor": None if self._cursor is None else dict(self._cursor, block_start=list(self._cursor["block_start"]))}

    def load_state_dict(self, state: dict) -> None:
        cursor = state["cursor"]
        self._resume = None if cursor is None else dict(cursor, block_start=tuple(cursor["block_start"]))
        self._cursor = self._resume


_COUNTERS = ("skipped_shards", "skipped_samples", "wraps")


class BatchStream:
    """Batches (numpy TaskBatch) from a manifest's split; see the module docstring for the order.

    A ShardReader served by torchdata's StatefulDataLoader (num_workers processes, or none).
    split="train" loops over epochs forever; any other split makes one pass per iteration.
    state_dict() after k consumed batches resumes at batch k + 1 (same settings required)."""

    def __init__(self, manifest_path, split: str = "train", sampler: ObjectiveSampler | None = None,
                 batch_size: int = 8, rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1024, prefetch: int = 4, mp_context: str | None = None,
                 allow_external_shards: bool = False):
        self.manifest = load_manifest(manifest_path, allow_external_shards)
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
        sampler = sampler or ObjectiveSampler("biglearn")
        n_segments = len(self.manifest.get("segments") or [])
        if sampler.config.segments and len(sampler.config.segments) != n_segments:
            raise ValueError(f"objective.segments has {len(sampler.config.segments)} rules but {manifest_path} has "
                             f"{n_segments} segments ({self.manifest.get('segments')}); give one rule per segment")
        self.split, self.num_workers = split, num_workers
        self.pad_id = int(self.manifest["pad_id"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.seq_len = int(self.manifest["seq_len"])
        self.n_segments = n_segments
        self.context = ReaderContext(
            manifest=self.manifest, shards=self.shards, sampler=sampler, batch_size=batch_size, rank=rank,
            world_size=world_size, n_readers=max(1, num_workers), reader=0, seed=seed, shuffle=shuffle,
            shuffle_buffer=shuffle_buffer, one_pass=split != "train", n_segments=n_segments)
        self.batches_per_epoch = len(epoch_plan(self.context, 0)[1])  # same on every rank
        self.dataset = ShardReader(self.context)
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch function torch 2.6+ deprecates
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self.loader = StatefulDataLoader(
                self.dataset, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
                prefetch_factor=prefetch if num_workers else None, worker_init_fn=_worker_init, multiprocessing_context=mp_context if num_workers else None)
        self.last_keys: list[str] = []  # sample keys of the batch handed out last
        self._epoch = self._batch = self._batches = 0
        self._loaded = False  # load_state_dict was called: the next iteration continues from it
        self._loader_state = None  # the loader's state of this epoch's batches handed out, when not iterating
        self._remainder_length = (None, 0)  # cache of _epoch_length for a resized epoch
        self._counters = dict.fromkeys(_COUNTERS, 0)  # totals of finished epochs
        self._epoch_counters: dict[int, dict] = {}   # this epoch's latest counters per reader
        self._iterator = None
        self._generation = 0  # a new iteration retires the previous one (and its workers)
        _LIVE_STREAMS.add(self)

    # ------------------------------------------------------------------ state
    def _settings(self) -> dict:
        """Settings a saved state must share with this stream (the layout may differ)."""
        c = self.context
        return {"split": self.split, "seed": c.seed, "batch_size": c.batch_size, "shuffle": c.shuffle,
                "shuffle_buffer": c.shuffle_buffer}

    def _layout(self) -> dict:
        c = self.context
        return {"rank": c.rank, "world_size": c.world_size, "num_workers": c.n_readers}

    def _dataset_digest(self) -> str:
        entries = [[s["path"], s["samples"], s["bytes"], s.get("sha256")] for s in self.shards]
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()

    def _epoch_length(self) -> int:
        """Batches of the current epoch per rank: a full epoch, or the remainder of a resized one."""
        if self.context.resize is None or self.context.resize["epoch"] != self._epoch:
            return self.batches_per_epoch
        key = (self._epoch, json.dumps(self.context.resize))
        if self._remainder_length[0] != key:
            self._remainder_length = (key, len(epoch_plan(self.context, self._epoch)[1]))
        return self._remainder_length[1]

    def state_dict(self) -> dict:
        """Small picklable cursor: settings, layout, epoch, batch in epoch (the global cursor: every
        rank has handed out that many), the loader's state (every reader's cursor after the batches
        handed out, not those prefetched), the layout an unfinished resized epoch came from."""
        loader = None
        if self._batch:
            loader = self.loader.state_dict() if self._iterator is not None else self._loader_state
        resize = self.context.resize if self.context.resize and self.context.resize["epoch"] == self._epoch else None
        return {"version": STATE_VERSION, **self._settings(), **self._layout(), "epoch": self._epoch,
                "batch": self._batch, "loader": loader, "resize": resize, "dataset": self._dataset_digest(),
                "batches_yielded": self._batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped. A state from another layout (world_size x num_workers;
        any rank's state will do) continues its epoch: the samples its ranks had not handed out
        are dealt to this layout's readers (docs/data.md says what is preserved)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, value in self._settings().items():
            if state.get(key) != value:
                raise ValueError(f"data state was saved with {key}={state.get(key)!r} but this stream has "
                                 f"{key}={value!r}; resume with the same settings")
        if state["dataset"] != self._dataset_digest():
            raise ValueError("data state was saved on other shards (paths, sizes or checksums differ): "
                             "the dataset changed")
        same_layout = all(state[k] == v for k, v in self._layout().items() if k != "rank")
        if same_layout and state["rank"] != self.context.rank:
            raise ValueError(f"data state of rank {state['rank']} given to rank {self.context.rank} of the same layout")
        resize, loader, batch = state["resize"], state["loader"], state["batch"]
        if not same_layout:
            if batch and resize is not None:
                raise ValueError(f"epoch {state['epoch']} was already resumed once on another layout; finish it on "
                                 f"world_size={state['world_size']}, num_workers={state['num_workers']} first")
            resize = {"epoch": state["epoch"], "world_size": state["world_size"],
                      "num_workers": state["num_workers"], "batch": batch} if batch else None
            loader, batch = None, 0
        self.close()
        self.context.resize = resize  # ShardReader shares this context; workers get a copy at each iteration
        self._epoch, self._batch, self._batches = state["epoch"], batch, state.get("batches_yielded", 0)
        self._loader_state = loader
        self._loaded = True

    @property
    def stats(self) -> dict:
        totals = {k: self._counters[k] + sum(c[k] for c in self._epoch_counters.values()) for k in _COUNTERS}
        return {**totals, "samples": self._batches * self.context.batch_size, "batches": self._batches,
                "epoch": self._epoch, "batches_per_epoch": self.batches_per_epoch}

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        self.close()
        if self.context.one_pass and not self._loaded:
            self._epoch = self._batch = 0
            self._loader_state = None
        self._loaded = False
        self._generation += 1
        return self._iterate(self._generation)

    def close(self) -> None:
        """Stop the current iteration's worker processes (a new iteration starts fresh ones)."""
        iterator = self._iterator
        if iterator is None:
            return
        if self._batch:  # a later iteration continues from here
            self._loader_state = self.loader.state_dict()
        self._iterator = None
        workers = list(getattr(iterator, "_workers", []))
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # what the iterator's __del__ does; done now, not at garbage collection
        for worker in workers:  # its terminate() is ignored by design (see _worker_init)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)

    def _iterate(self, generation: int):
        while True:
            if self._epoch_length() == 0:  # a resized epoch with nothing left for a full batch on every rank
                self._end_epoch()
                continue
            self.dataset.epoch = self._epoch  # workers get the dataset (and so the epoch) when the iterator starts
            self.loader.load_state_dict(self._loader_state or {})
            self._iterator = iter(self.loader)
            for item in self._iterator:
                if generation != self._generation:
                    raise RuntimeError("this BatchStream was re-iterated or reloaded; use the newest iterator")
                self._epoch_counters[item["reader"]] = item["counters"]
                self._batch += 1
                self._batches += 1
                self.last_keys = item["keys"]
                if self._batch == self._epoch_length():
                    self._end_epoch()
                yield item["batch"]
                if self._batch == 0:
                    break
            if self.context.one_pass:
                self._epoch = 0
                return

    def _end_epoch(self) -> None:
        """The epoch's last batch was handed out: the state now points at the next epoch."""
        self.close()
        for counters in self._epoch_counters.values():
            for key in _COUNTERS:
                self._counters[key] += counters[key]
        self._epoch_counters = {}
        if self.context.resize is not None and self.context.resize["epoch"] <= self._epoch:
            self.context.resize = None
        self._epoch += 1
        self._batch = 0
        self._loader_state = None

    def __len__(self) -> int:
        """Batches per epoch (per pass for a one-pass split), identical on every rank."""
        return self.batches_per_epoch


__all__ = ["BatchStream", "ShardReader", "TaskBatch", "epoch_plan", "epoch_pieces", "reader_batches"]

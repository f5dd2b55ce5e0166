"""The read plan of an epoch, and the typed cursors that make it exactly resumable.

How one epoch is laid out (everything is a pure function of the manifest, seed, epoch, rank and
reader index, so every rank can compute every other rank's plan without communicating):

1. The split's shards become *pieces*. Normally a piece is a whole shard; when there are fewer
   shards than readers (world_size x workers) each shard is cut into `stride` interleaved pieces
   (members i with i % stride == part) so that every reader gets data.
2. Pieces are shuffled with rng(seed, epoch) (same order on every rank), dealt to ranks
   (pieces[rank::world_size]) and then to that rank's readers ([worker::num_workers]).
3. A reader streams its pieces, cuts the stream into blocks of `shuffle_buffer` samples, permutes
   each block with rng(seed, epoch, rank, reader, block), and forms batches; the objective sampler
   uses rng(seed, epoch, rank, reader, batch). Its place is a `Cursor`.
4. Every rank yields the same number of batches per epoch: min over ranks of the full batches its
   readers can form (from the manifest's sample counts); readers are visited round robin.

Cursors are frozen dataclasses in memory and plain dicts in a checkpoint (`to_dict` /
`from_dict`): the per-rank train state is read back with torch's weights-only unpickler, which
accepts plain containers only (pretrain.checkpoint.sharded).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np

from ..objectives import ObjectiveSampler

_SEED_SHUFFLE, _SEED_BLOCK, _SEED_OBJECTIVE = 11, 12, 13  # domain tags for the seed sequences


def rng(*keys) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


class Position(NamedTuple):
    """A place in one reader's stream: pass over its pieces (`wrap`), piece, member index."""
    wrap: int = 0
    piece: int = 0
    member: int = 0


@dataclass(frozen=True)
class Cursor:
    """Where a reader is in an epoch: `batches` handed out; the current shuffle block is number
    `block`, starts at `block_start`, and `offset` of its samples are used. A block is a pure
    function of its start and index, so these five numbers restore the reader exactly."""
    epoch: int
    batches: int = 0
    block: int = 0
    block_start: Position = Position()
    offset: int = 0

    def to_dict(self) -> dict:
        return {**asdict(self), "block_start": list(self.block_start)}

    @classmethod
    def from_dict(cls, state: dict) -> "Cursor":
        return cls(state["epoch"], state["batches"], state["block"], Position(*state["block_start"]), state["offset"])


@dataclass(frozen=True)
class Resize:
    """An epoch saved under another layout (world_size x num_workers), `batch` batches into it,
    that this run finishes (remainder_units)."""
    epoch: int
    world_size: int
    num_workers: int
    batch: int

    @classmethod
    def from_dict(cls, state: dict | None) -> "Resize | None":
        return None if state is None else cls(**state)


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
    resize: Resize | None = None  # set while finishing an epoch begun under another layout


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


def epoch_pieces(shards: list, epoch: int, seed: int, shuffle: bool, n_units: int) -> list[Piece]:
    """All pieces of the split in this epoch's global order."""
    stride = -(-n_units // len(shards)) if len(shards) < n_units else 1
    pieces = [Piece(i, part, stride, len(range(part, entry["samples"], stride)))
              for i, entry in enumerate(shards) for part in range(stride)]
    if shuffle:
        pieces = [pieces[i] for i in rng(seed, epoch, _SEED_SHUFFLE).permutation(len(pieces))]
    return pieces


def old_layout(ctx: ReaderContext, rank: int) -> ReaderContext:
    """The context rank `rank` had in the layout ctx.resize was saved under."""
    return replace(ctx, rank=rank, world_size=ctx.resize.world_size, n_readers=ctx.resize.num_workers, resize=None)


def remainder_units(ctx: ReaderContext, epoch: int) -> list[Tail]:
    """What is left of an epoch saved under another layout, as units to deal to this layout's
    readers: every old reader's not-yet-consumed samples (known without communication: in
    lockstep every old rank had handed out ctx.resize.batch batches, whose readers the old
    schedule says), each cut into one interleaved part per new reader."""
    stride = ctx.world_size * ctx.n_readers
    units = []
    for rank in range(ctx.resize.world_size):
        old = old_layout(ctx, rank)
        _, schedule = epoch_plan(old, epoch)
        done = schedule[:ctx.resize.batch]
        for reader in range(old.n_readers):
            skip, total = done.count(reader) * ctx.batch_size, schedule.count(reader) * ctx.batch_size
            units.extend(Tail(rank, reader, skip, total - skip, part, stride) for part in range(stride))
    return units


def epoch_plan(ctx: ReaderContext, epoch: int) -> tuple[list[list[Piece | Tail]], list[int]]:
    """(pieces of each reader of ctx.rank, schedule: reader id of each batch the rank yields)."""
    remainder = ctx.resize is not None and epoch == ctx.resize.epoch
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

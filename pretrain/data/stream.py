"""BatchStream: a manifest's split as numpy TaskBatches, split by rank and worker, exactly resumable.

The read plan is pretrain.data.plan's; each reader is a pretrain.data.reader.ShardReader run in
a worker of torchdata's StatefulDataLoader, which snapshots every worker's cursor with each
batch it hands out, so the saved state is that of the consumer, never of what was prefetched.
The stream's own state is a `StreamState` (settings, layout, global cursor).
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import warnings
import weakref
from dataclasses import asdict, dataclass

from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipeline.manifest import load_manifest

from ..objectives import ObjectiveSampler
from .plan import ReaderContext, Resize, epoch_plan
from .reader import ShardReader, UnreadableData

STATE_VERSION = 2


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _worker_init(worker_id: int) -> None:
    # The process that owns the loader decides when its workers stop (BatchStream.close, the
    # loader's shutdown): a SIGTERM/SIGUSR1 sent to the whole process group (a pre-emption) or a
    # Ctrl-C's SIGINT must not kill them before the trainer has saved its checkpoint, and the
    # trainer's own handlers, inherited through fork, must not run here. One that outlives the
    # shutdown is killed by close().
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
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


_COUNTERS = ("skipped_shards", "skipped_samples", "wraps")


@dataclass(frozen=True)
class StreamState:
    """What a BatchStream saves (as plain types, `to_dict`) and checks when it resumes."""
    SETTINGS = ("split", "seed", "batch_size", "shuffle", "shuffle_buffer")  # a resumed stream must share these

    split: str
    seed: int
    batch_size: int
    shuffle: bool
    shuffle_buffer: int
    rank: int
    world_size: int
    num_workers: int
    dataset: str  # sha256 of the split's shard list (paths, sizes, checksums)
    epoch: int = 0
    batch: int = 0  # batches of this epoch handed out by every rank
    loader: dict | None = None  # StatefulDataLoader's state: each reader's Cursor
    resize: Resize | None = None
    batches_yielded: int = 0
    version: int = STATE_VERSION

    def to_dict(self) -> dict:
        return {**asdict(self), "resize": None if self.resize is None else asdict(self.resize)}

    @classmethod
    def from_dict(cls, state: dict) -> "StreamState":
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(names - {"batches_yielded"} - set(state))
        if missing:
            raise ValueError(f"data state lacks {missing}")
        return cls(**{**{k: v for k, v in state.items() if k in names}, "resize": Resize.from_dict(state["resize"])})


def _reraised_in_one_line(items):
    """`items`, with an UnreadableData re-raised by the loader from a worker (its message then
    carries the worker's traceback) turned back into the worker's one-line message."""
    try:
        yield from items
    except UnreadableData as err:
        last = str(err).strip().splitlines()[-1]
        raise UnreadableData(last.split(f"{UnreadableData.__name__}: ", 1)[-1]) from None


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
    def _state(self, **changes) -> StreamState:
        c = self.context
        return StreamState(split=self.split, seed=c.seed, batch_size=c.batch_size, shuffle=c.shuffle,
                           shuffle_buffer=c.shuffle_buffer, rank=c.rank, world_size=c.world_size,
                           num_workers=c.n_readers, dataset=self._dataset_digest(), **changes)

    def _dataset_digest(self) -> str:
        entries = [[s["path"], s["samples"], s["bytes"], s.get("sha256")] for s in self.shards]
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()

    def _epoch_length(self) -> int:
        """Batches of the current epoch per rank: a full epoch, or the remainder of a resized one."""
        if self.context.resize is None or self.context.resize.epoch != self._epoch:
            return self.batches_per_epoch
        key = (self._epoch, self.context.resize)
        if self._remainder_length[0] != key:
            self._remainder_length = (key, len(epoch_plan(self.context, self._epoch)[1]))
        return self._remainder_length[1]

    def state_dict(self) -> dict:
        """StreamState as plain types: settings, layout, epoch, batch in epoch (the global cursor:
        every rank has handed out that many), the loader's state (every reader's cursor after the
        batches handed out, not those prefetched), the layout an unfinished resized epoch came from."""
        loader = None
        if self._batch:
            loader = self.loader.state_dict() if self._iterator is not None else self._loader_state
        resize = self.context.resize if self.context.resize and self.context.resize.epoch == self._epoch else None
        return self._state(epoch=self._epoch, batch=self._batch, loader=loader, resize=resize,
                           batches_yielded=self._batches).to_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped. A state from another layout (world_size x num_workers;
        any rank's state will do) continues its epoch: the samples its ranks had not handed out
        are dealt to this layout's readers (docs/data.md says what is preserved)."""
        saved, mine = StreamState.from_dict(state), self._state()
        for key in StreamState.SETTINGS:
            if getattr(saved, key) != getattr(mine, key):
                raise ValueError(f"data state was saved with {key}={getattr(saved, key)!r} but this stream has "
                                 f"{key}={getattr(mine, key)!r}; resume with the same settings")
        if saved.dataset != mine.dataset:
            raise ValueError("data state was saved on other shards (paths, sizes or checksums differ): "
                             "the dataset changed")
        same_layout = (saved.world_size, saved.num_workers) == (mine.world_size, mine.num_workers)
        if same_layout and saved.rank != mine.rank:
            raise ValueError(f"data state of rank {saved.rank} given to rank {mine.rank} of the same layout")
        resize, loader, batch = saved.resize, saved.loader, saved.batch
        if not same_layout:
            if batch and resize is not None:
                raise ValueError(f"epoch {saved.epoch} was already resumed once on another layout; finish it on "
                                 f"world_size={saved.world_size}, num_workers={saved.num_workers} first")
            resize = Resize(saved.epoch, saved.world_size, saved.num_workers, batch) if batch else None
            loader, batch = None, 0
        self.close()
        self.context.resize = resize  # ShardReader shares this context; workers get a copy at each iteration
        self._epoch, self._batch, self._batches = saved.epoch, batch, saved.batches_yielded
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
            for item in _reraised_in_one_line(self._iterator):
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
        if self.context.resize is not None and self.context.resize.epoch <= self._epoch:
            self.context.resize = None
        self._epoch += 1
        self._batch = 0
        self._loader_state = None

    def __len__(self) -> int:
        """Batches per epoch (per pass for a one-pass split), identical on every rank."""
        return self.batches_per_epoch

"""Weighted mixing of several token datasets (`data.sources`), deterministic and resumable.

Each source is a BatchStream of its own (its own plan, workers and exact cursor). Batch i of
the mix comes whole from source s_i, drawn with probabilities proportional to the weights from
rng(seed, i) — the same draw on every rank, so every rank takes the same number of batches
from each source and ranks stay in lockstep. Mixing whole batches (not samples) keeps every
batch of one dataset and one window length, and makes the state just the batch index plus each
source's own state.
"""
from __future__ import annotations

import math

import numpy as np

from .stream import BatchStream


def _same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two manifests' tokenizers map the same: equal recorded sha256, or (records written
    before tokenizer identities hold a file's hash) the identities of the copies they carry."""
    from data_pipeline.tokenizer import Tokenizer

    if a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]:
        return True
    try:
        return Tokenizer.load(a["root"]).sha256 == Tokenizer.load(b["root"]).sha256
    except ValueError:
        return False

_SEED_MIX = 14  # domain tag of the source draws (pretrain.data.plan uses 11..13)


class MixedStream:
    """Batches from `sources` = [(manifest path, weight), ...]; the other arguments are those of
    BatchStream and apply to every source. Same interface as BatchStream (no __len__: a mix has no
    epoch of its own; stats["epoch"] is the least epoch reached by a source)."""

    def __init__(self, sources, split: str = "train", seed: int = 0, **stream_args):
        if not sources:
            raise ValueError("data.sources: give at least one {manifest: PATH, weight: W}")
        weights = []
        for i, (_, weight) in enumerate(sources):
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ValueError(f"data.sources[{i}].weight must be a finite number >= 0; got {weight!r}")
            weights.append(float(weight))
        if max(weights) <= 0:
            raise ValueError("data.sources: the weights must not all be zero")
        self.paths = [str(path) for path, _ in sources]
        scaled = np.array(weights) / max(weights)  # first: a sum of weights near 1e308 would overflow to inf
        self.weights = scaled / scaled.sum()
        self.streams = [BatchStream(path, split=split, seed=seed, **stream_args) for path, _ in sources]
        first = self.streams[0]
        for path, stream in zip(self.paths[1:], self.streams[1:]):
            for key in ("sha256", "vocab_size", "pad_id"):
                if key == "sha256" and _same_tokenizer(stream.manifest, first.manifest):
                    continue
                if stream.manifest["tokenizer"][key] != first.manifest["tokenizer"][key]:
                    raise ValueError(f"data.sources: {path} was built with another tokenizer than {self.paths[0]} "
                                     f"({key} {stream.manifest['tokenizer'][key]} vs {first.manifest['tokenizer'][key]})")
            if stream.n_segments != first.n_segments:
                raise ValueError(f"data.sources: {path} has {stream.n_segments} segments per sample, "
                                 f"{self.paths[0]} has {first.n_segments}")
        self.seed = seed
        self.manifest, self.pad_id, self.vocab_size = first.manifest, first.pad_id, first.vocab_size
        self.n_segments = first.n_segments
        self.seq_len = max(stream.seq_len for stream in self.streams)
        self.last_keys: list[str] = []
        self._batch = 0
        self._tokens = [0] * len(self.streams)
        self._iterators = None

    def source_of(self, batch_index: int) -> int:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SEED_MIX, batch_index]))
        return int(rng.choice(len(self.weights), p=self.weights))

    def __iter__(self):
        self.close()
        self._iterators = [iter(stream) for stream in self.streams]
        return self._iterate(self._iterators)

    def _iterate(self, iterators):
        while True:
            source = self.source_of(self._batch)
            batch = next(iterators[source])
            self._batch += 1
            self._tokens[source] += batch.batch_size * self.streams[source].seq_len
            self.last_keys = self.streams[source].last_keys
            yield batch

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self._iterators = None

    def state_dict(self) -> dict:
        return {"mix": {"paths": self.paths, "weights": self.weights.tolist(), "batch": self._batch,
                        "tokens": list(self._tokens)},
                "sources": [stream.state_dict() for stream in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        mix = state.get("mix")
        if mix is None or len(mix["paths"]) != len(self.paths) or not np.allclose(mix["weights"], self.weights):
            raise ValueError(f"data state was saved with sources {mix and list(zip(mix['paths'], mix['weights']))}, "
                             f"this run mixes {list(zip(self.paths, self.weights.tolist()))}; resume with the same "
                             "sources and weights")
        for stream, source_state in zip(self.streams, state["sources"]):
            stream.load_state_dict(source_state)
        self._batch, self._tokens = mix["batch"], list(mix["tokens"])

    @property
    def stats(self) -> dict:
        per_source = [stream.stats for stream in self.streams]
        totals = {key: sum(s[key] for s in per_source) for key in ("skipped_shards", "skipped_samples", "wraps",
                                                                   "samples", "batches")}
        return {**totals, "epoch": min(s["epoch"] for s in per_source),
                "tokens_per_source": dict(zip(self.paths, self._tokens))}


def open_train_stream(data, sampler, manifest, rank: int, world_size: int):
    """The training stream a data config asks for (the trainer's one entry point into the data
    path): the manifest's BatchStream, or the weighted MixedStream of `data.sources`."""
    common = dict(split="train", sampler=sampler, batch_size=data.batch_size, rank=rank, world_size=world_size,
                  num_workers=data.num_workers, seed=data.seed, shuffle=data.shuffle,
                  allow_external_shards=data.allow_external_shards)
    if data.sources:
        return MixedStream([(source.manifest, source.weight) for source in data.sources], **common)
    return BatchStream(manifest, **common)


def data_counters(stream) -> dict:
    """What the metrics and the end-of-run summary report about the data: skipped shards and
    samples, wraps, and tokens per source for a mix."""
    stats = stream.stats
    keys = ("skipped_shards", "skipped_samples", "wraps", "tokens_per_source")
    return {key: stats[key] for key in keys if key in stats}

"""DataConfig: which data a run reads and how (the `data` group of configs/), checked when made."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.errors import require

DATA_KINDS = ("demo", "manifest")


@dataclass
class DataSource:
    manifest: str = "???"
    weight: float = 1.0


@dataclass
class DataConfig:
    kind: str = "demo"  # "demo": build tokenizer + shards from the stdlib corpus; "manifest": use `manifest`
    manifest: str | None = None  # manifest written by data_pipeline (kind=manifest)
    demo_dir: str = "runs/demo_data"  # where kind=demo builds its data (reused when already built)
    demo_vocab_size: int = 2048
    demo_seq_len: int = 128
    demo_max_files: int = 0  # > 0: build the demo corpus from this many stdlib files only (faster)
    batch_size: int = 8  # micro-batch per rank
    num_workers: int = 0
    seed: int = 0
    shuffle: bool = True
    # Weighted mix of datasets (pretrain.data.mixing), used instead of `manifest` when given:
    # [{manifest: PATH, weight: W}, ...]; all built with the same tokenizer.
    sources: list[DataSource] = field(default_factory=list)
    allow_external_shards: bool = False  # accept manifest shard paths outside the manifest's directory

    def __post_init__(self):
        require(self.kind in DATA_KINDS, "data.kind", f"must be one of {DATA_KINDS}", self.kind)
        if self.kind == "manifest" and not self.sources:
            require(bool(self.manifest), "data.manifest", "must name a manifest file when data.kind=manifest",
                    self.manifest)
        for i, source in enumerate(self.sources):
            weight = source.weight if isinstance(source, DataSource) else None
            require(weight is not None and weight >= 0, f"data.sources[{i}].weight", "must be >= 0", weight)
        require(self.demo_max_files >= 0, "data.demo_max_files", "must be >= 0 (0 = every file)", self.demo_max_files)
        for key in ("batch_size", "demo_vocab_size", "demo_seq_len"):
            require(getattr(self, key) >= 1, f"data.{key}", "must be >= 1", getattr(self, key))
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)

    def manifest_path(self) -> Path:
        """The manifest whose tokenizer and validation split the run uses: the first source of a
        mix, data.manifest, or for kind=demo the one the demo build writes (or wrote) in
        data.demo_dir, one directory per vocabulary, window length and corpus size."""
        if self.sources:
            return Path(self.sources[0].manifest)
        if self.kind == "manifest":
            return Path(self.manifest)
        from data_pipeline import MANIFEST
        return self.demo_data_dir() / MANIFEST

    def demo_data_dir(self) -> Path:
        return Path(self.demo_dir) / (f"vocab{self.demo_vocab_size}_len{self.demo_seq_len}"
                                      + (f"_files{self.demo_max_files}" if self.demo_max_files else ""))

"""TrainConfig: the pretraining run's configuration, composed from configs/ (train.yaml and the
groups model/, objective/, data/, deepspeed/, trainer/, eval/, experiment/).

Each component owns its schema and checks it when made (ModelConfig, ObjectiveConfig,
DataConfig, DeepSpeedConfig, TrainerConfig, EvalConfig); TrainConfig composes them. What the
data decides (the tokenizer's vocabulary size and BOS id, the manifest's segments, or an
export's architecture with model.init) is set by `resolve`, once, before the run uses the
config: `python -m pretrain.train --cfg` prints exactly what `train` runs with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from data_pipeline.errors import UserError, require

from ..data import DataConfig
from ..model import ModelConfig
from ..objectives import ObjectiveConfig
from .composition import CONFIG_DIR, check_finite, load
from .engine import DeepSpeedConfig
from .evaluate import EvalConfig
from .trainer import TrainerConfig

GROUPS = ("model", "objective", "data", "deepspeed", "trainer", "eval", "experiment")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_name: str = "run"
    run_dir: str | None = None  # default: runs/slurm-<SLURM_JOB_ID>, else runs/<run_name>
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir if any; never; or a checkpoint path

    def __post_init__(self):
        check_finite(self)
        require(self.resume != "", "resume", "must be 'auto', 'never' or a checkpoint path", self.resume)
        require(bool(self.run_name) and "/" not in self.run_name, "run_name", "must be a non-empty name without '/'",
                self.run_name)


def load_config(overrides: list[str] | tuple[str, ...] = (), config_dir: Path | str = CONFIG_DIR) -> TrainConfig:
    """configs/train.yaml composed with command-line overrides, checked against TrainConfig."""
    return load(overrides, cls=TrainConfig, config_name="train", config_dir=config_dir)


def available_options(config_dir: Path | str = CONFIG_DIR) -> dict[str, list[str]]:
    """{group: [option, ...]} for --help."""
    root = Path(config_dir)
    return {group: sorted(p.stem for p in (root / group).glob("*.yaml")) for group in GROUPS if (root / group).is_dir()}


def resolve_run_dir(config: TrainConfig, environ=os.environ) -> Path:
    """run_dir when given, else runs/slurm-<job id> under SLURM (a requeued job keeps its id, so it
    resumes in place), else runs/<run_name>. Never time-based: every rank must derive the same path."""
    if config.run_dir:
        return Path(config.run_dir)
    if environ.get("SLURM_JOB_ID"):
        return Path("runs") / f"slurm-{environ['SLURM_JOB_ID']}"
    return Path("runs") / config.run_name


def _manifests(data: DataConfig) -> list[Path]:
    return [Path(s.manifest) for s in data.sources] if data.sources else [data.manifest_path()]


def resolve(config: TrainConfig) -> tuple[TrainConfig, str]:
    """The config as the run uses it, and a line saying where the data-decided keys come from:
    model.vocab_size, model.bos_id (the tokenizer's) and model.n_segment_types (at least the
    manifest's segments), or with model.init the export's architecture. Refuses windows longer than
    model.max_seq_len. Before the demo data is built, its tokenizer is the one the build will
    make (data.demo_vocab_size, the standard special ids). The result is a new, checked config."""
    import data_pipeline
    from data_pipeline.tokenizer import SPECIAL_IDS

    from ..checkpoint.export import init_config

    d, model = config.data, config.model
    manifests = _manifests(d)
    if all(path.is_file() for path in manifests):
        loaded = [data_pipeline.load_manifest(path, d.allow_external_shards) for path in manifests]
        tokenizer = loaded[0]["tokenizer"]
        vocab, bos, sha256 = int(tokenizer["vocab_size"]), int(tokenizer["bos_id"]), tokenizer["sha256"]
        seq_len = max(int(m["seq_len"]) for m in loaded)
        segments = len(loaded[0].get("segments") or [])
        origin = f"{manifests[0]}, the data's tokenizer"
    elif d.kind == "demo" and not d.sources:  # not built yet: data_pipeline.build_demo makes exactly this tokenizer
        vocab, bos, sha256, seq_len, segments = d.demo_vocab_size, SPECIAL_IDS["bos_id"], None, d.demo_seq_len, 0
        origin = f"data.demo_vocab_size (built into {manifests[0].parent})"
    else:
        index, missing = next((i, path) for i, path in enumerate(manifests) if not path.is_file())
        key = f"data.sources[{index}].manifest" if d.sources else "data.manifest"
        raise UserError(f"{key}: {missing} does not exist")
    if model.init:  # architecture and weights of an export (docs/hf.md)
        resolved = init_config(model, vocab, sha256)
        note = f"model: architecture and vocabulary from the export model.init={model.init}"
    else:
        resolved = replace(model, vocab_size=vocab, bos_id=bos, n_segment_types=max(model.n_segment_types, segments))
        note = (f"model.vocab_size: {vocab}, model.bos_id: {bos} from {origin} "
                f"(configured: {model.vocab_size}, {model.bos_id})")
    if seq_len > resolved.max_seq_len:
        raise UserError(f"model.max_seq_len={resolved.max_seq_len} is shorter than the data's windows "
                        f"({seq_len} tokens, {manifests[0]})")
    return replace(config, model=resolved), note

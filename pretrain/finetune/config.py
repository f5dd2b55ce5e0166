"""FinetuneConfig: a fine-tuning run (configs/finetune.yaml), checked when made.

The loop's knobs are the Trainer's own TrainerConfig (`trainer.lr`, `trainer.epochs`, ...) with
fine-tuning's defaults, and the engine's DeepSpeedConfig: declared once, shared with pretraining.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from data_pipeline.errors import require

from ..objectives import ObjectiveConfig, SegmentRule
from ..train.composition import load, to_dict, to_schema
from ..train.engine import DeepSpeedConfig
from ..train.trainer import TrainerConfig

FINETUNE_STRATEGIES = ("ft", "biglearn")


@dataclass
class FinetuneData:
    train: str = ""
    dev: str = ""
    text_field: str = "text"        # JSONL key / TSV header column of the text
    pair_field: str = "text_pair"   # second sentence of a pair task (optional column)
    label_field: str = "label"
    labels: list[str] | None = None  # label names in slot order; None = sorted names seen in train
    max_len: int = 128              # tokens per sample, label slot included (longer text is cut)
    batch_size: int = 16            # examples per rank and micro-batch

    def __post_init__(self):
        require(self.max_len >= 3, "data.max_len", "must be >= 3", self.max_len)
        require(self.batch_size >= 1, "data.batch_size", "must be >= 1", self.batch_size)


def default_objective() -> ObjectiveConfig:
    """q(S', T') for the big-learning term: the label segment is given 20% / predicted last 40%
    of the time, else it joins the random big-learning split of the text."""
    return ObjectiveConfig(name="biglearn", segments=[SegmentRule(p_source=0.2, p_target=0.4), SegmentRule()])


def default_trainer() -> TrainerConfig:
    """AdamW with beta2 0.999 (the usual fine-tuning recipe), cosine decay to zero, a record per
    step, a checkpoint only at the end. lr 5e-4 for 6 epochs: the best of the sweep in
    docs/capabilities.md (a 420-example task on the demo's model), where the earlier default, 4e-5
    for 3 epochs, stayed below the majority class."""
    return TrainerConfig(max_steps=0, epochs=6, lr=5e-4, min_lr_ratio=0.0, warmup_steps=0, weight_decay=0.01,
                         beta2=0.999, log_every=1, eval_every=0, save_every=0, keep_last=2, loggers=["jsonl"])


def default_deepspeed() -> DeepSpeedConfig:
    return DeepSpeedConfig(zero_stage=0, precision="fp32")


@dataclass
class FinetuneConfig:
    data: FinetuneData = field(default_factory=FinetuneData)
    tokenizer: str = ""             # ours (a directory), an HF tokenizer.json or a sentencepiece .model
    init: str | None = None         # exported model or checkpoint to start from; None = a fresh `model`
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields for a fresh model
    strategy: str = "biglearn"
    beta: float = 0.0
    trainer: TrainerConfig = field(default_factory=default_trainer)
    deepspeed: DeepSpeedConfig = field(default_factory=default_deepspeed)
    out: str = "runs/finetune"      # run directory: metrics.jsonl, checkpoints/, result.json, model/
    resume: str = "auto"            # auto: continue from the newest complete checkpoint in `out`; never
    save_model: bool = True         # exported classifier in out/model (label layout in its metadata)
    objective: ObjectiveConfig = field(default_factory=default_objective)
    sweep: list[dict[str, Any]] = field(default_factory=list)  # one run per entry of overrides, in out/run_<i>

    def __post_init__(self):
        require(self.strategy in FINETUNE_STRATEGIES, "strategy", f"must be one of {FINETUNE_STRATEGIES}",
                self.strategy)
        require(math.isfinite(self.beta) and self.beta >= 0, "beta", "must be >= 0", self.beta)
        require(self.strategy == "biglearn" or self.beta == 0, "beta",
                "must be 0 with strategy=ft (use strategy=biglearn)", self.beta)
        require(self.deepspeed.zero_stage in (0, 1, 2), "deepspeed.zero_stage",
                "must be 0, 1 or 2 (evaluation reads the whole model on every rank)", self.deepspeed.zero_stage)
        require(self.resume in ("auto", "never"), "resume", "must be 'auto' or 'never'", self.resume)
        require(len(self.objective.segments) == 2, "objective.segments", "must hold two rules: [label slot, text]",
                self.objective.segments)


def load_config(overrides=()) -> FinetuneConfig:
    """configs/finetune.yaml composed with command-line overrides, checked against FinetuneConfig."""
    return load(overrides, cls=FinetuneConfig, config_name="finetune")


def sweep_configs(cfg: FinetuneConfig) -> list[FinetuneConfig]:
    """One config per entry of cfg.sweep (overrides of any key, e.g. {beta: 0.5, trainer: {lr: 1e-4}}),
    each with its own out/run_<i>; [cfg] itself without a sweep."""
    if not cfg.sweep:
        return [cfg]
    from omegaconf import OmegaConf
    base = to_dict(replace(cfg, sweep=[]))
    return [to_schema(OmegaConf.to_container(OmegaConf.merge(base, overrides, {"out": str(Path(cfg.out) / f"run_{i}")})),
                      FinetuneConfig)
            for i, overrides in enumerate(cfg.sweep)]

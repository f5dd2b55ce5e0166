"""Fine-tuning a big learner for classification, on the Trainer: plain FT or big-learn.

Every example becomes one sample X = (y, x) with the label in a slot ("Big Learning",
fine-tuning section; pretrain.infer.classification):

    [ label slot | text tokens | separator | text_pair tokens ]      (label slot = position 0)

Label c is the tokenizer's sentinel token c; the separator is the next sentinel.
- ft:       L_FT = E[-log p(y | x)]
- biglearn: L_FT + beta * E_{q(S', T')}[-log p(X_T' | X_S')]   ("Big Learning", "Big Cooperative Learning")
  with (S', T') drawn by ObjectiveSampler over the two segments (label, text), so the label is
  sometimes given, sometimes predicted, sometimes absent. beta = 0 is exactly ft: the big-learning
  pass draws its splits and dropout masks from its own random streams.

Runs on the same Trainer as pretraining, so it gets DeepSpeed ZeRO (stages 0-2), exact resume
(resume=auto continues from the newest complete checkpoint in `out`), SIGTERM/SIGUSR1 handling
and the non-finite-loss guard. Config: configs/finetune.yaml, schema `FinetuneConfig` below.

    python -m pretrain.finetune data.train=train.tsv data.dev=dev.tsv tokenizer=TOK init=EXPORTED
    python -m pretrain.finetune ... 'sweep=[{beta: 0.0}, {beta: 0.5, lr: 1e-4}]'   # one run per entry
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .collate import TaskBatch, collate
from .config import CONFIG_DIR, DataConfig as PretrainData, DeepSpeedConfig, TrainConfig, TrainerConfig, compose, to_schema
from .engine import build_engine, process_group, use_cpu
from .infer import LabelLayout, evaluate_classifier, load_model, read_examples, split_spec
from .logs import quiet_third_party
from .model import BigLearner, ModelConfig
from .objectives import ObjectiveConfig, ObjectiveSampler, SegmentRule
from .train import seed_everything
from .trainer import MetricsLog, Trainer, TrainerSettings
from .utils import METRICS

log = logging.getLogger("pretrain.finetune")
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


def default_objective() -> ObjectiveConfig:
    """q(S', T') for the big-learning term: the label segment is given 20% / predicted last 40%
    of the time, else it joins the random big-learning split of the text."""
    return ObjectiveConfig(name="biglearn", segments=[SegmentRule(p_source=0.2, p_target=0.4), SegmentRule()])


def _finetune_deepspeed() -> DeepSpeedConfig:
    return DeepSpeedConfig(zero_stage=0, precision="fp32")


@dataclass
class FinetuneConfig:
    data: FinetuneData = field(default_factory=FinetuneData)
    tokenizer: str = ""             # ours (a directory), an HF tokenizer.json or a sentencepiece .model
    init: str | None = None         # exported model or checkpoint to start from; None = a fresh `model`
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields for a fresh model
    strategy: str = "biglearn"
    beta: float = 0.0
    lr: float = 4e-5
    epochs: int = 3
    batch_size: int = 16            # per rank
    warmup_steps: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    deepspeed: DeepSpeedConfig = field(default_factory=_finetune_deepspeed)
    out: str = "runs/finetune"      # run directory: metrics.jsonl, checkpoints/, result.json, model/
    resume: str = "auto"            # auto: continue from the newest complete checkpoint in `out`; never
    save_model: bool = True         # exported classifier in out/model (label layout in its metadata)
    log_every: int = 1
    save_every: int = 0             # 0: save at the end and on signals only
    keep_last: int = 2
    max_bad_steps: int = 5
    deterministic: bool = False
    progress: bool = True
    objective: ObjectiveConfig = field(default_factory=default_objective)
    sweep: list[dict[str, Any]] = field(default_factory=list)  # one run per entry of overrides, in out/run_<i>

    def __post_init__(self):
        _check(self.strategy in FINETUNE_STRATEGIES, "strategy", f"must be one of {FINETUNE_STRATEGIES}", self.strategy)
        _check(math.isfinite(self.beta) and self.beta >= 0, "beta", "must be >= 0", self.beta)
        _check(self.strategy == "biglearn" or self.beta == 0, "beta", "must be 0 with strategy=ft (use strategy=biglearn)",
               self.beta)
        for key in ("epochs", "batch_size", "log_every", "keep_last", "max_bad_steps"):
            _check(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, key, "must be a positive integer",
                   getattr(self, key))
        _check(math.isfinite(self.lr) and self.lr > 0, "lr", "must be a positive number", self.lr)
        for key in ("warmup_steps", "weight_decay", "grad_clip", "save_every"):
            _check(getattr(self, key) >= 0, key, "must be >= 0", getattr(self, key))
        _check(self.data.max_len >= 3, "data.max_len", "must be >= 3", self.data.max_len)
        _check(self.deepspeed.zero_stage in (0, 1, 2), "deepspeed.zero_stage",
               "must be 0, 1 or 2 (evaluation reads the whole model on every rank)", self.deepspeed.zero_stage)
        _check(self.resume in ("auto", "never"), "resume", "must be 'auto' or 'never'", self.resume)
        _check(len(self.objective.segments) == 2, "objective.segments", "must hold two rules: [label slot, text]",
               self.objective.segments)


def _check(condition: bool, key: str, message: str, value) -> None:
    if not condition:
        raise ValueError(f"finetune.{key} {message}; got {value!r}")


def load_config(overrides=(), config_dir=CONFIG_DIR) -> FinetuneConfig:
    """configs/finetune.yaml composed with command-line overrides, checked against FinetuneConfig."""
    return to_schema(compose(overrides, config_dir, "finetune", FinetuneConfig), FinetuneConfig)


def config_from_dict(values: dict) -> FinetuneConfig:
    return to_schema(values, FinetuneConfig)


# --------------------------------------------------------------------------- data stream

@dataclass
class FinetuneBatch:
    """One micro-batch: the label-slot batch (S = text, T = label), and for big-learn the same
    samples under q(S', T') with the seed of that pass's own dropout stream."""
    ft: TaskBatch
    big: TaskBatch | None
    dropout_seed: int

    def to_torch(self, device=None) -> "FinetuneBatch":
        return FinetuneBatch(self.ft.to_torch(device), None if self.big is None else self.big.to_torch(device),
                             self.dropout_seed)


class ExampleStream:
    """Epochs over encoded samples for one rank: a permutation per epoch from (seed, epoch), cut
    into global batches of batch_size x world_size (the remainder is dropped), rank r taking
    every world_size-th sample of each. Every draw is a pure function of (seed, epoch, batch), so
    the state is the cursor alone and a resumed run reads exactly what the first one would have."""

    def __init__(self, samples: list[np.ndarray], batch_size: int, pad_id: int, sampler: ObjectiveSampler | None, *,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.samples, self.batch_size, self.pad_id, self.sampler = samples, batch_size, pad_id, sampler
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = len(samples) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(samples)} training examples are fewer than one global batch "
                             f"(batch_size={batch_size} x {world_size} ranks)")
        self.epoch = self.batch = 0
        self.last_keys: list[int] = []

    @property
    def stats(self) -> dict:
        return {"epoch": self.epoch}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "n_samples": len(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        if state["n_samples"] != len(self.samples):
            raise ValueError(f"the checkpoint was trained on {state['n_samples']} examples, this data has "
                             f"{len(self.samples)}")
        self.epoch, self.batch = state["epoch"], state["batch"]

    def __iter__(self):
        while True:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))
            while self.batch < self.steps_per_epoch:
                size = self.batch_size * self.world_size
                index = order[self.batch * size:(self.batch + 1) * size][self.rank::self.world_size]
                batch = self._batch(index, np.random.default_rng([self.seed, 1, self.epoch, self.batch, self.rank]))
                self.last_keys = index.tolist()
                self.batch += 1
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0

    def _batch(self, index, rng: np.random.Generator) -> FinetuneBatch:
        windows = [self.samples[i] for i in index]
        ft = collate(windows, [split_spec(len(w), np.arange(1, len(w)), [0]) for w in windows], self.pad_id)
        big = None
        if self.sampler is not None:
            specs = [self.sampler(len(w), rng, segment_lengths=[1, len(w) - 1]) for w in windows]
            big = collate(windows, specs, self.pad_id)
        return FinetuneBatch(ft, big, int(rng.integers(1 << 62)))


# --------------------------------------------------------------------------- loss on the trainer

class FinetuneLoss(torch.nn.Module):
    """forward(FinetuneBatch) -> (L_FT + beta * L_big, parts), inside the engine's forward."""

    def __init__(self, model: BigLearner, beta: float):
        super().__init__()
        self.model, self.beta = model, beta

    def forward(self, batch: FinetuneBatch):
        loss_ft, _ = self.model.loss(batch.ft)
        if batch.big is None:
            return loss_ft, {"loss_ft": loss_ft.detach()}
        # Own dropout stream: the FT pass sees the same masks whatever beta is.
        device = batch.ft.tokens.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(batch.dropout_seed)
            loss_big, _ = self.model.loss(batch.big)
        return loss_ft + self.beta * loss_big, {"loss_ft": loss_ft.detach(), "loss_biglearn": loss_big.detach()}


class FinetuneTask:
    """What fine-tuning adds to the trainer: the loss module and the per-step log fields."""

    def __init__(self, beta: float, biglearn: bool):
        self.beta, self.biglearn = beta, biglearn

    def module(self, model: BigLearner) -> torch.nn.Module:
        return FinetuneLoss(model, self.beta)

    def sums(self, batch: FinetuneBatch, device_batch: FinetuneBatch, output) -> dict[str, torch.Tensor]:
        counts = torch.tensor([1.0, float(batch.ft.tokens.shape[0]), float((batch.ft.n_source + 1).sum())],
                              dtype=torch.float64)
        return {**output, **dict(zip(("micro_batches", "predicted", "tokens"), counts))}

    def record(self, totals: dict[str, list[float]]) -> dict:
        n = max(totals["micro_batches"][0], 1.0)
        record = {"loss_ft": totals["loss_ft"][0] / n}
        if self.biglearn:
            record["loss_biglearn"] = totals["loss_biglearn"][0] / n
        record["loss"] = record["loss_ft"] + self.beta * record.get("loss_biglearn", 0.0)
        return record


def _build_model(cfg: FinetuneConfig, tokenizer) -> BigLearner:
    if cfg.init:
        model, _ = load_model(cfg.init, "cpu", tokenizer_sha256=tokenizer.sha256)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{cfg.init}: vocab_size {model.config.vocab_size} < tokenizer's {tokenizer.vocab_size}")
        return model.train()
    return BigLearner(ModelConfig(**{"vocab_size": tokenizer.vocab_size, "max_seq_len": cfg.data.max_len, **cfg.model}))


def engine_config(cfg: FinetuneConfig, total_steps: int) -> TrainConfig:
    """The DeepSpeed side of a fine-tuning run, in the pretraining schema the engine reads: AdamW
    (beta2 0.999, as in the usual fine-tuning recipe), linear warm-up, cosine decay to zero."""
    trainer = TrainerConfig(max_steps=total_steps, lr=cfg.lr, min_lr_ratio=0.0, warmup_steps=max(1, cfg.warmup_steps),
                            weight_decay=cfg.weight_decay, beta1=0.9, beta2=0.999, grad_clip=cfg.grad_clip, seed=cfg.seed)
    return TrainConfig(deepspeed=cfg.deepspeed, trainer=trainer, data=PretrainData(batch_size=cfg.batch_size))


def _examples(cfg: FinetuneConfig, tokenizer):
    train_examples = read_examples(cfg.data.train, cfg.data)
    labels = cfg.data.labels or sorted({ex.label for ex in train_examples})
    layout = LabelLayout.from_tokenizer(tokenizer, labels, cfg.data.max_len)
    dev_examples = read_examples(cfg.data.dev, cfg.data)
    for path, split in ((cfg.data.train, train_examples), (cfg.data.dev, dev_examples)):
        for ex in split:
            if ex.label not in labels:
                raise ValueError(f"{path}: unknown label {ex.label!r} (text {ex.text[:40]!r}); known labels are {labels}")
    encode = lambda exs: [layout.encode(tokenizer, ex.text, ex.text_pair, ex.label) for ex in exs]  # noqa: E731
    return layout, encode(train_examples), encode(dev_examples), np.array([labels.index(ex.label) for ex in dev_examples])


def run(cfg: FinetuneConfig, tokenizer, progress: bool | None = None) -> dict:
    """Fine-tune (or resume) on the Trainer, evaluate on the dev file, write result.json (and the
    model) under cfg.out. Collective: every rank calls it. Returns the result with the per-step history."""
    if progress is not None:
        cfg = replace(cfg, progress=progress)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    on_cpu = use_cpu(TrainConfig(deepspeed=cfg.deepspeed))
    with process_group(on_cpu, cfg.deepspeed.dist_timeout_s) as (rank, world_size, _):
        return _run(cfg, tokenizer, on_cpu, rank, world_size)


def _run(cfg: FinetuneConfig, tokenizer, on_cpu: bool, rank: int, world_size: int) -> dict:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    layout, train_samples, dev_samples, dev_labels = _examples(cfg, tokenizer)
    seed_everything(cfg.seed, cfg.deterministic)
    biglearn = cfg.strategy == "biglearn"
    stream = ExampleStream(train_samples, cfg.batch_size, tokenizer.pad_id, ObjectiveSampler(cfg.objective) if biglearn else None,
                           seed=cfg.seed, rank=rank, world_size=world_size)
    total_steps = stream.steps_per_epoch * cfg.epochs
    task = FinetuneTask(cfg.beta, biglearn)
    model = _build_model(cfg, tokenizer)
    engine, _ = build_engine(engine_config(cfg, total_steps), task.module(model), world_size, on_cpu)

    def dev_metrics(engine) -> dict:
        metrics = evaluate_classifier(engine.module.model, dev_samples, dev_labels, layout, tokenizer.pad_id)
        return {f"dev_{k}": v for k, v in metrics.items()}

    settings = TrainerSettings(max_steps=total_steps, log_every=cfg.log_every, save_every=cfg.save_every,
                               keep_last=cfg.keep_last, max_bad_steps=cfg.max_bad_steps, progress=cfg.progress and rank == 0)
    meta = {"config": {**_plain(cfg), "model": model.config.to_dict()}, "world_size": world_size,
            "tokenizer_sha256": tokenizer.sha256, "label_layout": asdict(layout)}
    trainer = Trainer(engine, stream, task, settings, out, meta=meta, evaluator=dev_metrics, rank=rank,
                      first_save_bytes=ckpt.BYTES_PER_PARAMETER * model.num_parameters())
    resume_from = ckpt.find_checkpoint(trainer.checkpoint_dir) if cfg.resume == "auto" else None
    if resume_from is not None:
        trainer.load(resume_from)
    if rank == 0:
        trainer.metrics = MetricsLog(out, trainer.progress.step if resume_from else None)
    summary = trainer.run()
    if summary["stopped"] == "signal":
        return summary
    history = [json.loads(line) for line in (out / METRICS).read_text().splitlines()] if rank == 0 else []
    history = [r for r in history if r["kind"] == "train"]
    result = {"strategy": cfg.strategy, "beta": cfg.beta, "lr": cfg.lr, "epochs": cfg.epochs,
              "warmup_steps": cfg.warmup_steps, "seed": cfg.seed, "n_train": len(train_samples),
              "n_dev": len(dev_samples), **summary["eval"], "final_loss_ft": history[-1]["loss_ft"] if history else None}
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result, indent=2))
        if cfg.save_model and not summary["healthy"]:
            log.warning("not exporting: the run ended in a streak of bad steps")
        elif cfg.save_model:
            from .export import export_model
            export_model(engine.module.model, out / "model", {"tokenizer_sha256": tokenizer.sha256,
                                                              "label_layout": asdict(layout)})
    return {**result, "history": history}


def _plain(cfg: FinetuneConfig) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


# --------------------------------------------------------------------------- sweeps

def sweep_configs(cfg: FinetuneConfig) -> list[FinetuneConfig]:
    """One config per entry of cfg.sweep (overrides of any key), each with its own out/run_<i>;
    [cfg] itself without a sweep."""
    if not cfg.sweep:
        return [cfg]
    from omegaconf import OmegaConf
    base = _plain(replace(cfg, sweep=[]))
    runs = []
    for i, overrides in enumerate(cfg.sweep):
        merged = OmegaConf.to_container(OmegaConf.merge(base, overrides, {"out": str(Path(cfg.out) / f"run_{i}")}))
        runs.append(config_from_dict(merged))
    return runs


def summarize(results: list[dict]) -> str:
    """Best / median (IQR) dev metrics over a sweep, as in the fine-tuning table of "Big Learning";
    beta = 0 runs are plain fine-tuning."""
    groups = {"FT (beta = 0)": [r for r in results if r["beta"] == 0],
              "big-learn (beta > 0)": [r for r in results if r["beta"] > 0]}
    lines = ["| strategy | runs | best accuracy / F1 | median accuracy / IQR |", "|---|---|---|---|"]
    for name, runs in groups.items():
        if not runs:
            continue
        acc = np.array([100 * r["dev_accuracy"] for r in runs])
        best = max(runs, key=lambda r: r["dev_accuracy"])
        q1, median, q3 = np.percentile(acc, [25, 50, 75])
        lines.append(f"| {name} | {len(runs)} | {100 * best['dev_accuracy']:.2f} / {100 * best['dev_f1']:.2f} "
                     f"| {median:.2f} / {q3 - q1:.2f} |")
    return "\n".join(lines)


def main(argv=None, prog: str = "python -m pretrain.finetune") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a big learner for classification (plain FT or big-learn) on the Trainer.",
        epilog="Any key of configs/finetune.yaml can be set with key=value (schema: pretrain.finetune.FinetuneConfig).\n\n"
               "examples:\n"
               "  python -m pretrain.finetune data.train=T.tsv data.dev=D.tsv tokenizer=TOK init=runs/demo/export beta=0.5\n"
               "  python -m pretrain.finetune ... 'sweep=[{beta: 0.0}, {beta: 0.5}]'     # summary.md in out/\n"
               "  torchrun --nproc_per_node 2 -m pretrain.finetune ... deepspeed.zero_stage=2\n\n"
               "outputs (out): metrics.jsonl, checkpoints/ (resume=auto continues), result.json, model/ "
               "(unless save_model=false).\nSIGTERM or SIGUSR1 saves a checkpoint and exits 0.")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides")
    parser.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.overrides)
        if not cfg.tokenizer:
            raise ValueError("finetune.tokenizer must name a tokenizer (directory, tokenizer.json or .model)")
        runs = sweep_configs(cfg)
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if args.cfg:
        from omegaconf import OmegaConf
        print(OmegaConf.to_yaml(_plain(cfg)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_third_party()
    from data_pipeline.tokenizer import Tokenizer
    try:
        tokenizer = Tokenizer.load(cfg.tokenizer)
        results = [run(one, tokenizer) for one in runs]
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    if cfg.sweep:
        table = summarize([r for r in results if "dev_accuracy" in r])
        (Path(cfg.out) / "summary.md").write_text(table + "\n")
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

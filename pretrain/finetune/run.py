"""Fine-tuning a big learner for classification, on the Trainer: plain FT or big-learn.

Every example becomes one sample X = (y, x) with the label in a slot ("Big Learning",
fine-tuning section; pretrain.infer.classification):

    [ label slot | text tokens | separator | text_pair tokens ]      (label slot = position 0)

Label c is the tokenizer's sentinel token c; the separator is the next sentinel.
- ft:       L_FT = E[-log p(y | x)]
- biglearn: L_FT + beta * E_{q(S', T')}[-log p(X_T' | X_S')]   ("Big Learning", "Big Cooperative Learning")
  with (S', T') drawn by ObjectiveSampler over the two segments (label, text), so the label is
  sometimes given, sometimes predicted, sometimes absent. beta = 0 is exactly ft: that pass is
  not drawn nor computed (and with beta > 0 it draws its splits and dropout masks from its own
  random streams, so the FT pass sees the same ones whatever beta is).

Runs on the same Trainer as pretraining, so it gets DeepSpeed ZeRO (stages 0-2), exact resume
(resume=auto continues from the newest complete checkpoint in `out`), SIGTERM/SIGUSR1 handling
and the non-finite-loss guard. Config: configs/finetune.yaml, schema pretrain.finetune.config.

    biglearn finetune data.train=train.tsv data.dev=dev.tsv tokenizer=TOK init=EXPORTED
    biglearn finetune ... 'sweep=[{beta: 0.0}, {beta: 0.5, trainer: {lr: 1e-4}}]'   # one run per entry
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import UserError, add_debug_flag, cli_main
from data_pipeline.files import atomic_write, removed_on_failure

from ..checkpoint import sharded as ckpt
from ..checkpoint.export import export_model
from ..checkpoint.loading import load_model
from ..checkpoint.rundir import FINETUNED, METRICS, read_metrics
from ..infer import LabelLayout, evaluate_classifier, read_examples, split_spec
from ..layout import TaskBatch, collate
from ..model import BigLearner, ModelConfig
from ..objectives import ObjectiveSampler
from ..train.composition import to_dict
from ..train.console import quiet_third_party
from ..train.engine import build_engine, process_group, use_cpu
from ..train.metrics import MetricsLog
from ..train.trainer import Trainer, seed_everything
from .config import FinetuneConfig, load_config, sweep_configs

log = logging.getLogger(__name__)
FINETUNE_STRATEGIES = ("ft", "biglearn")


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

    def __len__(self) -> int:
        return self.steps_per_epoch

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
        model, _ = load_model(cfg.init, "cpu", tokenizer=tokenizer)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise UserError(f"{cfg.init}: vocab_size {model.config.vocab_size} < tokenizer's {tokenizer.vocab_size}")
        return model.train()
    return BigLearner(ModelConfig(**{"vocab_size": tokenizer.vocab_size, "max_seq_len": cfg.data.max_len, **cfg.model}))


def _examples(cfg: FinetuneConfig, tokenizer):
    train_examples = read_examples(cfg.data.train, cfg.data)
    labels = cfg.data.labels or sorted({ex.label for ex in train_examples})
    layout = LabelLayout.from_tokenizer(tokenizer, labels, cfg.data.max_len)
    dev_examples = read_examples(cfg.data.dev, cfg.data)
    for path, split in ((cfg.data.train, train_examples), (cfg.data.dev, dev_examples)):
        for ex in split:
            if ex.label not in labels:
                raise UserError(f"{path}: unknown label {ex.label!r} (text {ex.text[:40]!r}); known labels are {labels}")
    encode = lambda exs: [layout.encode(tokenizer, ex.text, ex.text_pair, ex.label) for ex in exs]  # noqa: E731
    return layout, encode(train_examples), encode(dev_examples), np.array([labels.index(ex.label) for ex in dev_examples])


def run(cfg: FinetuneConfig, tokenizer) -> dict:
    """Fine-tune (or resume) on the Trainer, evaluate on the dev file, write result.json (and the
    model) under cfg.out. Collective: every rank calls it. Returns the result with the per-step history."""
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    on_cpu = use_cpu(cfg.deepspeed)
    ds = cfg.deepspeed
    with process_group(on_cpu, ds.dist_timeout_s, ds.extension_wait_s) as (rank, world_size, _), \
            removed_on_failure(Path(cfg.out).resolve(), unless=(METRICS, ckpt.CHECKPOINTS), owner=rank == 0):
        return _run(cfg, tokenizer, on_cpu, rank, world_size)


def _run(cfg: FinetuneConfig, tokenizer, on_cpu: bool, rank: int, world_size: int) -> dict:
    out = Path(cfg.out).resolve()
    layout, train_samples, dev_samples, dev_labels = _examples(cfg, tokenizer)
    t = cfg.trainer
    seed_everything(t.seed, t.deterministic)
    biglearn = cfg.strategy == "biglearn" and cfg.beta > 0  # beta = 0: the big-learning term weighs nothing
    stream = ExampleStream(train_samples, cfg.data.batch_size, tokenizer.pad_id,
                           ObjectiveSampler(cfg.objective) if biglearn else None, seed=t.seed, rank=rank,
                           world_size=world_size)
    task = FinetuneTask(cfg.beta, biglearn)
    model = _build_model(cfg, tokenizer)
    engine, _ = build_engine(cfg.deepspeed, t, cfg.data.batch_size, t.total_steps(stream), task.module(model),
                             world_size, on_cpu)

    def dev_metrics(engine) -> dict:
        metrics = evaluate_classifier(engine.module.model, dev_samples, dev_labels, layout, tokenizer.pad_id)
        return {f"dev_{k}": v for k, v in metrics.items()}

    meta = {"config": {**to_dict(cfg), "model": model.config.to_dict()}, "world_size": world_size,
            "tokenizer_sha256": tokenizer.sha256, "label_layout": asdict(layout)}
    trainer = Trainer(engine, stream, task, t, out, meta=meta, evaluator=dev_metrics, rank=rank,
                      first_save_bytes=ckpt.BYTES_PER_PARAMETER * model.num_parameters())
    resume_from = ckpt.find_checkpoint(trainer.checkpoint_dir) if cfg.resume == "auto" else None
    if resume_from is not None:
        trainer.load(resume_from)
    if rank == 0:
        trainer.metrics = MetricsLog(out, trainer.progress.step if resume_from else None, t.loggers, to_dict(cfg))
    summary = trainer.run()
    if summary["stopped"] == "signal":
        return summary
    history = [r for r in read_metrics(out) if r["kind"] == "train"] if rank == 0 else []
    result = {"strategy": cfg.strategy, "beta": cfg.beta, "lr": t.lr, "epochs": t.epochs,
              "warmup_steps": t.warmup_steps, "seed": t.seed, "n_train": len(train_samples),
              "n_dev": len(dev_samples), **summary["eval"], "final_loss_ft": history[-1]["loss_ft"] if history else None}
    if rank == 0:
        atomic_write(out / "result.json", json.dumps(result, indent=2))
        if cfg.save_model and not summary["healthy"]:
            log.warning("not exporting: the run ended in a streak of bad steps")
        elif cfg.save_model:
            # The model directory carries its tokenizer: TextModel.load and `biglearn classify --model` need no other.
            export_model(engine.module.model, out / FINETUNED, {"tokenizer_sha256": tokenizer.sha256,
                                                                "label_layout": asdict(layout)}, tokenizer,
                         replace=True)
    return {**result, "history": history}


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


def check_paths(cfg: FinetuneConfig) -> None:
    """The files a run reads exist, before anything starts: one line naming the key otherwise."""
    if not cfg.tokenizer:
        raise UserError("tokenizer must name a tokenizer (directory, tokenizer.json or .model)")
    for key, value in (("data.train", cfg.data.train), ("data.dev", cfg.data.dev)):
        if not value:
            raise UserError(f"{key} must name a .tsv or .jsonl file of examples (docs/capabilities.md, fine-tuning)")
        if not Path(value).is_file():
            raise UserError(f"{key}: {value} {'is not a file' if Path(value).exists() else 'does not exist'}")
    for key, value in (("tokenizer", cfg.tokenizer), ("init", cfg.init)):
        if value and not Path(value).exists():
            raise UserError(f"{key}: {value} does not exist")


def _main(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a big learner for classification (plain FT or big-learn) on the Trainer.",
        epilog="Any key of configs/finetune.yaml can be set with key=value (schema: pretrain/finetune/config.py; the "
               "loop's knobs under trainer.*, as in pretraining).\n\n"
               "examples:\n"
               "  biglearn finetune data.train=T.tsv data.dev=D.tsv tokenizer=TOK init=runs/demo/export beta=0.5\n"
               "  biglearn finetune ... 'sweep=[{beta: 0.0}, {beta: 0.5}]'     # summary.md in out/\n"
               "  torchrun --nproc_per_node 2 -m pretrain.finetune ... deepspeed.zero_stage=2\n\n"
               "outputs (out): metrics.jsonl, checkpoints/ (resume=auto continues), result.json, model/ "
               "(unless save_model=false).\nSIGTERM or SIGUSR1 saves a checkpoint and exits 0.")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides")
    parser.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_debug_flag(parser)
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.overrides)
    check_paths(cfg)
    runs = sweep_configs(cfg)
    if args.cfg:
        from omegaconf import OmegaConf
        print(OmegaConf.to_yaml(to_dict(cfg)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_third_party()
    from data_pipeline.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(cfg.tokenizer)
    results = [run(one, tokenizer) for one in runs]
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    if cfg.sweep:
        table = summarize([r for r in results if "dev_accuracy" in r])
        atomic_write(Path(cfg.out) / "summary.md", table + "\n")
        print(table)
    return 0


def main(argv=None, prog: str = "python -m pretrain.finetune") -> int:
    # The example readers and the tokenizer raise ValueErrors that name the file and line.
    return cli_main(lambda args: _main(args, prog), prog, argv, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tuning a big learner for classification: plain FT or big-learn (seed 000 App. F).

Every example becomes one sample X = (y, x) with the label in a slot (seed 000 §3.3):

    [ label slot | text tokens | separator | text_pair tokens ]      (label slot = position 0)

Label c is the tokenizer's sentinel token c; the separator is the next sentinel.
- ft:       L_FT = E[-log p(y | x)]                       (seed 000 eq. 20, seed 001 eq. 16)
- biglearn: L_FT + beta * E_{q(S', T')}[-log p(X_T' | X_S')] (seed 000 eq. 21-22, seed 001 eq. 17)
  with (S', T') drawn by ObjectiveSampler over the two segments (label, text), so the label is
  sometimes given, sometimes predicted, sometimes absent. beta = 0 is exactly ft: the big-learning
  pass draws its splits and dropout masks from its own random streams.

    python -m pretrain.finetune data.train=train.tsv data.dev=dev.tsv tokenizer=TOK init=EXPORTED
    python -m pretrain.finetune -m ...            # sweep grid of configs/finetune/finetune.yaml
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .collate import collate
from .infer import LabelLayout, evaluate_classifier, load_model, read_examples, split_spec
from .model import BigLearner, ModelConfig
from .objectives import ObjectiveConfig, ObjectiveSampler, SegmentRule, validate

STRATEGIES = ("ft", "biglearn")


@dataclass
class DataConfig:
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


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: str = ""             # ours (a directory), an HF tokenizer.json or a sentencepiece .model
    init: str | None = None         # exported model to start from; None = a fresh `model`
    model: dict = field(default_factory=dict)  # ModelConfig fields for a fresh model
    strategy: str = "biglearn"
    beta: float = 0.0
    lr: float = 4e-5
    epochs: int = 3
    batch_size: int = 16
    warmup_steps: int = 0
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/finetune"
    save_model: bool = False
    objective: ObjectiveConfig = field(default_factory=default_objective)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"finetune.strategy must be one of {STRATEGIES}; got {self.strategy!r}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"finetune.beta must be >= 0; got {self.beta!r}")
        if self.strategy == "ft" and self.beta != 0:
            raise ValueError("finetune.beta must be 0 with strategy=ft (use strategy=biglearn)")
        for key in ("epochs", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"finetune.{key} must be a positive integer; got {getattr(self, key)!r}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("finetune.lr must be > 0, warmup_steps and weight_decay >= 0")
        if self.data.max_len < 3:
            raise ValueError(f"finetune.data.max_len must be >= 3; got {self.data.max_len}")
        validate(self.objective)
        if len(self.objective.segments) != 2:
            raise ValueError("finetune.objective.segments must hold two rules: [label slot, text]")


def _from_dict(cls, values: dict, where: str):
    """Dataclass `cls` from a (Hydra) dict, recursing into dataclass fields; unknown keys fail."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        factory = known[name].default_factory
        default = factory() if factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = _from_dict(type(default), value, f"{where}.{name}")
        elif name == "segments":
            value = [_from_dict(SegmentRule, rule, f"{where}.segments[{i}]") for i, rule in enumerate(value)]
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict) -> FinetuneConfig:
    return _from_dict(FinetuneConfig, values, "finetune")


# --------------------------------------------------------------------------- training

def _build_model(cfg: FinetuneConfig, tokenizer) -> BigLearner:
    if cfg.init:
        model, _ = load_model(cfg.init, cfg.device, tokenizer_sha256=tokenizer.sha256)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{cfg.init}: vocab_size {model.config.vocab_size} < tokenizer's {tokenizer.vocab_size}")
        return model.train()
    model_config = ModelConfig(**{"vocab_size": tokenizer.vocab_size, "max_seq_len": cfg.data.max_len, **cfg.model})
    return BigLearner(model_config).to(cfg.device).train()


def run(cfg: FinetuneConfig, tokenizer, progress: bool = True) -> dict:
    """Fine-tune, evaluate on the dev file, write result.json (and the model) under cfg.out."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_examples = read_examples(cfg.data.train, cfg.data)
    labels = cfg.data.labels or sorted({ex.label for ex in train_examples})
    layout = LabelLayout.from_tokenizer(tokenizer, labels, cfg.data.max_len)
    dev_examples = read_examples(cfg.data.dev, cfg.data)
    for path, split in ((cfg.data.train, train_examples), (cfg.data.dev, dev_examples)):
        for ex in split:
            if ex.label not in labels:
                raise ValueError(f"{path}: unknown label {ex.label!r} (text {ex.text[:40]!r}); known labels are {labels}")
    encode = lambda exs: [layout.encode(tokenizer, ex.text, ex.text_pair, ex.label) for ex in exs]  # noqa: E731
    train_samples, dev_samples = encode(train_examples), encode(dev_examples)
    dev_labels = np.array([labels.index(ex.label) for ex in dev_examples])

    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, tokenizer)
    data_rng = np.random.default_rng(cfg.seed)             # example order
    split_rng = np.random.default_rng([cfg.seed, 1])       # big-learning (S', T') draws
    sampler = ObjectiveSampler(cfg.objective)
    steps_per_epoch = math.ceil(len(train_samples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Linear warm-up then linear decay to zero (the GLUE recipe of seed 000 App. F).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / max(1, cfg.warmup_steps), max(0.0, (total_steps - s) / max(1, total_steps - cfg.warmup_steps))))
    from tqdm import tqdm
    bar = tqdm(total=total_steps, desc=f"finetune {cfg.strategy} beta={cfg.beta}", disable=not progress, unit="step")
    history = []
    with open(out / "train_log.jsonl", "w") as log:
        for epoch in range(cfg.epochs):
            for index in np.array_split(data_rng.permutation(len(train_samples)), steps_per_epoch):
                windows = [train_samples[i] for i in index]
                ft_specs = [split_spec(len(w), np.arange(1, len(w)), [0]) for w in windows]
                loss_ft, _ = model.loss(collate(windows, ft_specs, tokenizer.pad_id).to_torch(cfg.device))
                loss = loss_ft
                record = {"step": len(history), "epoch": epoch, "loss_ft": loss_ft.item()}
                if cfg.strategy == "biglearn":
                    specs = [sampler(len(w), split_rng, segment_lengths=[1, len(w) - 1]) for w in windows]
                    # Own dropout stream: the FT pass sees the same masks whatever beta is.
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(int(split_rng.integers(1 << 62)))
                        loss_big, _ = model.loss(collate(windows, specs, tokenizer.pad_id).to_torch(cfg.device))
                    loss = loss_ft + cfg.beta * loss_big
                    record["loss_biglearn"] = loss_big.item()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                record["loss"] = loss.item()
                history.append(record)
                log.write(json.dumps(record) + "\n")
                bar.update()
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
    bar.close()
    model.eval()
    metrics = evaluate_classifier(model, dev_samples, dev_labels, layout, tokenizer.pad_id)
    result = {"strategy": cfg.strategy, "beta": cfg.beta, "lr": cfg.lr, "epochs": cfg.epochs,
              "warmup_steps": cfg.warmup_steps, "seed": cfg.seed, "n_train": len(train_samples),
              "n_dev": len(dev_samples), **{f"dev_{k}": v for k, v in metrics.items()},
              "final_loss_ft": history[-1]["loss_ft"]}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    if cfg.save_model:
        from .export import export_model
        export_model(model, out / "model", {"tokenizer_sha256": tokenizer.sha256, "label_layout": asdict(layout)})
    return {**result, "history": history}


# --------------------------------------------------------------------------- sweep summary

def summarize(results: list[dict]) -> str:
    """Seed 000 Table 2: best / median (IQR) dev metrics over the grid; beta = 0 runs are FT."""
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


class SweepSummary:
    """Hydra callback: after a multirun, read every result.json of the sweep and write summary.md."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("**/result.json"))]
        if not results:
            return
        table = summarize(results)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(table)


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    @hydra.main(config_path="../configs/finetune", config_name="finetune", version_base="1.3")
    def _main(conf) -> None:
        values = OmegaConf.to_container(conf, resolve=True)
        values["out"] = values.get("out") or HydraConfig.get().runtime.output_dir
        cfg = config_from_dict(values)
        if not cfg.tokenizer:
            raise ValueError("finetune.tokenizer must name a tokenizer (directory, tokenizer.json or .model)")
        from data_pipeline.tokenizer import Tokenizer
        result = run(cfg, Tokenizer.load(cfg.tokenizer))
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))

    _main()


if __name__ == "__main__":
    main()

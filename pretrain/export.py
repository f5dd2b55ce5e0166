"""Consolidated fp32 weights for inference: model.safetensors + model_config.json, plus the
tokenizer's files and a model card (README.md).

This is the format every inference entry point loads (`load_exported`); training checkpoints
(DeepSpeed, sharded) are converted to it by the trainer, Hugging Face checkpoints by
`pretrain.convert from-hf`. Exported files hold no absolute paths: the directory can be copied.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import UserError
from .model import BigLearner, ModelConfig
from .utils import atomic_write, format_matrix, model_from_weights

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
CARD = "README.md"


def portable(value):
    """`value` with every absolute path string replaced by its last component (recursively): an
    export names the run, data and init it came from without tying itself to this machine."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def manifest_summary(manifest_path) -> dict | None:
    """What a model card says about the data: splits, sources, tokenizer (None if unreadable)."""
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except (OSError, ValueError, TypeError):
        return None
    tokenizer = manifest.get("tokenizer", {})
    return {"name": Path(manifest_path).parent.name, "seq_len": manifest.get("seq_len"),
            "mode": manifest.get("mode"), "splits": manifest.get("splits"), "sources": manifest.get("sources"),
            "tokenizer": {k: tokenizer.get(k) for k in ("kind", "sha256", "vocab_size")}}


@contextlib.contextmanager
def staged_directory(out_dir):
    """Yield a fresh sibling directory; on success it is renamed to `out_dir`, on any error it is
    removed, so nothing appears under `out_dir`'s name unless the whole write completed.
    Refuses an existing non-empty `out_dir` (nothing already written is replaced)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty: choose a new output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy_tokenizer(tokenizer, out_dir) -> None:
    """The tokenizer's defining files into out_dir (each written atomically)."""
    for name, source in tokenizer.files.items():
        target = Path(out_dir) / name
        if Path(source).resolve() != target.resolve():
            atomic_write(target, Path(source).read_bytes())


def export_model(model: BigLearner, out_dir, metadata: dict | None = None, tokenizer=None) -> Path:
    """Write fp32 weights, {"model": config, **metadata} (paths made portable), the tokenizer's
    files when given and the model card into out_dir; each file is written atomically. Refuses
    weights holding NaN or inf (a diverged model), writing nothing."""
    out_dir = Path(out_dir)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    diverged = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if diverged:
        raise UserError(f"not exporting to {out_dir}: non-finite weights in {', '.join(diverged[:3])}"
                        f"{' ...' if len(diverged) > 3 else ''} (a diverged model); export an earlier checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    if model.config.tie_embeddings:
        state.pop("head.weight", None)  # tied to embed.weight; safetensors rejects shared storage
    atomic_write(out_dir / WEIGHTS, save(state))
    meta = portable({"model": model.config.to_dict(), **(metadata or {})})
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out_dir)
        meta.setdefault("tokenizer_sha256", tokenizer.sha256)
    atomic_write(out_dir / CONFIG, json.dumps(meta, indent=2, sort_keys=True))
    atomic_write(out_dir / CARD, model_card(meta, model.num_parameters()))
    return out_dir


def load_exported(path, device="cpu") -> tuple[BigLearner, dict]:
    """Load an exported directory; returns (model in eval mode, metadata)."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise UserError(f"{path} is not an exported model: expected {WEIGHTS} and {CONFIG} in it")
    try:
        meta = json.loads((path / CONFIG).read_text())
        ModelConfig(**meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path / CONFIG}: not a model config written by pretrain.export ({err})") from None
    try:
        state = load_file(str(path / WEIGHTS), device="cpu")
    except SafetensorError as err:  # e.g. a truncated download
        raise UserError(f"{path / WEIGHTS}: unreadable safetensors file ({err}); download or export it again") from None
    return model_from_weights(meta["model"], state, path / WEIGHTS, device), meta


# --------------------------------------------------------------------------- model.init

RUN_KEYS = ("streams", "dropout", "attention_backend", "activation_checkpointing", "n_segment_types", "init")


def new_parameters(model: BigLearner, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Values for the parameters a causal LM does not have (docs/hf.md, "New parameters"):
    the query stream's start vector is the mean token embedding (an input of typical scale that
    carries no token identity), and any other new parameter (the single-stream offset term,
    segment embeddings) starts at zero, so the imported model computes exactly what the causal
    model computes until training moves it."""
    filled = {}
    for name, value in model.state_dict().items():
        if name in state or (name == "head.weight" and model.config.tie_embeddings):
            continue
        filled[name] = state["embed.weight"].mean(0) if name == "query_start" else torch.zeros_like(value)
    return filled


def init_config(config: ModelConfig, vocab_size: int, tokenizer_sha256: str | None) -> ModelConfig:
    """The model config of a run with model.init: the architecture of the export at config.init
    and this config's RUN_KEYS (stream mode, dropout, ...). Refuses data tokenized otherwise."""
    path = Path(config.init)
    try:
        meta = json.loads((path / CONFIG).read_text())
        saved = ModelConfig(**{**meta["model"], **{k: getattr(config, k) for k in RUN_KEYS}})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"model.init={path}: not an exported model ({path / CONFIG}: {err}); import a Hugging Face "
                        "checkpoint with `python -m pretrain.convert from-hf`") from None
    recorded = meta.get("tokenizer_sha256")
    if recorded and tokenizer_sha256 and recorded != tokenizer_sha256:
        raise UserError(f"model.init={path} was trained with tokenizer sha256 {recorded} but the data's tokenizer has "
                        f"{tokenizer_sha256}: token ids would not match; shard the data with the tokenizer in {path}")
    if vocab_size > saved.vocab_size:
        raise UserError(f"model.init={path}: vocab_size={saved.vocab_size} is smaller than the data's tokenizer "
                        f"({vocab_size})")
    return saved


def load_init(model: BigLearner) -> None:
    """Weights of the export at model.config.init into `model`: parameters the export lacks get
    new_parameters' values, those the model's stream mode does not use are left out."""
    source, _ = load_exported(model.config.init)
    wanted = model.state_dict()
    state = {k: v for k, v in source.state_dict().items() if k in wanted}
    for name, value in state.items():
        if value.shape != wanted[name].shape:
            raise UserError(f"model.init={model.config.init}: {name} has shape {tuple(value.shape)}, the model "
                            f"needs {tuple(wanted[name].shape)}")
    model.load_state_dict({**state, **new_parameters(model, state)})


# --------------------------------------------------------------------------- model card

def _table(rows: list[tuple]) -> list[str]:
    return ["| key | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def model_card(meta: dict, n_parameters: int, hf: bool = False) -> str:
    """README.md: architecture, stream mode, objective mix, data summary, tokens seen, evaluation."""
    m = meta["model"]
    streams = m.get("streams", 2)
    config = meta.get("config", {})
    progress = meta.get("progress", {})
    lines = [f"# {meta.get('name') or config.get('run_name') or 'biglearn model'}", "",
             "A big-learning model: one transformer p(x_T | x_S) trained on many (source, target) splits "
             "of each sequence (\"Big Learning\", eq. 6), exported by biglearn.", ""]
    if hf:
        lines += ["This directory is a plain `LlamaForCausalLM` (no custom code): left to right it computes what "
                  "the big-learning model computes for the identity order with an empty source. Any-order and "
                  "infilling inference need the biglearn export (`pretrain.infer`).", ""]
        if streams != 1:
            lines += ["**Not exact: two-stream model.** Its predictions come from the query stream, which "
                      "`LlamaForCausalLM` has no counterpart for; this export reads the content stream through "
                      "the head, so its logits are not the model's predictions. Train with `model.streams=1` "
                      "for an exact export.", ""]
    lines += ["## Architecture", "", *_table([
        ("parameters", f"{n_parameters / 1e6:.2f}M"), ("layers", m["n_layers"]), ("d_model", m["d_model"]),
        ("heads / kv heads", f"{m['n_heads']} / {m['n_kv_heads']}"), ("SwiGLU hidden", m["ffn_hidden"]),
        ("vocabulary", m["vocab_size"]), ("RoPE base", m["rope_base"]), ("RoPE scaling", m.get("rope_scaling") or "none"),
        ("RMSNorm eps", m["norm_eps"]), ("tied embeddings", m["tie_embeddings"]), ("max sequence", m["max_seq_len"]),
        ("stream mode", "single-stream (streams=1)" if streams == 1 else "two-stream (streams=2)")]), ""]
    objective = config.get("objective", {})
    if objective:
        mix = objective.get("mixture") or {objective.get("name"): 1.0}
        lines += ["## Training", "", *_table([
            ("objective mix", ", ".join(f"{k} {v:g}" for k, v in mix.items())),
            ("steps", progress.get("step", 0)), ("tokens seen", progress.get("tokens_seen", 0)),
            ("tokens predicted", progress.get("predicted_seen", 0)),
            ("initialised from", (config.get("model") or {}).get("init") or "random weights")]), ""]
    if meta.get("source"):
        lines += ["## Origin", "", *_table(sorted(meta["source"].items())), ""]
    data = meta.get("data")
    if data:
        splits = data.get("splits") or {}
        lines += ["## Data", "", f"Dataset `{data.get('name')}`, windows of {data.get('seq_len')} tokens "
                  f"({data.get('mode')}); tokenizer {data['tokenizer'].get('kind') or 'biglearn'} "
                  f"sha256 {data['tokenizer'].get('sha256')}.", "",
                  "| split | windows | tokens |", "|---|---|---|",
                  *[f"| {name} | {s.get('samples')} | {s.get('tokens')} |" for name, s in splits.items()], ""]
    if meta.get("eval"):
        lines += ["## Evaluation (validation, fixed (S, T) draws)", "", "```", format_matrix(meta["eval"]), "```", ""]
    lines += [f"Tokenizer sha256: {meta.get('tokenizer_sha256')}", ""]
    return "\n".join(lines)

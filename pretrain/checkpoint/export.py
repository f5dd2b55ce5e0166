"""Consolidated fp32 weights for inference: model.safetensors + model_config.json, plus the
tokenizer's files and a model card (README.md).

This is the format every inference entry point loads (`load_exported`); training checkpoints
(DeepSpeed, sharded) are converted to it by the trainer, Hugging Face checkpoints by
`biglearn convert from-hf`. Exported files hold no absolute paths: the directory can be copied.
A run with model.init starts from an export (`init_config`, `load_init`).
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

from data_pipeline.errors import UserError
from data_pipeline.files import atomic_write

from ..model import BigLearner, ModelConfig, model_from_weights
from .card import model_card

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
        raise UserError(f"{path / CONFIG}: not a model config written by biglearn (pretrain.checkpoint.export, {err})") from None
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


def _same_tokenizer(export_dir: Path, recorded: str, data_sha256: str) -> bool:
    """Whether two recorded tokenizer hashes name one tokenizer: equal, or one the identity and the
    other the file hash (records written before identities) of the tokenizer the export carries."""
    from data_pipeline.tokenizer import Tokenizer

    if recorded == data_sha256:
        return True
    try:
        carried = Tokenizer.load(export_dir)
    except ValueError:
        return False
    return carried.matches(recorded) and carried.matches(data_sha256)


def init_config(config: ModelConfig, vocab_size: int, tokenizer_sha256: str | None) -> ModelConfig:
    """The model config of a run with model.init: the architecture of the export at config.init
    and this config's RUN_KEYS (stream mode, dropout, ...). Refuses data tokenized otherwise."""
    path = Path(config.init)
    try:
        meta = json.loads((path / CONFIG).read_text())
        saved = ModelConfig(**{**meta["model"], **{k: getattr(config, k) for k in RUN_KEYS}})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"model.init={path}: not an exported model ({path / CONFIG}: {err}); import a Hugging Face "
                        "checkpoint with `biglearn convert from-hf`") from None
    recorded = meta.get("tokenizer_sha256")
    if recorded and tokenizer_sha256 and not _same_tokenizer(path, recorded, tokenizer_sha256):
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

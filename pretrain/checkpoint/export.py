"""Consolidated fp32 weights for inference: model.safetensors + model_config.json, plus the
tokenizer's files and a model card (README.md).

This is the format every inference entry point loads (`load_exported`); training checkpoints
(DeepSpeed, sharded) are converted to it by the trainer, Hugging Face checkpoints by
`biglearn convert from-hf`. Exported files hold no absolute paths: the directory can be copied.
A run with model.init starts from an export (`init_config`, `load_init`).
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from data_pipeline.errors import UserError
from data_pipeline.files import atomic_write, staged_directory

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


def copy_tokenizer(tokenizer, out_dir) -> None:
    """The tokenizer's defining files into out_dir (each written atomically)."""
    for name, source in tokenizer.files.items():
        target = Path(out_dir) / name
        if Path(source).resolve() != target.resolve():
            atomic_write(target, Path(source).read_bytes())


def refuse_non_finite(state: dict[str, torch.Tensor], out_dir) -> None:
    """UserError naming the tensors holding NaN or inf: no writer of weights writes a diverged model."""
    diverged = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if diverged:
        raise UserError(f"not exporting to {out_dir}: non-finite weights in {', '.join(diverged[:3])}"
                        f"{' ...' if len(diverged) > 3 else ''} (a diverged model); export an earlier checkpoint")


def export_bytes(n_parameters: int, tokenizer=None) -> int:
    """Disk an export needs: fp32 weights, the tokenizer's files and 1 MiB for config and card."""
    files = sum(Path(f).stat().st_size for f in tokenizer.files.values()) if tokenizer is not None else 0
    return 4 * n_parameters + files + (1 << 20)


def export_model(model: BigLearner, out_dir, metadata: dict | None = None, tokenizer=None,
                 replace: bool = False) -> Path:
    """Write fp32 weights, {"model": config, **metadata} (paths made portable), the tokenizer's
    files when given and the model card into out_dir, staged (data_pipeline.files.staged_directory:
    complete or not at all, after a free-space check). Refuses weights holding NaN or inf (a
    diverged model) and an existing non-empty out_dir unless `replace`, writing nothing."""
    out_dir = Path(out_dir)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    refuse_non_finite(state, out_dir)
    if model.config.tie_embeddings:
        state.pop("head.weight", None)  # tied to embed.weight; safetensors rejects shared storage
    meta = portable({"model": model.config.to_dict(), **(metadata or {})})
    with staged_directory(out_dir, export_bytes(model.num_parameters(), tokenizer), replace) as staging:
        atomic_write(staging / WEIGHTS, save(state))
        if tokenizer is not None:
            copy_tokenizer(tokenizer, staging)
            meta.setdefault("tokenizer_sha256", tokenizer.sha256)
        atomic_write(staging / CONFIG, json.dumps(meta, indent=2, sort_keys=True))
        atomic_write(staging / CARD, model_card(meta, model.num_parameters()))
    return out_dir


def read_config(path) -> tuple[dict, ModelConfig]:
    """(metadata, ModelConfig) of the export at `path`, from its model_config.json; a UserError
    naming the file and the key for anything else (not UTF-8, not a JSON object, a key of the
    wrong kind, a model too large for this machine's memory)."""
    file = Path(path) / CONFIG
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{file}: not a model config written by biglearn (pretrain.checkpoint.export, {err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise UserError(f"{file}: not a model config written by biglearn (expected a JSON object with a \"model\" "
                        "object)")
    try:
        config = ModelConfig(**meta["model"])
    except TypeError as err:  # a key ModelConfig does not have
        raise UserError(f"{file}: {err}") from None
    except UserError as err:
        raise UserError(f"{file}: {err}") from None
    config.require_memory(str(file))
    return meta, config


def load_exported(path, device="cpu") -> tuple[BigLearner, dict]:
    """Load an exported directory; returns (model in eval mode, metadata)."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise UserError(f"{path} is not an exported model: expected {WEIGHTS} and {CONFIG} in it")
    meta, _ = read_config(path)
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
    if not (path / CONFIG).is_file():
        raise UserError(f"model.init={path}: not an exported model (no {CONFIG}); import a Hugging Face checkpoint "
                        "with `biglearn convert from-hf`")
    meta, exported = read_config(path)
    saved = replace(exported, **{k: getattr(config, k) for k in RUN_KEYS})
    recorded = meta.get("tokenizer_sha256")
    if recorded and tokenizer_sha256 and not _same_tokenizer(path, recorded, tokenizer_sha256):
        raise UserError(f"model.init={path} was trained with tokenizer sha256 {recorded} but the data's tokenizer has "
                        f"{tokenizer_sha256}: token ids would not match; shard the data with the tokenizer in {path}")
    if vocab_size > saved.vocab_size:
        raise UserError(f"model.init={path}: vocab_size={saved.vocab_size} is smaller than the data's tokenizer "
                        f"({vocab_size})")
    return saved


def check_init_header(config: ModelConfig) -> None:
    """The export at config.init holds floating-point tensors of the shapes `config` implies, read
    from its safetensors header alone (no tensor data): a run checks this before it allocates
    anything or starts its process group; NaN and inf are found when the weights are loaded."""
    path = Path(config.init) / WEIGHTS
    try:
        with safe_open(str(path), "pt") as weights:
            header = {name: (weights.get_slice(name).get_dtype(), tuple(weights.get_slice(name).get_shape()))
                      for name in weights.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"model.init: {path}: unreadable safetensors file ({err})") from None
    with torch.device("meta"):  # shapes without memory
        expected = BigLearner(config).state_dict()
    for name, (dtype, shape) in header.items():
        if not dtype.startswith(("F", "BF")):
            raise UserError(f"model.init: {path}: tensor {name} has dtype {dtype}; model weights are floating point")
        if name in expected and shape != tuple(expected[name].shape):
            raise UserError(f"model.init: {path}: tensor {name} has shape {shape} but the model config implies "
                            f"{tuple(expected[name].shape)}")


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

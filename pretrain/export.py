"""Consolidated fp32 weights for inference: model.safetensors + model_config.json.

This is the format every inference entry point loads (`load_exported`); training checkpoints
(DeepSpeed, sharded) are converted to it by the trainer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .model import BigLearner, ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"


def export_model(model: BigLearner, out_dir, metadata: dict | None = None) -> Path:
    """Write fp32 weights and {"model": config, **metadata} atomically into out_dir; refuses
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
    tmp = out_dir / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out_dir / WEIGHTS)
    meta = {"model": model.config.to_dict(), **(metadata or {})}
    (out_dir / (CONFIG + ".tmp")).write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(out_dir / (CONFIG + ".tmp"), out_dir / CONFIG)
    return out_dir


def load_exported(path, device="cpu") -> tuple[BigLearner, dict]:
    """Load an exported directory; returns (model in eval mode, metadata)."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise UserError(f"{path} is not an exported model: expected {WEIGHTS} and {CONFIG} in it")
    try:
        meta = json.loads((path / CONFIG).read_text())
        model = BigLearner(ModelConfig(**meta["model"]))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path / CONFIG}: not a model config written by pretrain.export ({err})") from None
    try:
        state = load_file(str(path / WEIGHTS), device="cpu")
    except SafetensorError as err:  # e.g. a truncated download
        raise UserError(f"{path / WEIGHTS}: unreadable safetensors file ({err}); download or export it again") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{path / WEIGHTS} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), meta

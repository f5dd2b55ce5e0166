"""Small helpers every part of pretrain shares: the atomic write and sha256 (torch-free, from
data_pipeline.files, so launch/ and data workers use the same ones) and the one weights loader."""
from __future__ import annotations

import torch

from data_pipeline.files import atomic_write, file_sha256

from .errors import UserError
from .model import BigLearner, ModelConfig

__all__ = ["atomic_write", "file_sha256", "model_from_weights"]


def model_from_weights(model_config: dict, state: dict[str, torch.Tensor], where, device="cpu") -> BigLearner:
    """BigLearner(ModelConfig(**model_config)) holding `state`, in eval mode on `device`.
    `where` names the file or directory in the error when the weights do not fit the config
    (the tied output head is the only key allowed to be absent)."""
    model = BigLearner(ModelConfig(**model_config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match the model config: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()

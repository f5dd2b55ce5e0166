"""The one weights loader: a BigLearner built from a config and a state dict.

Every reader of weights (exports, consolidated checkpoints) ends here, so the check that the
tensors fit the config is made once."""
from __future__ import annotations

import torch

from data_pipeline.errors import UserError

from .config import ModelConfig
from .transformer import BigLearner


def model_from_weights(model_config: dict, state: dict[str, torch.Tensor], where, device="cpu") -> BigLearner:
    """BigLearner(ModelConfig(**model_config)) holding `state`, in eval mode on `device`.
    `where` names the file or directory in the error when the weights do not fit the config
    (the tied output head is the only key allowed to be absent)."""
    model = BigLearner(ModelConfig(**model_config))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except UserError as err:  # weights of the other stream mode than the config says
        raise UserError(f"{where}: {err}") from None
    missing = [k for k in missing if not (k == "head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match the model config: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()

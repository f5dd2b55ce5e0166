"""The one weights loader: a BigLearner built from a config and a state dict.

Every reader of weights (exports, consolidated checkpoints, Hugging Face imports, a run's
model.init, fine-tuning's init) ends here, so the checks that the tensors fit the config, are
floating point and hold no NaN or inf are made once, each a UserError naming the tensor and the
file (docs/reliability.md, "Weights")."""
from __future__ import annotations

import torch

from data_pipeline.errors import UserError

from .config import ModelConfig
from .transformer import BigLearner


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where) -> None:
    """UserError naming the first tensor of `state` that is not floating point, holds NaN or inf,
    or (when `expected` has its name) has another shape than expected[name]."""
    for name, tensor in state.items():
        if not torch.is_floating_point(tensor):
            raise UserError(f"{where}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}; model "
                            "weights are floating point (a file of another kind, or a damaged one)")
        if name in expected and tensor.shape != expected[name].shape:
            raise UserError(f"{where}: tensor {name} has shape {tuple(tensor.shape)} but the model config implies "
                            f"{tuple(expected[name].shape)}")
        if not torch.isfinite(tensor).all():
            raise UserError(f"{where}: tensor {name} holds NaN or inf (a diverged or damaged model); use an earlier "
                            "checkpoint or export")


def model_from_weights(model_config: dict, state: dict[str, torch.Tensor], where, device="cpu") -> BigLearner:
    """BigLearner(ModelConfig(**model_config)) holding `state`, in eval mode on `device`.
    `where` names the file or directory in the error when the weights do not fit the config
    (the tied output head is the only key allowed to be absent)."""
    try:
        config = ModelConfig(**model_config)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    config.require_memory(str(where))
    model = BigLearner(config)
    check_weights(state, model.state_dict(), where)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except UserError as err:  # weights of the other stream mode than the config says
        raise UserError(f"{where}: {err}") from None
    missing = [k for k in missing if not (k == "head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match the model config: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()

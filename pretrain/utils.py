"""Small helpers every part of pretrain shares: the atomic write and sha256 (torch-free, from
data_pipeline.files, so launch/ and data workers use the same ones), the one weights loader, and
the run directory's metrics file name and matrix format (read by training, evaluation, export)."""
from __future__ import annotations

import torch

from data_pipeline.files import atomic_write, file_sha256

from .errors import UserError
from .model import BigLearner, ModelConfig

__all__ = ["METRICS", "atomic_write", "file_sha256", "format_matrix", "model_from_weights"]
METRICS = "metrics.jsonl"  # JSON lines of a run directory: train and eval records


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


def format_matrix(matrix: dict, baseline: dict | None = None) -> str:
    lines = [f"{'task':<14}{'NLL/token':>11}{'perplexity':>12}" + (f"{'untrained NLL':>15}" if baseline else "")]
    for task, row in matrix.items():
        line = f"{task:<14}{row['nll']:>11.4f}{row['ppl']:>12.2f}"
        lines.append(line + (f"{baseline[task]['nll']:>15.4f}" if baseline else ""))
    return "\n".join(lines)

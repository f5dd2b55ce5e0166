"""Loading a model for inference, with the tokenizer check.

Exported directories and DeepSpeed checkpoints are read by pretrain.checkpoint.load_for_inference
(which uses the one weights loader, pretrain.utils.model_from_weights); this adds the refusal of a
tokenizer whose sha256 differs from the one the model was trained with (token ids would not match).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoint import load_for_inference
from ..errors import UserError


def load_model(path, device="cpu", tokenizer_sha256: str | None = None, trust_checkpoint: bool = False):
    """(model in eval mode, metadata) from an exported directory, or with trust_checkpoint=True a
    DeepSpeed checkpoint / run directory (pretrain.checkpoint.load_for_inference). Refuses a
    model whose recorded tokenizer differs from `tokenizer_sha256`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path {path} does not exist")
    model, meta = load_for_inference(path, device=device, trust_checkpoint=trust_checkpoint)
    recorded = meta.get("tokenizer_sha256")
    if tokenizer_sha256 is not None:
        if recorded is None:
            print(f"warning: {path} records no tokenizer_sha256; cannot check it matches the tokenizer", file=sys.stderr)
        elif recorded != tokenizer_sha256:
            raise UserError(f"{path} was trained with tokenizer sha256 {recorded}, but the given tokenizer has "
                             f"sha256 {tokenizer_sha256}: token ids would not match")
    return model, meta


def bundled_tokenizer(export_dir: Path) -> Path | None:
    """An export's own tokenizer directory (exports carry it, docs/hf.md), else None."""
    from data_pipeline.tokenizer import HF_FILE, INFO_FILE, MODEL_FILE
    return export_dir if any((export_dir / n).is_file() for n in (INFO_FILE, HF_FILE, MODEL_FILE)) else None

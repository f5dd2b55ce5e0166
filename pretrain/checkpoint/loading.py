"""Loading a trained model for inference and export, with the tokenizer check.

An exported directory (or a run directory holding export/, or a fine-tuning run's model/) is
read as it is; a DeepSpeed checkpoint only when the caller passes trust_checkpoint=True,
weights-only (its .pt files are pickles). Every path ends in the one weights loader,
pretrain.model.model_from_weights. A tokenizer whose sha256 differs from the one the model was
trained with is refused: token ids would not match. `load_with_tokenizer` is what inference
entry points call: the model and the tokenizer it carries (or the one given).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from data_pipeline.errors import UserError, one_line

from ..model import BigLearner, model_from_weights
from .card import manifest_summary
from .export import CONFIG as EXPORT_CONFIG, WEIGHTS as EXPORT_WEIGHTS, export_model, load_exported
from .rundir import EXPORT, FINETUNED, describe, last_eval, lock_holder
from .sharded import COMPLETE, META, CheckpointError, checkpoint_problem, consolidated_state_dict, find_checkpoint


def exported_dir(path) -> Path | None:
    """The export at `path`: the directory itself, a run dir's export/ or a fine-tuning run's model/."""
    path = Path(path)
    for exported in (path, path / EXPORT, path / FINETUNED):
        if (exported / EXPORT_WEIGHTS).is_file() and (exported / EXPORT_CONFIG).is_file():
            return exported
    return None


def load_for_inference(path, device="cpu", trust_checkpoint: bool = False) -> tuple[BigLearner, dict]:
    """(BigLearner in eval mode, metadata) from an exported dir, or a run dir holding one
    (exported_dir); with trust_checkpoint=True also from a DeepSpeed checkpoint tag, a
    checkpoints/ dir or a run dir without export (the newest complete checkpoint)."""
    path = Path(path)
    exported = exported_dir(path)
    if exported is not None:
        return load_exported(exported, device)
    tag_dir = find_checkpoint(path)
    if tag_dir is None:
        raise CheckpointError(f"{path}: no exported model ({EXPORT_WEIGHTS}) and no complete checkpoint "
                              f"(a step_* dir with {COMPLETE}) found")
    if not trust_checkpoint:
        raise CheckpointError(
            f"{path} holds no exported {EXPORT_WEIGHTS}, only the DeepSpeed checkpoint {tag_dir}, whose .pt files are "
            "pickles; pass --trust-checkpoint to read it (weights-only), or export it first with "
            f"`biglearn export {tag_dir} OUT_DIR --trust-checkpoint`")
    meta = json.loads((tag_dir / META).read_text())
    try:
        state = consolidated_state_dict(tag_dir)
    except (CheckpointError, OSError, RuntimeError, EOFError, KeyError) as err:
        if isinstance(err, CheckpointError) and "refused to load" in str(err):
            raise
        raise CheckpointError(f"cannot read {tag_dir}: {_changed_under_us(tag_dir) or one_line(err)[:300]}") from None
    model = model_from_weights(meta["config"]["model"], state, tag_dir, device)
    return model, {**meta, "checkpoint": str(tag_dir)}


def _changed_under_us(tag_dir: Path) -> str | None:
    """Why a tag that was intact a moment ago no longer reads: removed or damaged, and by whom
    when a run holds its run directory (its checkpoint rotation removes old tags)."""
    problem = checkpoint_problem(tag_dir) if tag_dir.is_dir() else "it was removed while being read"
    if problem is None:
        return None
    holder = lock_holder(tag_dir.parent.parent)
    by = f"; {describe(holder)} is training in that run and rotates its checkpoints: export a newer one" \
        if holder else ""
    return problem + by


def load_model(path, device="cpu", tokenizer=None, trust_checkpoint: bool = False):
    """load_for_inference, refusing a model whose recorded tokenizer is not `tokenizer` (a
    data_pipeline Tokenizer, compared by what it maps: Tokenizer.matches)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path {path} does not exist: give an exported model directory or a run directory")
    model, meta = load_for_inference(path, device=device, trust_checkpoint=trust_checkpoint)
    recorded = meta.get("tokenizer_sha256")
    if tokenizer is not None:
        if recorded is None:
            print(f"warning: {path} records no tokenizer_sha256; cannot check it matches the tokenizer", file=sys.stderr)
        elif not tokenizer.matches(recorded):
            raise UserError(f"{path} was trained with tokenizer sha256 {recorded}, but the given tokenizer has "
                            f"sha256 {tokenizer.sha256}: token ids would not match")
    return model, meta


def bundled_tokenizer(path) -> Path | None:
    """The tokenizer directory an export carries (docs/hf.md) for an export or a run dir holding
    one (exported_dir), else None."""
    from data_pipeline.tokenizer import HF_FILE, INFO_FILE, MODEL_FILE

    exported = exported_dir(path)
    if exported is None or not any((exported / n).is_file() for n in (INFO_FILE, HF_FILE, MODEL_FILE)):
        return None
    return exported


def load_with_tokenizer(path, device="cpu", tokenizer=None, trust_checkpoint: bool = False):
    """(model, metadata, tokenizer) for inference from an export or a run directory: `tokenizer`
    when given (a path of any kind Tokenizer.load reads), else the one the export carries, else
    (a checkpoint) the run's dataset tokenizer; None when there is none. A missing path and a
    tokenizer that cannot be read are one-line UserErrors naming them."""
    from data_pipeline.tokenizer import Tokenizer

    path = Path(path)
    tokenizer_path = tokenizer if tokenizer is not None else bundled_tokenizer(path)
    loaded = None
    if tokenizer_path is not None:
        try:
            loaded = Tokenizer.load(tokenizer_path)
        except ValueError as err:  # a missing or inconsistent tokenizer: the message names the file
            raise UserError(f"{'--tokenizer' if tokenizer is not None else path}: {err}") from None
    model, meta = load_model(path, device, loaded, trust_checkpoint=trust_checkpoint)
    return model, meta, loaded or run_tokenizer(meta)


def run_tokenizer(meta: dict):
    """The tokenizer a run trained with (the one its dataset carries), or None when it is not here."""
    from data_pipeline.tokenizer import Tokenizer

    manifest = meta.get("manifest")
    try:
        tokenizer = Tokenizer.load(Path(manifest).parent) if manifest else None
    except ValueError:
        return None
    return tokenizer if tokenizer is not None and tokenizer.matches(meta.get("tokenizer_sha256")) else None


def export_metadata(meta: dict) -> dict:
    """What an export records of a checkpoint: its metadata, a summary of its data and the
    validation matrix of its step (export_model makes the paths portable)."""
    extra = {k: v for k, v in meta.items() if k not in ("model", "run_dir", "checkpoint")}
    if meta.get("manifest"):
        extra["data"] = manifest_summary(meta["manifest"])
    extra["eval"] = last_eval(meta.get("run_dir"), meta.get("progress", {}).get("step"))
    return extra


def export_checkpoint(path, out_dir, trust_checkpoint: bool = False, replace: bool = False) -> Path:
    """Consolidated fp32 export (pretrain.checkpoint.export format) of the newest intact checkpoint
    at `path`, with the run's tokenizer, a summary of its data and its last validation matrix;
    staged (complete or nothing) into out_dir, which must be new or empty unless `replace`."""
    tag_dir = find_checkpoint(path)
    model, meta = load_for_inference(tag_dir or path, trust_checkpoint=trust_checkpoint)
    return export_model(model, out_dir, export_metadata(meta), run_tokenizer(meta), replace=replace)

"""Training checkpoints (DeepSpeed, sharded) and loading them for inference.

Layout of run_dir/checkpoints/:

    step_00001000/                 one DeepSpeed tag (model/optimizer shards of every rank)
        rank_00000.pt ...          per-rank trainer state: data cursor, RNG states
        meta.json                  step, tokens seen, resolved config, git revision, world size
        COMPLETE                   written LAST, by rank 0, after every rank finished writing
    latest                         name of the newest complete tag (DeepSpeed's convention)

A tag without COMPLETE (a run killed mid-write) is never resumed from or loaded, and is
deleted before a save reuses its name.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from .export import CONFIG as EXPORT_CONFIG, WEIGHTS as EXPORT_WEIGHTS, export_model, load_exported
from .model import BigLearner, ModelConfig

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
LATEST = "latest"
MODULE_PREFIX = "model."  # the engine wraps BigLearner in engine.LossModel


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rank_{rank:05d}.pt"


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file()


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete tag directories, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob("step_*") if p.is_dir() and is_complete(p))


def find_checkpoint(path) -> Path | None:
    """Newest complete checkpoint at `path`: a tag dir, a checkpoints/ dir or a run dir."""
    path = Path(path)
    if (path / META).is_file() or path.name.startswith("step_"):
        return path if is_complete(path) else None
    for candidate in (path / CHECKPOINTS, path):
        found = complete_checkpoints(candidate)
        if found:
            return found[-1]
    return None


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(engine, checkpoint_dir, step: int, meta: dict, rank_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Writes the DeepSpeed tag, each rank's state, then meta and
    the COMPLETE marker (rank 0, after a barrier), updates `latest` and prunes old checkpoints."""
    checkpoint_dir = Path(checkpoint_dir)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tag = tag_name(step)
    tag_dir = checkpoint_dir / tag
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # left by a run killed mid-write (or a complete save of the same step)
            shutil.rmtree(tag_dir)
    _barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(rank_state, rank_file(tag_dir, rank))
    _barrier()
    if rank == 0:
        _write_atomic(tag_dir / META, json.dumps(meta, indent=2, sort_keys=True, default=str))
        _write_atomic(tag_dir / COMPLETE, "")
        _write_atomic(checkpoint_dir / LATEST, tag)
        for old in complete_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return tag_dir


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(engine, tag_dir) -> tuple[dict, dict]:
    """Collective: restore engine (weights, optimizer, schedule) and return (meta, this rank's state)."""
    tag_dir = Path(tag_dir)
    if not is_complete(tag_dir):
        raise ValueError(f"{tag_dir} is not a complete checkpoint (no {COMPLETE} marker)")
    meta = json.loads((tag_dir / META).read_text())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if meta["world_size"] != world:
        raise ValueError(f"{tag_dir} was saved by {meta['world_size']} ranks but this run has {world}: the data "
                         "cursor and ZeRO shards are per rank; resume with the same number of processes")
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load {tag_dir}")
    return meta, torch.load(rank_file(tag_dir, rank), weights_only=False)


# --------------------------------------------------------------------------- inference

def consolidated_state_dict(tag_dir) -> dict[str, torch.Tensor]:
    """fp32 BigLearner weights from a tag, whatever the ZeRO stage (1-3 via DeepSpeed's
    zero_to_fp32, which reassembles the partitioned fp32 master weights; stage 0 from the model file)."""
    tag_dir = Path(tag_dir)
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ValueError(f"{tag_dir} holds no DeepSpeed model states")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k: v.float() for k, v in state.items()}


def load_for_inference(path, device="cpu") -> tuple[BigLearner, dict]:
    """(BigLearner in eval mode, metadata) from an exported dir, a checkpoint tag, a checkpoints/
    dir or a run dir (newest complete checkpoint, else run_dir/export)."""
    path = Path(path)
    if (path / EXPORT_WEIGHTS).is_file() and (path / EXPORT_CONFIG).is_file():
        return load_exported(path, device)
    tag_dir = find_checkpoint(path)
    if tag_dir is None:
        if (path / "export" / EXPORT_WEIGHTS).is_file():
            return load_exported(path / "export", device)
        raise ValueError(f"{path}: no exported model ({EXPORT_WEIGHTS}) and no complete checkpoint "
                         f"(a step_* dir with {COMPLETE}) found")
    meta = json.loads((tag_dir / META).read_text())
    model = BigLearner(ModelConfig(**meta["config"]["model"]))
    state = consolidated_state_dict(tag_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{tag_dir}: weights do not match the model config: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), {**meta, "checkpoint": str(tag_dir)}


def export_checkpoint(path, out_dir) -> Path:
    """Consolidated fp32 export (pretrain.export format) of the newest complete checkpoint at `path`."""
    model, meta = load_for_inference(path)
    return export_model(model, out_dir, {k: v for k, v in meta.items() if k != "model"})


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m pretrain.checkpoint",
        description="Export consolidated fp32 weights (model.safetensors + model_config.json) from the newest "
                    "complete checkpoint at PATH (a run dir, checkpoints/ dir or step_* dir; any ZeRO stage).",
        epilog="example: python -m pretrain.checkpoint runs/demo runs/demo/export_step1000")
    parser.add_argument("path", help="run dir, checkpoints/ dir or step_* checkpoint")
    parser.add_argument("out_dir", help="directory to write the exported model into")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.path, args.out_dir)
    except ValueError as err:
        print(f"pretrain.checkpoint: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training checkpoints: DeepSpeed's sharded tags, saved and restored without running code.

Layout of run_dir/checkpoints/:

    step_00001000/                 one DeepSpeed tag (model/optimizer shards of every rank)
        rank_00000.pt ...          per-rank trainer state: data cursor, RNG states
        meta.json                  step, tokens seen, resolved config, git revision, world size
        COMPLETE                   written LAST, by rank 0, after every rank finished writing
    latest                         name of the newest complete tag (DeepSpeed's convention)
    universal/step_00001000/       DeepSpeed universal copy of a tag, made when a run resumes it on
                                   another number of ranks; pruned with its tag

A save writes into checkpoints/.partial-step_N/ and renames it to step_N/ only once COMPLETE is
in it, so a save that fails (a full disk, a killed rank) leaves no COMPLETE marker under a
step_* name and never removes an older complete checkpoint, not even one of the same step.
Before writing, every rank checks the free space against the newest checkpoint's size plus a
margin (`check_free_space`) and the run stops with one line naming the path and the numbers.
Whoever reads a tag first checks it against its COMPLETE record (`checkpoint_problem`): a
truncated, missing or replaced file or an unreadable meta.json makes it damaged, named in one
line, and resume or export falls back to the newest intact tag (`find_checkpoint`).

Loading never runs code from a file: DeepSpeed's `.pt` files are pickles, and a pickle can
execute anything when loaded (people download checkpoints). Everything here is read with
torch's weights-only unpickler, which accepts tensors, containers and numbers, plus the few
plain DeepSpeed classes its checkpoints contain (`SAFE_DEEPSPEED_GLOBALS`); the per-rank
trainer state is stored as plain types only. Inference (pretrain.checkpoint.loading) prefers the
exported safetensors and reads a DeepSpeed checkpoint only when the caller passes
trust_checkpoint=True (`--trust-checkpoint` on the command lines), still weights-only.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import torch

from data_pipeline.errors import UserError
from data_pipeline.files import atomic_write, contained
from data_pipeline.resources import free_disk

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
LATEST = "latest"
MODULE_PREFIX = "model."  # the engine wraps BigLearner in a loss module as `model` (pretrain.train.task)
UNIVERSAL = "universal"  # checkpoints/universal/step_N: a tag converted for a resume on another world size
PARTIAL = ".partial-"  # prefix of a tag being written; never matches step_*
STALE = ".stale-"  # a complete tag of the same step, moved aside while the new one takes its name
TAG = re.compile(r"step_\d{8}")
# Free space needed before a save: the newest checkpoint's size (or the estimate for a first
# save) times this, plus FREE_SPACE_SLACK for meta.json, markers and logs written meanwhile.
FREE_SPACE_FACTOR = 1.10
FREE_SPACE_SLACK = 1 << 20
# First-save estimate: fp32 weights, fp32 master copy and AdamW's two moments per parameter.
BYTES_PER_PARAMETER = 16


log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint cannot be written or read; the message names the path and the reason."""


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
    return sorted(p for p in checkpoint_dir.glob("step_*") if TAG.fullmatch(p.name) and p.is_dir() and is_complete(p))


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """{path relative to tag_dir: bytes} of every file of a tag: what COMPLETE records."""
    return {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(Path(tag_dir).rglob("*")) if f.is_file()}


def _legacy_problem(tag_dir: Path, world_size: int) -> str | None:
    """For a tag saved before COMPLETE recorded its files: the files every tag has."""
    names = [rank_file(tag_dir, r).name for r in range(world_size)]
    if not any(tag_dir.glob("*model_states.pt")):
        names.append("mp_rank_00_model_states.pt")
    optimizer = list(tag_dir.glob("*optim_states.pt"))
    if optimizer and len(optimizer) != world_size:
        return f"it holds {len(optimizer)} optimizer state file(s) for {world_size} rank(s)"
    missing = [name for name in names if not (tag_dir / name).is_file()]
    return f"{missing[0]} is missing" if missing else None


def checkpoint_problem(tag_dir) -> str | None:
    """Why a complete tag cannot be read, in a few words, or None when it is intact: a file that
    COMPLETE records is missing or has another size than when it was saved (truncated, replaced),
    or meta.json does not parse. A few stats and one small read: cheap enough for every resume,
    export and inference."""
    tag_dir = Path(tag_dir)
    try:
        record = (tag_dir / COMPLETE).read_text()
        files = json.loads(record)["files"] if record.strip() else None
        if files is not None and not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {COMPLETE} record is unreadable ({err})"
    for name, size in (files or {}).items():
        try:
            actual = contained(tag_dir, name, f"its {COMPLETE} record's file").stat().st_size
        except UserError as err:
            return str(err)
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} is {actual} bytes but was {size} when saved (truncated or replaced)"
    try:
        meta = json.loads((tag_dir / META).read_text())
        world_size, _, _ = int(meta["world_size"]), int(meta["progress"]["step"]), dict(meta["config"]["model"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{META} is unreadable ({type(err).__name__}: {err})"
    return _legacy_problem(tag_dir, world_size) if files is None else None


def find_checkpoint(path, warn: bool = True) -> Path | None:
    """Newest intact complete checkpoint at `path`: a tag dir, a checkpoints/ dir or a run dir.
    In a directory of tags a damaged one is skipped, with a one-line warning naming it and what
    is wrong (unless warn=False); a damaged tag given by name is a CheckpointError, and so is a
    directory whose complete tags are all damaged."""
    path = Path(path)
    if (path / META).is_file() or path.name.startswith("step_"):
        if not is_complete(path):
            return None
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path
    for candidate in (path / CHECKPOINTS, path):
        found = complete_checkpoints(candidate)
        damaged = []
        for tag_dir in reversed(found):
            problem = checkpoint_problem(tag_dir)
            if problem is None:
                if warn and damaged:
                    log.warning("checkpoint %s is damaged (%s); using the newest intact one, %s",
                                damaged[0][0], damaged[0][1], tag_dir.name)
                return tag_dir
            damaged.append((tag_dir, problem))
        if damaged:
            raise CheckpointError(f"every complete checkpoint in {candidate} is damaged: "
                                  + "; ".join(f"{t.name} ({p})" for t, p in damaged))
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


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# --------------------------------------------------------------------------- loading without running code

def safe_deepspeed_globals() -> list:
    """The plain classes DeepSpeed (0.14-0.19) pickles into its checkpoints besides tensors,
    containers and numbers: the ZeRO stage enum, the loss scalers (their state is a few numbers)
    and ZeRO-1/2's fragment addresses (two ints). Nothing else is unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def _refused(path, err: pickle.UnpicklingError) -> CheckpointError:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    what = f"it needs {found.group(1)}, which is not on the allow-list" if found else str(err).splitlines()[0]
    return CheckpointError(f"{path}: refused to load this pickle with torch's weights-only unpickler ({what}); "
                           "a checkpoint written by this project needs nothing else")


@contextlib.contextmanager
def weights_only_loading():
    """Inside: every torch.load is weights-only, allowing `safe_deepspeed_globals()` too.

    DeepSpeed 0.19 hard-codes torch.load(..., weights_only=False) in its checkpoint engine and
    in zero_to_fp32, so their calls are routed through this restricted load for the duration."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise _refused(f, err) from None

    with torch.serialization.safe_globals(safe_deepspeed_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


# --------------------------------------------------------------------------- saving

def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def check_free_space(checkpoint_dir, estimate_bytes: int) -> None:
    """Collective: every rank checks the free space where it will write; if any rank lacks room
    for the newest complete checkpoint's size (`estimate_bytes` before the first save) plus the
    margin, every rank raises the same CheckpointError, before anything is written."""
    checkpoint_dir = Path(checkpoint_dir)
    previous = complete_checkpoints(checkpoint_dir)
    size = directory_bytes(previous[-1]) if previous else estimate_bytes
    needed = int(size * FREE_SPACE_FACTOR) + FREE_SPACE_SLACK
    free = free_disk(checkpoint_dir)
    spare = torch.tensor([free - needed, free, needed], dtype=torch.float64)
    if torch.distributed.is_initialized():  # the tightest rank decides, for everyone
        if torch.distributed.get_backend() == "nccl":  # NCCL gathers device tensors only
            spare = spare.to(torch.device("cuda", torch.cuda.current_device()))
        everyone = [torch.zeros_like(spare) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(everyone, spare)
        spare = min(everyone, key=lambda t: t[0].item()).cpu()
    if spare[0] < 0:
        basis = f"newest checkpoint {previous[-1].name} is {size / 2**20:.1f} MiB" if previous else \
            f"estimated {size / 2**20:.1f} MiB for the first checkpoint"
        raise CheckpointError(
            f"not enough free space to save a checkpoint in {checkpoint_dir}: {spare[1] / 2**20:.1f} MiB free, "
            f"need {spare[2] / 2**20:.1f} MiB ({basis}, plus {FREE_SPACE_FACTOR - 1:.0%} and "
            f"{FREE_SPACE_SLACK / 2**20:.0f} MiB); free some space or move run_dir")


def _write_failed(path: Path, step: int, err: Exception) -> CheckpointError:
    free = free_disk(path)
    reason = f"no space left on device ({free / 2**20:.1f} MiB free)" if free < FREE_SPACE_SLACK else \
        " ".join(str(err).split())[:300]
    return CheckpointError(f"saving the step-{step} checkpoint into {path} failed: {reason}; "
                           "older complete checkpoints are untouched")


def save_checkpoint(engine, checkpoint_dir, step: int, meta: dict, rank_state: dict, keep_last: int,
                    estimate_bytes: int = 0, protect: Path | None = None) -> Path:
    """Collective: every rank calls it. Checks the free space, writes the DeepSpeed tag and each
    rank's state into a partial directory, then (rank 0, after a barrier) meta and COMPLETE,
    renames it to step_N, updates `latest` and prunes all but the newest `keep_last` complete
    checkpoints and `protect` (the divergence guard's last good checkpoint)."""
    checkpoint_dir = Path(checkpoint_dir)
    rank, _ = _rank_and_world()
    tag_dir = checkpoint_dir / tag_name(step)
    partial = checkpoint_dir / (PARTIAL + tag_dir.name)
    check_free_space(checkpoint_dir, estimate_bytes)
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for leftover in [*checkpoint_dir.glob(PARTIAL + "*"), *checkpoint_dir.glob(STALE + "*"),
                         *checkpoint_dir.glob(f"{UNIVERSAL}/{PARTIAL}*")]:
            shutil.rmtree(leftover, ignore_errors=True)  # never complete: left by a failed or killed save
    _barrier()
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=partial.name, client_state={"step": step}, save_latest=False)
        torch.save(rank_state, rank_file(partial, rank))
    except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError("... unexpected pos ...")
        failure = _write_failed(partial, step, err)
        shutil.rmtree(partial, ignore_errors=True)
        raise failure from err
    _barrier()
    if rank == 0:
        try:
            atomic_write(partial / META, json.dumps(meta, indent=2, sort_keys=True, default=str))
            atomic_write(partial / COMPLETE, json.dumps({"files": file_sizes(partial)}, indent=1))
            stale = checkpoint_dir / (STALE + tag_dir.name)
            if tag_dir.exists():
                os.replace(tag_dir, stale)
            os.replace(partial, tag_dir)
            shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(checkpoint_dir / UNIVERSAL / tag_dir.name, ignore_errors=True)  # converted from `stale`
            atomic_write(checkpoint_dir / LATEST, tag_dir.name)
        except OSError as err:
            raise _write_failed(partial, step, err) from err
        for old in complete_checkpoints(checkpoint_dir)[:-keep_last]:
            if protect is None or old != Path(protect):
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(checkpoint_dir / UNIVERSAL / old.name, ignore_errors=True)
    _barrier()
    return tag_dir


def load_checkpoint(engine, tag_dir, universal_dir=None) -> tuple[dict, dict]:
    """Collective: restore engine (weights, optimizer, schedule) and return (meta, this rank's
    state), every file read weights-only.

    A checkpoint saved by another number of ranks is loaded through DeepSpeed's universal
    checkpoint (ZeRO's optimizer shards regrouped per parameter, `universal_copy`, written once
    into `universal_dir`, by default checkpoints/universal/); rank r then takes rank r's state,
    or rank 0's where the saved run had no rank r (the data cursor is global, docs/data.md)."""
    tag_dir = Path(tag_dir)
    if not is_complete(tag_dir):
        raise CheckpointError(f"{tag_dir} is not a complete checkpoint (no {COMPLETE} marker)")
    problem = checkpoint_problem(tag_dir)
    if problem:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged: {problem}")
    meta = json.loads((tag_dir / META).read_text())
    rank, world = _rank_and_world()
    saved_world = meta["world_size"]
    load_dir, universal = tag_dir, saved_world != world and any(tag_dir.glob("*optim_states.pt"))
    if universal:  # stage 0 keeps the whole optimizer in the model file: any world size loads it as is
        load_dir = universal_copy(tag_dir, Path(universal_dir or tag_dir.parent / UNIVERSAL), saved_world)
    # DeepSpeed reads checkpoint.load_universal only while loading, and the engine exists before
    # the checkpoint is chosen: set it for this load only.
    engine._config.load_universal_checkpoint = universal
    try:
        with weights_only_loading():
            load_path, _ = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load {load_dir}")
            return meta, torch.load(rank_file(tag_dir, rank if rank < saved_world else 0))
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as err:
        # Sizes matched what was saved, yet a file does not read back (damaged in place).
        raise CheckpointError(f"checkpoint {tag_dir} cannot be loaded ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]}); resume from an older one with resume=PATH") from err
    finally:
        engine._config.load_universal_checkpoint = False


def universal_copy(tag_dir: Path, universal_dir: Path, saved_world: int) -> Path:
    """Collective: universal_dir/<tag>, DeepSpeed's universal checkpoint of tag_dir (converted by
    rank 0 with deepspeed.checkpoint.ds_to_universal, into a temporary directory renamed when
    done; tag_dir is only read). A copy made earlier from the same tag is reused."""
    rank, world = _rank_and_world()
    target = universal_dir / tag_dir.name
    source = str(tag_dir.resolve())
    error = None
    if rank == 0 and not (is_complete(target) and (target / COMPLETE).read_text() == source):
        log.info("%s was saved by %d ranks and this run has %d: converting it to a DeepSpeed universal checkpoint "
                 "in %s (the original stays as it is)", tag_dir, saved_world, world, target)
        partial = universal_dir / (PARTIAL + tag_dir.name)
        try:
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            # The converter also writes `latest_universal` next to its output: keep that inside `partial`.
            # One process: its worker pools would fork a process that holds the process group, and
            # the weights-only loading set here would not reach spawned workers.
            args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(partial / tag_dir.name),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            with weights_only_loading(), no_stdout():
                ds_to_universal(args)
            atomic_write(partial / tag_dir.name / COMPLETE, source)
            os.replace(partial / tag_dir.name, target)
            shutil.rmtree(partial, ignore_errors=True)
        except Exception as err:  # whatever it is, the other ranks must hear of it (they wait below)
            error = f"converting {tag_dir} to a universal checkpoint in {partial} failed: {err}"
            shutil.rmtree(partial, ignore_errors=True)
    if torch.distributed.is_initialized():  # every rank fails together, or loads together
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise CheckpointError(error)
    return target


@contextlib.contextmanager
def no_stdout():
    """Swallow what a library prints (DeepSpeed's zero_to_fp32 prints a dozen progress lines
    per consolidation and has no switch for them)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def consolidated_state_dict(tag_dir) -> dict[str, torch.Tensor]:
    """fp32 BigLearner weights from a tag, whatever the ZeRO stage (1-3 via DeepSpeed's
    zero_to_fp32, which reassembles the partitioned fp32 master weights; stage 0 from the model
    file), read weights-only."""
    tag_dir = Path(tag_dir)
    with weights_only_loading():
        if any(tag_dir.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with no_stdout():
                state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        else:
            files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states")
            state = torch.load(files[0], map_location="cpu")["module"]
    return {k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k: v.float() for k, v in state.items()}

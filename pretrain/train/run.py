"""Pretraining: `python -m pretrain.train [group=option] [key=value] ...` (also `biglearn train`).

Also under `deepspeed --num_gpus N --module pretrain.train ...` and `torchrun --nproc_per_node N
-m pretrain.train ...`. Configs: configs/ (see --help).

The loop itself is pretrain.train.trainer.Trainer (signals, the divergence guard, exact resume,
metrics, checkpoints); this module builds what it trains, in order: the data (the demo build),
the config as the data decides it (pretrain.train.config.resolve), the data stream, the model,
the DeepSpeed engine and the PretrainTask (per-task NLL, tokens, FLOPs, MFU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

import torch

from data_pipeline.errors import UserError, add_debug_flag, cli_main, one_line
from data_pipeline.files import remove_temporary_files
from data_pipeline.progress import heartbeat
from data_pipeline.resources import existing_parent

from ..checkpoint import sharded as ckpt
from ..checkpoint.card import format_matrix
from ..checkpoint.export import check_init_header, load_init
from ..checkpoint.loading import export_checkpoint
from ..checkpoint.rundir import EXPORT, LOCK, METRICS, describe, release_lock, take_lock
from ..data import DataConfig, data_counters, open_train_stream
from ..model import BigLearner, ModelConfig
from ..objectives import ObjectiveSampler
from .composition import to_dict, to_yaml
from .config import CONFIG_DIR, TrainConfig, available_options, load_config, resolve, resolve_run_dir
from .console import run_logging
from .engine import (apply_hyperparameters, build_engine, changed_hyperparameters, engine_schedule, precision,
                     process_group, use_cpu)
from .evaluate import eval_batches, evaluate, validation_windows
from .guard import TrainingError
from .metrics import MetricsLog
from .plots import plot_run
from .task import PretrainTask, peak_flops
from .trainer import STOP_SIGNALS, StopRequest, Trainer, seed_everything

log = logging.getLogger("pretrain.train")


def prepare_data(data: DataConfig, rank: int) -> Path:
    """The manifest whose tokenizer and validation split the run uses; kind=demo builds the data
    first (rank 0, once, reused when already built) from the stdlib corpus."""
    manifest = data.manifest_path()
    if data.kind == "demo" and not data.sources:
        import data_pipeline

        if rank == 0:
            data_pipeline.build_demo(manifest.parent, vocab_size=data.demo_vocab_size, seq_len=data.demo_seq_len,
                                     stdlib_limit=data.demo_max_files or None, progress=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    return manifest.resolve()


def _resume_checkpoint(config: TrainConfig, checkpoint_dir: Path, warn: bool) -> Path | None:
    """The checkpoint this run resumes: resume=never none, resume=auto the newest intact one in
    run_dir (a damaged newer one is named in a warning), resume=PATH the newest intact one there."""
    if config.resume == "never":
        return None
    if config.resume == "auto":
        return ckpt.find_checkpoint(checkpoint_dir, warn=warn)
    found = ckpt.find_checkpoint(config.resume, warn=warn)
    if found is None:
        raise UserError(f"resume: no complete checkpoint at {config.resume}")
    return found


ARCHITECTURE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "tie_embeddings",
                     "streams", "n_segment_types", "max_seq_len", "rope_base", "rope_scaling")


def check_resumable(tag_dir: Path, model: ModelConfig) -> None:
    """UserError naming every model key whose value differs from the checkpoint's: its weights
    would not fit (or, for RoPE and max_seq_len, would mean something else)."""
    saved = json.loads((tag_dir / ckpt.META).read_text())["config"]["model"]
    changed = [f"model.{k}={getattr(model, k)!r} (checkpoint: {saved.get(k)!r})" for k in ARCHITECTURE_KEYS
               if k in saved and saved[k] != getattr(model, k)]
    if changed:
        raise UserError(f"cannot resume {tag_dir}: {', '.join(changed)}; the architecture must match the checkpoint's "
                        "(drop those overrides, or start over with resume=never or another run_dir)")


def training_bytes_per_parameter(ds, world_size: int, on_cpu: bool) -> float:
    """Memory per parameter each rank needs for training, a lower bound: fp32 weights and
    gradients, plus AdamW's two fp32 moments (and an fp32 master copy under bf16/fp16), split
    over the ranks by ZeRO stages >= 1."""
    shards = world_size if ds.zero_stage >= 1 else 1
    optimizer = 8 + (4 if precision(ds, on_cpu) != "fp32" else 0)
    return 8 + optimizer / shards


def check_config(config: TrainConfig, world_size: int) -> tuple[bool, TrainConfig]:
    """What the run reads, checked before anything is allocated, written or started (every rank
    checks): the accelerator and precision, the data-decided config (manifests, model.init's
    header), the memory the model and its training state need. Returns (whether it runs on CPU,
    the config as the data decides it)."""
    on_cpu = use_cpu(config.deepspeed)
    per_parameter = training_bytes_per_parameter(config.deepspeed, world_size, on_cpu)
    resolved, _ = resolve(config)
    if resolved.model.init:
        check_init_header(resolved.model)
    if on_cpu:
        resolved.model.require_memory("model training state", per_parameter)
    else:
        free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))
        resolved.model.require_memory("model training state", per_parameter, free, "GPU memory")
    return on_cpu, resolved


def check_writable(run_dir: Path) -> None:
    """UserError naming run_dir unless this process can create files in it (or create it: its
    nearest existing parent is then checked; nothing is created here)."""
    where = existing_parent(run_dir)
    if not where.is_dir():
        problem = "not a directory"
    elif os.statvfs(where).f_flag & os.ST_RDONLY:
        problem = "a read-only file system"
    elif not os.access(where, os.W_OK | os.X_OK):
        problem = "permission denied"
    else:
        return
    raise UserError(f"run_dir={run_dir}: cannot write there ({where}: {problem}); choose a writable run_dir")


@contextlib.contextmanager
def run_directory_lock(run_dir: Path, rank: int, stale_after_s: float):
    """Rank 0 holds run_dir/LOCK for the length of the run (pretrain.checkpoint.rundir): a second
    run on the same directory stops here with one line naming the holder, before the process
    group (its launcher stops the other ranks). Temporary files a killed writer left are removed."""
    if rank != 0:
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        replaced = take_lock(run_dir, stale_after_s)
    except UserError:
        if created:
            run_dir.rmdir()
        raise
    if replaced is not None:
        print(f"note: {run_dir / LOCK} was held by {describe(replaced)}, which is no longer running; taken over",
              file=sys.stderr, flush=True)
    try:
        for directory in (run_dir, run_dir / ckpt.CHECKPOINTS):
            if directory.is_dir():
                remove_temporary_files(directory)
        yield
    finally:
        release_lock(run_dir)
        # A run that stopped before its first record or checkpoint (refused, or failed at its start)
        # leaves no directory it created behind, not even one holding only its log.
        if created and not any((run_dir / name).exists() for name in (METRICS, ckpt.CHECKPOINTS)):
            shutil.rmtree(run_dir, ignore_errors=True)


def train(config: TrainConfig, stop: StopRequest | None = None) -> dict:
    """Run (or resume) pretraining on the Trainer; returns a summary. Collective: every rank calls it.
    SIGTERM, SIGUSR1 and SIGINT stop it with a checkpoint from the process group's start on
    (`stop`, the caller's when it handles them beyond the run)."""
    if config.trainer.deterministic:  # deterministic cuBLAS needs a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # the launcher's
    run_dir = resolve_run_dir(config).resolve()
    on_cpu, resolved = check_config(config, world_size)
    check_writable(run_dir)
    ds = config.deepspeed
    with run_directory_lock(run_dir, rank, 2 * ds.dist_timeout_s):
        resume_from = _resume_checkpoint(config, run_dir / ckpt.CHECKPOINTS, warn=rank == 0)
        if resume_from is not None:
            check_resumable(resume_from, resolved.model)
        stop = stop or StopRequest()
        with process_group(on_cpu, ds.dist_timeout_s, ds.extension_wait_s) as (rank, world_size, _), stop.installed():
            with run_logging(run_dir, rank):
                manifest = prepare_data(config.data, rank)
                config, note = resolve(config)
                log.info("%s", note)
                return _train(config, manifest, on_cpu, rank, world_size, run_dir, resume_from, stop)


def _train(config: TrainConfig, manifest: Path, on_cpu: bool, rank: int, world_size: int, run_dir: Path,
           resume_from: Path | None, stop: StopRequest) -> dict:
    t = config.trainer
    seed_everything(t.seed, t.deterministic)
    try:
        stream = open_train_stream(config.data, ObjectiveSampler(config.objective), manifest, rank, world_size)
    except ValueError as err:  # the reader names the manifest, shard or field it rejects
        raise UserError(f"data: {err}") from None
    model = BigLearner(config.model)
    if config.model.init:
        load_init(model)
    task = PretrainTask(config.model, stream.seq_len, peak_flops(t.peak_tflops, on_cpu), on_cpu, world_size)
    first_save_bytes = ckpt.BYTES_PER_PARAMETER * model.num_parameters()  # free-space check before a first save
    if rank == 0:
        log.info("building the DeepSpeed engine (its first imports take seconds)")
    with heartbeat("building the DeepSpeed engine", enabled=rank == 0):
        engine, ds_config = build_engine(config.deepspeed, t, config.data.batch_size, t.total_steps(stream),
                                         task.module(model), world_size, on_cpu)
    if rank == 0:  # a start is several steps of seconds each: say where it is
        dtype = next((name for name in ("bf16", "fp16") if ds_config[name]["enabled"]), "fp32")
        log.info("DeepSpeed engine ready (ZeRO stage %d, %s); reading the validation batches",
                 config.deepspeed.zero_stage, dtype)
    evaluator = None
    if any(s["split"] == "val" for s in stream.manifest["shards"]):
        windows = validation_windows(manifest, config.eval.batches, config.eval.batch_size or config.data.batch_size)
        fixed_eval = eval_batches(windows, config.eval, stream.pad_id)
        evaluator = lambda e: {"tasks": evaluate(e, fixed_eval, e.device, rank, world_size)}  # noqa: E731
    elif rank == 0:
        log.warning("note: %s has no validation split: training without evaluation (rebuild the shards with "
                    "--val-fraction > 0 for one)", manifest)
    meta = {"config": to_dict(config), "manifest": str(manifest), "run_dir": str(run_dir),
            "world_size": world_size, "git_revision": ckpt.git_revision(),
            # inference refuses a tokenizer whose hash differs (token ids would not match)
            "tokenizer_sha256": stream.manifest["tokenizer"]["sha256"]}
    trainer = Trainer(engine, stream, task, t, run_dir, meta=meta, rank=rank,
                      evaluator=evaluator,
                      extra_record=lambda totals, elapsed: {**task.extra_record(totals, elapsed),
                                                            "data": data_counters(stream)},
                      first_save_bytes=first_save_bytes, schedule=engine_schedule(engine), stop=stop)
    if resume_from is not None:
        saved = trainer.load(resume_from)["config"]["trainer"]
        changed = changed_hyperparameters(saved, t)
        if changed:
            apply_hyperparameters(engine, t, trainer.max_steps, changed)
            if rank == 0:
                log.warning("resume: %s changed since %s; applied from step %d on (docs/training.md, \"Resume\")",
                            ", ".join(f"trainer.{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()),
                            resume_from.name, trainer.progress.step + 1)
    if rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(config))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
        trainer.metrics = MetricsLog(run_dir, trainer.progress.step if resume_from else None, t.loggers, to_dict(config))
        log.info("run dir %s | %d ranks | %s | %.2fM parameters | %s", run_dir, world_size,
                 "cpu" if on_cpu else torch.cuda.get_device_name(), model.num_parameters() / 1e6, manifest)
    try:
        summary = {**trainer.run(), "data": data_counters(stream)}
    finally:
        stream.close()  # the data workers stop with the run, whatever ended it
    if summary["stopped"] == "signal":
        return {k: summary[k] for k in ("run_dir", "step", "checkpoint", "stopped", "data")}
    summary["eval"] = summary["eval"]["tasks"] if "eval" in summary else None
    if rank == 0:
        if summary["eval"] is not None:
            log.info("validation matrix at step %d:\n%s", summary["step"], format_matrix(summary["eval"]))
        if t.export_at_end and not summary["healthy"]:
            log.warning("not exporting: the run ended %d bad step(s) into a streak (from step %d)",
                        trainer.guard.bad_in_row, trainer.guard.first_bad_step)
        elif t.export_at_end:
            log.info("exporting fp32 weights to %s", run_dir / EXPORT)
            summary["export"] = str(export_checkpoint(trainer.last_saved, run_dir / EXPORT, trust_checkpoint=True,
                                                      replace=True))
        if config.eval.plot:
            summary["plot"] = str(plot_run(run_dir, summary["eval"]))
    return summary


# --------------------------------------------------------------------------- command line

def _help_text() -> str:
    options = "\n".join(f"  {group + '=':<12}{' | '.join(names)}" for group, names in available_options().items())
    return f"""Config groups (configs/, pick one with group=option):
{options}

Any key can be set with key=value, e.g. trainer.lr=1e-3 model.n_layers=6 run_dir=runs/x resume=never.
Unknown keys, wrong types and invalid values fail at start with the key's name.
Schemas and defaults: pretrain/train/config.py; print the resolved config with --cfg.

examples:
  python -m pretrain.train experiment=smoke
  python -m pretrain.train experiment=demo deepspeed=cpu trainer.max_steps=200
  deepspeed --num_gpus 8 --module pretrain.train experiment=small data.manifest=data/manifest.json
  torchrun --nproc_per_node 2 -m pretrain.train experiment=smoke deepspeed=cpu run_dir=runs/smoke2

outputs (run_dir): metrics.jsonl, tensorboard/, train.log, config.yaml, deepspeed_config.json,
checkpoints/step_*/ (resume=auto continues from the newest complete one), export/ (fp32 weights
for inference), training.png (loss curves + validation matrix).
SIGTERM or SIGUSR1 saves a checkpoint and exits 0."""


def retry_advice(prog: str, overrides: list[str], lr: float, last_good: str | None) -> str:
    """The command that continues a diverged run: the same overrides with a 10x lower learning
    rate, from the last good checkpoint (or from scratch when none was saved)."""
    kept = [o for o in overrides if not o.startswith(("trainer.lr=", "resume="))]
    retry = [*kept, f"trainer.lr={lr / 10:g}", f"resume={last_good}" if last_good else "resume=never"]
    what = "resume from it" if last_good else "start over"
    return f"to {what} with a 10x lower learning rate: {prog} {' '.join(shlex.quote(o) for o in retry)}"


def _main(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     epilog=_help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides")
    parser.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_debug_flag(parser)
    args = parser.parse_intermixed_args(argv)
    config = load_config(args.overrides, CONFIG_DIR)
    if args.cfg:
        config, note = resolve(config)
        print(f"# {note}\n{to_yaml(config)}")
        return 0
    stop = StopRequest()
    try:
        summary = train(config, stop)
    except TrainingError as err:  # diverged: no user mistake, but an expected stop with one line, exit 1
        message = f"{err}; {retry_advice(prog, args.overrides, config.trainer.lr, err.last_good)}"
        log.error("%s", message)
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
        return 1
    finally:
        if stop.signum:  # told to stop: a repeated signal must not end the exit with status 143
            for sig in STOP_SIGNALS:  # (SIG_IGN outlives the interpreter's shutdown; a Python handler does not)
                signal.signal(sig, signal.SIG_IGN)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    return 0


def main(argv=None, prog: str = "python -m pretrain.train") -> int:
    return cli_main(lambda args: _main(args, prog), prog, argv)


if __name__ == "__main__":
    sys.exit(main())

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
import json
import logging
import os
import sys
from pathlib import Path

import torch

from data_pipeline.errors import UserError, add_debug_flag, cli_main, one_line
from data_pipeline.files import removed_on_failure
from data_pipeline.progress import heartbeat

from ..checkpoint import sharded as ckpt
from ..checkpoint.card import format_matrix
from ..checkpoint.export import load_init
from ..checkpoint.loading import export_checkpoint
from ..checkpoint.rundir import EXPORT, METRICS
from ..data import DataConfig, data_counters, open_train_stream
from ..model import BigLearner
from ..objectives import ObjectiveSampler
from .composition import to_dict, to_yaml
from .config import CONFIG_DIR, TrainConfig, available_options, load_config, resolve, resolve_run_dir
from .console import run_logging
from .engine import build_engine, engine_schedule, process_group, use_cpu
from .evaluate import eval_batches, evaluate, validation_windows
from .guard import TrainingError
from .metrics import MetricsLog
from .plots import plot_run
from .task import PretrainTask, peak_flops
from .trainer import Trainer, seed_everything

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


def _resume_checkpoint(config: TrainConfig, checkpoint_dir: Path) -> Path | None:
    if config.resume == "never":
        return None
    if config.resume == "auto":
        return ckpt.find_checkpoint(checkpoint_dir)
    found = ckpt.find_checkpoint(config.resume)
    if found is None:
        raise UserError(f"resume: no complete checkpoint at {config.resume}")
    return found


def train(config: TrainConfig) -> dict:
    """Run (or resume) pretraining on the Trainer; returns a summary. Collective: every rank calls it."""
    if config.trainer.deterministic:  # deterministic cuBLAS needs a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    on_cpu = use_cpu(config.deepspeed)
    ds = config.deepspeed
    with process_group(on_cpu, ds.dist_timeout_s, ds.extension_wait_s) as (rank, world_size, _):
        run_dir = resolve_run_dir(config).resolve()
        # A start that fails before the first record or checkpoint leaves no run directory behind.
        with removed_on_failure(run_dir, unless=(METRICS, ckpt.CHECKPOINTS), owner=rank == 0), \
                run_logging(run_dir, rank):
            manifest = prepare_data(config.data, rank)
            config, note = resolve(config)
            log.info("%s", note)
            return _train(config, manifest, on_cpu, rank, world_size, run_dir)


def _train(config: TrainConfig, manifest: Path, on_cpu: bool, rank: int, world_size: int, run_dir: Path) -> dict:
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
    windows = validation_windows(manifest, config.eval.batches, config.eval.batch_size or config.data.batch_size)
    fixed_eval = eval_batches(windows, config.eval, stream.pad_id)
    meta = {"config": to_dict(config), "manifest": str(manifest), "run_dir": str(run_dir),
            "world_size": world_size, "git_revision": ckpt.git_revision(),
            # inference refuses a tokenizer whose hash differs (token ids would not match)
            "tokenizer_sha256": stream.manifest["tokenizer"]["sha256"]}
    trainer = Trainer(engine, stream, task, t, run_dir, meta=meta, rank=rank,
                      evaluator=lambda e: {"tasks": evaluate(e, fixed_eval, e.device, rank, world_size)},
                      extra_record=lambda totals, elapsed: {**task.extra_record(totals, elapsed),
                                                            "data": data_counters(stream)},
                      first_save_bytes=first_save_bytes, schedule=engine_schedule(engine))
    resume_from = _resume_checkpoint(config, trainer.checkpoint_dir)
    if resume_from is not None:
        trainer.load(resume_from)
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
    summary["eval"] = summary["eval"]["tasks"]
    if rank == 0:
        log.info("validation matrix at step %d:\n%s", summary["step"], format_matrix(summary["eval"]))
        if t.export_at_end and not summary["healthy"]:
            log.warning("not exporting: the run ended %d bad step(s) into a streak (from step %d)",
                        trainer.guard.bad_in_row, trainer.guard.first_bad_step)
        elif t.export_at_end:
            log.info("exporting fp32 weights to %s", run_dir / EXPORT)
            summary["export"] = str(export_checkpoint(trainer.last_saved, run_dir / EXPORT, trust_checkpoint=True))
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
    try:
        summary = train(config)
    except TrainingError as err:  # diverged: no user mistake, but an expected stop with one line, exit 1
        log.error("%s", err)
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    return 0


def main(argv=None, prog: str = "python -m pretrain.train") -> int:
    return cli_main(lambda args: _main(args, prog), prog, argv)


if __name__ == "__main__":
    sys.exit(main())

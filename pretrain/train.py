"""Pretraining loop: `python -m pretrain.train [group=option] [key=value] ...`.

Also under `deepspeed --num_gpus N --module pretrain.train ...`, `torchrun --nproc_per_node N
-m pretrain.train ...` and `biglearn train`. Configs: configs/ (see --help).

The loop itself is pretrain.trainer.Trainer (signals, the divergence guard, exact resume,
metrics, checkpoints); this module builds what it trains: the data stream, the model, the
DeepSpeed engine and PretrainTask (per-task NLL, tokens, FLOPs, MFU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import resource
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .collate import QUERY_PREDICTOR
from .config import (CONFIG_DIR, TrainConfig, TrainerConfig, available_options, load_config, resolve_run_dir, to_dict,
                     to_yaml)
from .engine import LossModel, build_engine, engine_schedule, process_group, task_stats, use_cpu
from .errors import UserError, add_debug_flag, cli_main, one_line
from .evaluate import eval_batches, evaluate, plot_run, validation_windows
from .export import init_config, load_init
from .guard import TrainingError
from .logs import quiet_third_party
from .mixing import data_counters, open_train_stream
from .model import BigLearner, ModelConfig
from .objectives import TASKS, ObjectiveSampler
from .trainer import MetricsLog, Trainer, TrainerSettings
from .utils import format_matrix

log = logging.getLogger("pretrain.train")
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) for MFU; trainer.peak_tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
               "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


# --------------------------------------------------------------------------- pieces

def prepare_manifest(config: TrainConfig, rank: int) -> Path:
    """The manifest to train on; kind=demo builds it (rank 0, once) from the stdlib corpus."""
    d = config.data
    for i, source in enumerate(d.sources):
        if not Path(source.manifest).is_file():
            raise ValueError(f"data.sources[{i}].manifest: {source.manifest} does not exist")
    if d.sources:  # evaluation reads the first source's validation split
        return Path(d.sources[0].manifest)
    if d.kind == "manifest":
        path = Path(d.manifest)
        if not path.is_file():
            raise UserError(f"data.manifest: {path} does not exist")
        return path
    import data_pipeline

    out = demo_data_dir(d)
    if rank == 0:
        data_pipeline.build_demo(out, vocab_size=d.demo_vocab_size, seq_len=d.demo_seq_len,
                                 stdlib_limit=d.demo_max_files or None, progress=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out / data_pipeline.MANIFEST


def demo_data_dir(d) -> Path:
    """Where kind=demo builds (or finds) its data: one directory per vocabulary, length and corpus size."""
    return Path(d.demo_dir) / (f"vocab{d.demo_vocab_size}_len{d.demo_seq_len}"
                               + (f"_files{d.demo_max_files}" if d.demo_max_files else ""))


def config_as_run(config: TrainConfig) -> tuple[TrainConfig, str]:
    """The config with model.vocab_size and model.bos_id as the run will set them from the data's
    tokenizer (train() does so at start), and a line saying where they come from: --cfg prints
    what the run uses, not the schema default."""
    import data_pipeline
    from data_pipeline.tokenizer import SPECIAL_IDS

    if config.model.init:
        return config, f"model: architecture and vocabulary from the export model.init={config.model.init}"
    d = config.data
    if d.sources or d.kind == "manifest":
        manifest = Path(d.sources[0].manifest if d.sources else d.manifest)
    else:
        manifest = demo_data_dir(d) / data_pipeline.MANIFEST
    if manifest.is_file():
        tokenizer = data_pipeline.load_manifest(manifest, d.allow_external_shards)["tokenizer"]
        vocab, bos, origin = int(tokenizer["vocab_size"]), int(tokenizer["bos_id"]), str(manifest)
    elif d.kind == "demo" and not d.sources:  # not built yet: build_demo makes exactly this tokenizer
        vocab, bos, origin = d.demo_vocab_size, SPECIAL_IDS["bos_id"], f"data.demo_vocab_size (built into {manifest})"
    else:
        return config, (f"model.vocab_size and model.bos_id: taken at start from {manifest}'s tokenizer "
                        f"(not readable now); configured {config.model.vocab_size}, {config.model.bos_id}")
    note = (f"model.vocab_size: {vocab}, model.bos_id: {bos} from {origin}, the data's tokenizer "
            f"(configured: {config.model.vocab_size}, {config.model.bos_id})")
    return replace(config, model=replace(config.model, vocab_size=vocab, bos_id=bos)), note


def step_flops(model: ModelConfig, batch) -> float:
    """Training FLOPs of one micro-batch (forward + backward = 3 x forward) of the rows the model
    computes in its mode (docs/model.md): content rows that someone reads (S and every target
    group but the last, plus START with streams=1) run every layer but the last, where only
    their K/V are needed; query rows (every target with two streams, the targets batch.predictor
    gives a query row with one) run every layer but the last; in the last layer each target's
    predictor row runs and feeds the vocabulary projection. Attention counts the keys each row sees."""
    d, hd, h, hkv, f = model.d_model, model.head_dim, model.n_heads, model.n_kv_heads, model.ffn_hidden
    q_proj, kv_proj, out_proj, mlp = d * h * hd, 2 * d * hkv * hd, h * hd * d, 3 * d * f
    single = model.streams == 1
    n_content = n_query = visible = visible_last = 0.0
    for b, n_target in enumerate(batch.n_target.tolist()):
        target_groups = batch.target_groups[b][:n_target]
        keys = batch.groups[b][:batch.n_source[b] + n_target]
        keys = np.concatenate([[0] * single, keys[keys < target_groups.max()]])  # sorted: a prefix
        queries = target_groups[batch.predictor[b][:n_target] == QUERY_PREDICTOR] if single else target_groups
        n_content += len(keys)
        n_query += len(queries)
        visible += np.searchsorted(keys, keys, side="right").sum() + np.searchsorted(keys, queries, side="left").sum()
        visible_last += np.searchsorted(keys, target_groups, side="left").sum()
    layers, n_targets = model.n_layers, float(batch.n_target.sum())
    matmul = 2 * (n_content * ((layers - 1) * (q_proj + kv_proj + out_proj + mlp) + kv_proj)
                  + n_query * (layers - 1) * (q_proj + out_proj + mlp)
                  + n_targets * (q_proj + out_proj + mlp + d * model.vocab_size))
    attention = 4 * h * hd * (visible * (layers - 1) + visible_last)
    return 3.0 * (matmul + attention)


def peak_flops(config: TrainConfig, on_cpu: bool) -> float | None:
    if config.trainer.peak_tflops > 0:
        return config.trainer.peak_tflops * 1e12
    if on_cpu:
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def memory_gb(on_cpu: bool) -> float:
    if on_cpu:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux
    return torch.cuda.max_memory_allocated() / 2 ** 30


@contextlib.contextmanager
def _run_logging(run_dir: Path, rank: int):
    """Root logging for one run: stderr (and train.log on rank 0), put back as it was at exit so
    that a later run or the caller's own logging (a notebook, pytest) finds no closed streams."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    formatter = logging.Formatter(f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
    root.handlers = handlers
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_third_party()
    try:
        yield
    finally:
        for handler in handlers:
            handler.close()
        root.handlers, root.level = saved_handlers, saved_level


def _resume_checkpoint(config: TrainConfig, checkpoint_dir: Path) -> Path | None:
    if config.resume == "never":
        return None
    if config.resume == "auto":
        return ckpt.find_checkpoint(checkpoint_dir)
    found = ckpt.find_checkpoint(config.resume)
    if found is None:
        raise UserError(f"resume: no complete checkpoint at {config.resume}")
    return found


class PretrainTask:
    """Pretraining on the trainer: BigLearner.loss inside the engine, per-task NLL statistics,
    token / prediction / FLOP counters, and MFU + memory in the log record."""

    def __init__(self, model_config: ModelConfig, seq_len: int, peak: float | None, on_cpu: bool, world_size: int):
        self.model_config, self.seq_len, self.peak, self.on_cpu, self.world_size = (
            model_config, seq_len, peak, on_cpu, world_size)

    def module(self, model: BigLearner) -> torch.nn.Module:
        return LossModel(model)

    def sums(self, batch, device_batch, output) -> dict[str, torch.Tensor]:
        stats = task_stats(device_batch, output)
        counters = [batch.tokens.shape[0] * self.seq_len, float(batch.n_target.sum()), step_flops(self.model_config, batch)]
        return {**stats, **dict(zip(("tokens", "predicted", "flops"), torch.tensor(counters, dtype=torch.float64)))}

    def record(self, totals: dict[str, list[float]]) -> dict:
        nll, count = totals["nll_sum"], totals["count"]
        return {"loss": sum(nll) / max(sum(count), 1.0),
                "task_loss": {task: n / c for task, n, c in zip(TASKS, nll, count) if c > 0}}

    def extra_record(self, totals: dict[str, list[float]], elapsed: float) -> dict:
        extra = {"memory_gb": memory_gb(self.on_cpu)}
        if self.peak:
            extra["mfu"] = totals["flops"][0] / elapsed / (self.peak * self.world_size)
        return extra


def settings_of(t: TrainerConfig) -> TrainerSettings:
    return TrainerSettings(max_steps=t.max_steps, grad_accum=t.grad_accum, log_every=t.log_every,
                           eval_every=t.eval_every, save_every=t.save_every, keep_last=t.keep_last,
                           max_bad_steps=t.max_bad_steps, max_minutes=t.max_minutes, progress=t.progress,
                           log_sample_keys=t.log_sample_keys)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Same initial weights on every rank (ZeRO-3 partitions each rank's copy)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def train(config: TrainConfig) -> dict:
    """Run (or resume) pretraining on the Trainer; returns a summary. Collective: every rank calls it."""
    if config.vae is not None:
        raise UserError("experiment=vae_digits configures the BigLearn-VAE of bench/vae.py (continuous patch tokens); "
                        "run `python bench/vae.py`, not pretrain.train")
    t = config.trainer
    if t.deterministic:  # deterministic cuBLAS needs a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    on_cpu = use_cpu(config)
    with process_group(on_cpu, config.deepspeed.dist_timeout_s) as (rank, world_size, _):
        run_dir = resolve_run_dir(config).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        with _run_logging(run_dir, rank):
            return _train(config, on_cpu, rank, world_size, run_dir)


def _train(config: TrainConfig, on_cpu: bool, rank: int, world_size: int, run_dir: Path) -> dict:
    t = config.trainer
    seed_everything(t.seed, t.deterministic)

    manifest = prepare_manifest(config, rank).resolve()
    try:
        stream = open_train_stream(config.data, ObjectiveSampler(config.objective), manifest, rank, world_size)
    except ValueError as err:  # the reader names the manifest, shard or field it rejects
        raise UserError(f"data: {err}") from None
    tokenizer = stream.manifest["tokenizer"]
    if config.model.init:  # architecture and weights of an export (docs/hf.md)
        config = replace(config, model=init_config(config.model, stream.vocab_size, tokenizer["sha256"]))
    elif (config.model.vocab_size, config.model.bos_id) != (stream.vocab_size, tokenizer["bos_id"]):
        log.info("model.vocab_size, model.bos_id set to %d, %d from %s", stream.vocab_size, tokenizer["bos_id"], manifest)
        config = replace(config, model=replace(config.model, vocab_size=stream.vocab_size, bos_id=tokenizer["bos_id"]))
    if stream.n_segments > config.model.n_segment_types and not config.model.init:
        # the model's segment embedding sees the data's segment ids
        log.info("model.n_segment_types set to %d from %s", stream.n_segments, manifest)
        config = replace(config, model=replace(config.model, n_segment_types=stream.n_segments))
    if stream.seq_len > config.model.max_seq_len:
        raise UserError(f"model.max_seq_len={config.model.max_seq_len} is shorter than the data's windows "
                        f"({stream.seq_len} tokens, {manifest})")
    model = BigLearner(config.model)
    if config.model.init:
        load_init(model)
    task = PretrainTask(config.model, stream.seq_len, peak_flops(config, on_cpu), on_cpu, world_size)
    first_save_bytes = ckpt.BYTES_PER_PARAMETER * model.num_parameters()  # free-space check before a first save
    engine, ds_config = build_engine(config, task.module(model), world_size, on_cpu)
    windows = validation_windows(manifest, config.eval.batches, config.eval.batch_size or config.data.batch_size)
    fixed_eval = eval_batches(windows, config.eval, stream.pad_id)
    meta = {"config": to_dict(config), "manifest": str(manifest), "run_dir": str(run_dir),
            "world_size": world_size, "git_revision": ckpt.git_revision(),
            # inference refuses a tokenizer whose hash differs (token ids would not match)
            "tokenizer_sha256": stream.manifest["tokenizer"]["sha256"]}
    trainer = Trainer(engine, stream, task, settings_of(t), run_dir, meta=meta, rank=rank,
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
            summary["export"] = str(ckpt.export_checkpoint(trainer.last_saved, run_dir / "export", trust_checkpoint=True))
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
Schemas and defaults: pretrain/config.py; print the resolved config with --cfg.

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
        config, note = config_as_run(config)
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

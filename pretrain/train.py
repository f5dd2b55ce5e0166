"""Pretraining loop: `python -m pretrain.train [group=option] [key=value] ...`.

Also under `deepspeed --num_gpus N --module pretrain.train ...`, `torchrun --nproc_per_node N
-m pretrain.train ...` and the `biglearn-train` console script. Configs: configs/ (see --help).

One optimizer step = trainer.grad_accum micro-batches per rank. Every rank agrees on three
things through one small all-reduce per micro-batch: whether the loss was finite everywhere
(a non-finite loss skips the micro-batch on all ranks and counts as a bad step for the
divergence guard, pretrain.guard, as does a skipped or non-finite optimizer step; trainer.max_bad_steps
in a row stop the run), whether to stop (SIGTERM/SIGUSR1 or the time budget, on any rank), and a digest of the
sample keys consumed (so resumed runs can be checked to read the same data).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import signal
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .collate import QUERY_PREDICTOR
from .config import CONFIG_DIR, TrainConfig, available_options, load_config, resolve_run_dir, to_dict, to_yaml
from .engine import build_engine, dynamic_loss_scale, init_distributed, task_stats, use_cpu
from .errors import UserError, add_debug_flag, cli_main, one_line
from .evaluate import eval_batches, evaluate, plot_run, validation_windows
from .export import init_config, load_init
from .guard import BadStepGuard, TrainingError
from .mixing import data_counters, open_train_stream
from .model import BigLearner, ModelConfig
from .objectives import TASKS, ObjectiveSampler
from .utils import METRICS, format_matrix

log = logging.getLogger("pretrain.train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
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

    out = Path(d.demo_dir) / (f"vocab{d.demo_vocab_size}_len{d.demo_seq_len}"
                              + (f"_files{d.demo_max_files}" if d.demo_max_files else ""))
    if rank == 0:
        data_pipeline.build_demo(out, vocab_size=d.demo_vocab_size, seq_len=d.demo_seq_len,
                                 stdlib_limit=d.demo_max_files or None, progress=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out / data_pipeline.MANIFEST


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


class MetricsLog:
    """JSON lines (run_dir/metrics.jsonl) + TensorBoard, rank 0 only."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / METRICS
        kept = []
        if resume_step is not None and self.path.is_file():
            # Records past the resumed checkpoint belong to the interrupted attempt: drop them.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))  # a fresh run starts a fresh file
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is None:
            return
        prefix = record["kind"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
            elif isinstance(value, dict):
                for task, item in value.items():
                    scalar = item["nll"] if isinstance(item, dict) else item
                    self.writer.add_scalar(f"{prefix}/{key}/{task}", scalar, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _setup_logging(run_dir: Path, rank: int) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _resume_checkpoint(config: TrainConfig, checkpoint_dir: Path) -> Path | None:
    if config.resume == "never":
        return None
    if config.resume == "auto":
        return ckpt.find_checkpoint(checkpoint_dir)
    found = ckpt.find_checkpoint(config.resume)
    if found is None:
        raise UserError(f"resume: no complete checkpoint at {config.resume}")
    return found


# --------------------------------------------------------------------------- the loop

def train(config: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary. Collective: every rank calls it."""
    if config.vae is not None:
        raise UserError("experiment=vae_digits configures the BigLearn-VAE of bench/vae.py (continuous patch tokens); "
                        "run `python bench/vae.py`, not pretrain.train")
    t = config.trainer
    if t.deterministic:  # deterministic cuBLAS needs a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    on_cpu = use_cpu(config)
    rank, world_size, _ = init_distributed(on_cpu, config.deepspeed.dist_timeout_s)
    run_dir = resolve_run_dir(config).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir, rank)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)  # same initial weights on every rank (ZeRO-3 partitions each rank's copy)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)

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
    first_save_bytes = ckpt.BYTES_PER_PARAMETER * model.num_parameters()  # free-space check before a first save
    engine, ds_config = build_engine(config, model, world_size, on_cpu)
    device = engine.device

    checkpoint_dir = run_dir / ckpt.CHECKPOINTS
    progress = {"step": 0, "tokens_seen": 0, "predicted_seen": 0, "skipped_micro_batches": 0, "data_digest": 0}
    resume_from = _resume_checkpoint(config, checkpoint_dir)
    guard = BadStepGuard(t.max_bad_steps)
    if resume_from is not None:
        meta, rank_state = ckpt.load_checkpoint(engine, resume_from)
        progress.update(meta["progress"])
        if "guard" in meta:
            guard.load_state_dict(meta["guard"])
        guard.saved(resume_from)
        try:
            stream.load_state_dict(rank_state["data"])
        except ValueError as err:
            raise UserError(f"cannot resume {resume_from} with this data: {err}. Start over with resume=never "
                            "or use another run_dir") from None
        ckpt.set_rng_state(rank_state["rng"])
        log.info("resumed from %s (step %d)", resume_from, progress["step"])
    windows = validation_windows(manifest, config.eval.batches, config.eval.batch_size or config.data.batch_size)
    fixed_eval = eval_batches(windows, config.eval, stream.pad_id)

    metrics = None
    if rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(config))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
        metrics = MetricsLog(run_dir, progress["step"] if resume_from else None, t.tensorboard)
        log.info("run dir %s | %d ranks | %s | %.2fM parameters | %s", run_dir, world_size,
                 "cpu" if on_cpu else torch.cuda.get_device_name(), model.num_parameters() / 1e6, manifest)

    meta_base = {"config": to_dict(config), "manifest": str(manifest), "run_dir": str(run_dir),
                 "world_size": world_size, "git_revision": ckpt.git_revision(),
                 # inference refuses a tokenizer whose hash differs (token ids would not match)
                 "tokenizer_sha256": stream.manifest["tokenizer"]["sha256"]}

    def save() -> Path:
        meta = {**meta_base, "progress": dict(progress), "data_stats": stream.stats, "guard": guard.state_dict()}
        rank_state = {"data": stream.state_dict(), "rng": ckpt.rng_state()}
        tag_dir = ckpt.save_checkpoint(engine, checkpoint_dir, progress["step"], meta, rank_state, t.keep_last,
                                       estimate_bytes=first_save_bytes, protect=guard.protected)
        guard.saved(tag_dir)
        log.info("saved %s", tag_dir)
        return tag_dir

    def run_eval() -> dict:
        engine.eval()
        matrix = evaluate(engine, fixed_eval, device, rank, world_size)
        engine.train()
        if metrics is not None:
            metrics.write({"kind": "eval", "step": progress["step"], "tasks": matrix})
        return matrix

    stop_signal = {"signum": 0}

    def on_signal(signum, frame):
        stop_signal["signum"] = signum  # acted on at the next micro-batch, by every rank together

    previous_handlers = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    peak = peak_flops(config, on_cpu)
    bar = None
    if rank == 0 and t.progress:
        from tqdm import tqdm
        bar = tqdm(total=t.max_steps, initial=progress["step"], desc="train", unit="step", dynamic_ncols=True)

    window = torch.zeros(2 * len(TASKS) + 3, dtype=torch.float64)  # nll[T], count[T], tokens, predicted, flops
    window_start = time.perf_counter()
    started = time.perf_counter()
    stop_reason, last_saved = None, resume_from
    batches = iter(stream)
    engine.train()
    try:
        while progress["step"] < t.max_steps and stop_reason is None:
            micro = 0
            while micro < t.grad_accum:
                batch = next(batches)
                keys_crc = zlib.crc32("\n".join(stream.last_keys).encode())
                device_batch = batch.to_torch(device)
                loss, nll = engine(device_batch)
                over_time = t.max_minutes > 0 and rank == 0 and time.perf_counter() - started > 60 * t.max_minutes
                flags = torch.tensor([0.0, float(stop_signal["signum"] != 0), float(over_time), float(keys_crc)],
                                     dtype=torch.float64, device=device)
                flags[0] = (~torch.isfinite(loss.detach())).double()
                torch.distributed.all_reduce(flags)  # on the device: NCCL reduces GPU tensors only
                n_nonfinite, signalled, timed_out, crc_sum = flags.tolist()
                progress["data_digest"] = (progress["data_digest"] + int(crc_sum)) % (1 << 61)
                if signalled or timed_out:
                    stop_reason = "signal" if signalled else "time budget"
                if n_nonfinite:
                    # Non-finite loss somewhere: no rank backpropagates this micro-batch.
                    progress["skipped_micro_batches"] += 1
                    guard.bad(progress["step"] + 1, f"non-finite loss on {int(n_nonfinite)} rank(s), micro-batch skipped")
                    continue
                engine.backward(loss)
                engine.step()
                micro += 1
                stats = task_stats(device_batch, nll)
                window[:len(TASKS)] += stats["nll_sum"].double().cpu()
                window[len(TASKS):2 * len(TASKS)] += stats["count"].double().cpu()
                window[-3] += batch.tokens.shape[0] * stream.seq_len
                window[-2] += float(batch.n_target.sum())
                window[-1] += step_flops(config.model, batch)
            guard.optimizer_step(progress["step"] + 1, engine.was_step_applied(), engine.get_global_grad_norm(),
                                 *dynamic_loss_scale(engine))
            progress["step"] += 1
            step = progress["step"]
            if bar is not None:
                bar.update(1)
            saving = t.save_every and step % t.save_every == 0
            # Save steps are log steps too, so a checkpoint's token counters include every step before it.
            if step % t.log_every == 0 or step == t.max_steps or stop_reason or saving:
                totals = window.to(device)
                torch.distributed.all_reduce(totals)
                totals = totals.cpu().tolist()
                progress["tokens_seen"] += int(totals[-3])
                progress["predicted_seen"] += int(totals[-2])
                elapsed = time.perf_counter() - window_start
                nll, count = totals[:len(TASKS)], totals[len(TASKS):2 * len(TASKS)]
                grad_norm = engine.get_global_grad_norm()
                record = {
                    "kind": "train", "step": step, "loss": sum(nll) / max(sum(count), 1.0),
                    "task_loss": {task: n / c for task, n, c in zip(TASKS, nll, count) if c > 0},
                    "lr": engine.get_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": totals[-3] / elapsed, "predicted_per_s": totals[-2] / elapsed,
                    "tokens_seen": progress["tokens_seen"], "memory_gb": memory_gb(on_cpu),
                    "skipped_micro_batches": progress["skipped_micro_batches"],
                    "data_digest": progress["data_digest"], "epoch": stream.stats["epoch"],
                    "data": data_counters(stream),
                }
                if peak:
                    record["mfu"] = totals[-1] / elapsed / (peak * world_size)
                if metrics is not None:
                    metrics.write(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window.zero_()
                window_start = time.perf_counter()
            if t.eval_every and step % t.eval_every == 0 and step < t.max_steps and stop_reason is None:
                run_eval()
            if saving and step < t.max_steps and stop_reason is None:
                last_saved = save()
        if bar is not None:
            bar.close()  # before the final messages (closing again in `finally` is harmless)
        if stop_reason is not None:
            log.warning("stopping at step %d (%s): saving a checkpoint", progress["step"], stop_reason)
        last_saved = save() if last_saved is None or last_saved.name != ckpt.tag_name(progress["step"]) else last_saved
        if stop_reason == "signal":
            return {"run_dir": str(run_dir), "step": progress["step"], "checkpoint": str(last_saved),
                    "stopped": "signal", "data": data_counters(stream)}
        matrix = run_eval()
        summary = {"run_dir": str(run_dir), "step": progress["step"], "checkpoint": str(last_saved),
                   "tokens_seen": progress["tokens_seen"], "eval": matrix, "stopped": stop_reason,
                   "minutes": (time.perf_counter() - started) / 60, "data": data_counters(stream)}
        if rank == 0:
            log.info("validation matrix at step %d:\n%s", progress["step"], format_matrix(matrix))
            if t.export_at_end and not guard.healthy:
                log.warning("not exporting: the run ended %d bad step(s) into a streak (from step %d)",
                            guard.bad_in_row, guard.first_bad_step)
            elif t.export_at_end:
                summary["export"] = str(ckpt.export_checkpoint(last_saved, run_dir / "export", trust_checkpoint=True))
            if config.eval.plot:
                summary["plot"] = str(plot_run(run_dir, matrix))
        return summary
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        stream.close()  # the data workers stop with the run, whatever ended it
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)


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


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.split("\n\n")[0],
                                     epilog=_help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides")
    parser.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_debug_flag(parser)
    args = parser.parse_intermixed_args(argv)
    config = load_config(args.overrides, CONFIG_DIR)
    if args.cfg:
        print(to_yaml(config))
        return 0
    try:
        summary = train(config)
    except TrainingError as err:  # diverged: no user mistake, but an expected stop with one line, exit 1
        log.error("%s", err)
        print(f"biglearn-train: error: {one_line(err)}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    return 0


def main(argv=None) -> int:
    return cli_main(_main, "biglearn-train", argv)


if __name__ == "__main__":
    sys.exit(main())

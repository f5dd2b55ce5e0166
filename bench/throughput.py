"""CPU training throughput of BigLearner, tiny config (d=256, 4 layers, 4 heads, FFN 1024, vocab 8000).

One timed step = forward + backward + AdamW step in a plain torch loop (no DeepSpeed), so the
figure is the model's own cost. Batches are sampled and collated before the clock starts (that
is data-loader work). Each length gets `--warmup` untimed steps, then `--steps` timed steps on
fresh (S, T) draws; the table shows medians.

    python bench/throughput.py                          # L = 128 512 1024, B = 8 (5 min at load 6-9)
    python bench/throughput.py --lengths 2048 --json out.json
    python bench/throughput.py --quick                  # seconds; checks the script runs

tokens/s counts every window token (B x L), including the ones an (S, T) draw leaves out;
predicted/s counts target tokens (rows that get a loss). `cpu s` is the process CPU time per
step, which stays meaningful when other jobs share the cores (wall time does not).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline.files import atomic_write
from pretrain.layout import collate
from pretrain.model import BigLearner, ModelConfig
from pretrain.objectives import ObjectiveConfig, ObjectiveSampler, PLMConfig

# The tiny config shared by every CPU benchmark, and the XLNet-base shape for GPU runs.
SIZES = {
    "tiny": dict(vocab_size=8000, d_model=256, n_layers=4, n_heads=4, ffn_hidden=1024),
    "base": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, ffn_hidden=3072),
}
FIRST_WORD_ID = 5  # ids below are reserved for special tokens (pad, unk, mask, cls, sep)


def objective_config(preset: str) -> ObjectiveConfig:
    """Named preset; "plm" is XLNet's span-based permutation LM (1/6 predicted, spans <= 5)."""
    return ObjectiveConfig(name=preset, plm=PLMConfig(span=True, k=6, max_span=5))


def batch_maker(preset: str, seq_len: int, batch_size: int, vocab_size: int, seed: int, device: str = "cpu"):
    """make(i) -> the i-th collated TaskBatch of random windows under `preset`, on `device`."""
    sampler = ObjectiveSampler(objective_config(preset))

    def make(i: int):
        rng = np.random.default_rng([seed, seq_len, i])
        windows = rng.integers(FIRST_WORD_ID, vocab_size, size=(batch_size, seq_len))
        specs = [sampler(seq_len, rng) for _ in range(batch_size)]
        return collate(windows, specs, pad_id=0).to_torch(device)
    return make


def build_model(size: str, device: str, seed: int = 0, checkpointing: bool = False, streams: int = 2,
                max_seq_len: int = 2048) -> BigLearner:
    """max_seq_len sizes the single-stream offset table (2 max_seq_len + 1 rows, as in training)."""
    torch.manual_seed(seed)
    config = ModelConfig(**SIZES[size], max_seq_len=max_seq_len, activation_checkpointing=checkpointing,
                         streams=streams)
    return BigLearner(config).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, make_input, count: int, warmup: int, device: str, predicted_of):
    """Run step(make_input(i)) for i < count. Returns wall s, process CPU s and predicted_of(input)
    of the timed steps. Inputs are made outside the clock, one at a time (one batch alive)."""
    walls, cpus, predicted = [], [], []
    for i in range(count):
        x = make_input(i)
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        step(x)
        sync(device)
        if i >= warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            predicted.append(float(predicted_of(x)))
        del x
    return walls, cpus, predicted


def train_step(loss_of, optimizer, device: str, dtype: torch.dtype):
    """step(batch): loss_of(batch) under autocast, backward, optimizer step; every system timed alike."""
    def step(batch):
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
    return step


def ours_train_step(model, optimizer, device: str, dtype: torch.dtype):
    return train_step(lambda batch: model.loss(batch)[0], optimizer, device, dtype)


def ours_runner(preset: str, seq_len: int, batch_size: int, *, size: str = "tiny", device: str = "cpu",
                dtype: torch.dtype = torch.float32, model: BigLearner | None = None, seed: int = 0,
                checkpointing: bool = False, streams: int = 2) -> dict:
    """BigLearner under `preset`, ready to time: {step, make, predicted_of, row} (see measure)."""
    if model is None:
        model = build_model(size, device, seed, checkpointing, streams, max_seq_len=max(2048, seq_len))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return {"step": ours_train_step(model, optimizer, device, dtype),
            "make": batch_maker(preset, seq_len, batch_size, model.config.vocab_size, seed, device),
            "predicted_of": lambda b: b.target_mask.sum(),
            "row": {"system": "ours", "preset": preset, "seq_len": seq_len, "batch_size": batch_size,
                    "streams": model.config.streams,
                    "activation_checkpointing": model.config.activation_checkpointing}}


def measure(runner: dict, steps: int, warmup: int, device: str, first_input: int = 0) -> dict:
    """One row: medians over `steps` timed training steps of a runner (a system made ready to
    time: its step function, its input maker, how many tokens an input predicts, its row)."""
    make = runner["make"]
    walls, cpus, predicted = time_steps(runner["step"], lambda i: make(first_input + i), warmup + steps, warmup,
                                        device, runner["predicted_of"])
    row = runner["row"]
    return summarise(walls, cpus, row["batch_size"] * row["seq_len"], float(np.mean(predicted))) | row


def measure_ours(preset: str, seq_len: int, batch_size: int, steps: int, warmup: int, *, device: str = "cpu",
                 **options) -> dict:
    """One row: medians over `steps` timed training steps of BigLearner under `preset`."""
    return measure(ours_runner(preset, seq_len, batch_size, device=device, **options), steps, warmup, device)


def summarise(walls, cpus, tokens_per_step: int, predicted_per_step: float) -> dict:
    step_s = float(np.median(walls))
    return {"step_s": step_s, "cpu_s": float(np.median(cpus)), "steps": len(walls),
            "step_times_s": list(walls), "cpu_times_s": list(cpus),
            "tokens_per_s": tokens_per_step / step_s, "predicted_per_s": predicted_per_step / step_s,
            "predicted_per_step": predicted_per_step, "load_1min": os.getloadavg()[0]}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; columns are (header, key, format spec)."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else format(row[key], spec)) for _, key, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


COLUMNS = [("L", "seq_len", "d"), ("tokens/s", "tokens_per_s", ",.0f"), ("predicted/s", "predicted_per_s", ",.0f"),
           ("step s", "step_s", ".3f"), ("cpu s", "cpu_s", ".3f"), ("load", "load_1min", ".1f")]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024], help="sequence lengths L")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset", default="biglearn", help="objective preset (pretrain.objectives.PRESETS)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per length (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per length")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one step: checks the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.batch_size, args.steps, args.warmup, args.threads = [16, 32], 2, 1, 0, 1
    if min(args.lengths) < 2 or args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise ValueError("--lengths must be >= 2, --batch-size and --steps >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    model = build_model("tiny", "cpu", max_seq_len=max(2048, *args.lengths))
    rows = []
    for seq_len in tqdm(args.lengths, desc=f"throughput ({args.preset})", disable=args.quick):
        rows.append(measure_ours(args.preset, seq_len, args.batch_size, args.steps, args.warmup, model=model))
    print(f"BigLearner tiny, {args.preset}, B={args.batch_size}, {args.threads} threads, "
          f"median of {args.steps} steps (forward + backward + AdamW)")
    print(format_table(rows, COLUMNS))
    if args.json:
        atomic_write(args.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

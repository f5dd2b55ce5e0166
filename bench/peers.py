"""BigLearner vs Hugging Face XLNet: one training step under XLNet's own objective.

Both systems get the same shape (tiny on CPU: d=256, 4 layers, 4 heads, FFN 1024, vocab 8000;
XLNet-base shape on GPU), the same batch (B=8) and the same objective: XLNet's span-based
permutation LM, 1/6 of the tokens predicted in spans of up to 5. HF's masks come from its own
DataCollatorForPermutationLanguageModeling; ours from the plm preset with span=True.
XLNet is transformers.XLNetLMHeadModel built from an XLNetConfig (random init, no download).

Three tables:
  1. peers      tokens/s, predicted tokens/s, peak memory per L; systems alternate.
  2. objective  our step time under clm, mlm, plm, biglearn at one L, relative to clm.
  3. scaling    time per token and peak memory as L doubles; fitted exponents (t ~ L^a).

Each (system, L) runs in a fresh subprocess, so peak memory is per system: peak RSS on CPU,
torch.cuda.max_memory_allocated on GPU. One timed step = forward + backward + AdamW step;
batches are made before the clock starts. Medians over all timed steps of all rounds.

    python bench/peers.py                                 # CPU: L = 128 512 1024 (HF's L=1024 is slowest)
    python bench/peers.py --lengths 128 512 1024 2048 --json peers.json
    python bench/peers.py --quick                          # seconds; checks the script runs
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling bench script

from throughput import (FIRST_WORD_ID, SIZES, build_model, format_table, measure_ours,  # noqa: E402
                        peak_rss_bytes, summarise, sync, time_steps)

SYSTEMS = ("ours", "hf-xlnet")
OBJECTIVE_PRESETS = ("clm", "mlm", "plm", "biglearn")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>", "<cls>", "<sep>")  # ids 0..4, below FIRST_WORD_ID


# --------------------------------------------------------------------------- HF XLNet

def xlnet_collator(vocab_size: int):
    """HF's own PLM collator over an offline word-level tokenizer (it reads mask/pad/special ids)."""
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForPermutationLanguageModeling, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab |= {f"w{i}": i for i in range(FIRST_WORD_ID, vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", cls_token="<cls>", sep_token="<sep>")
    return DataCollatorForPermutationLanguageModeling(tokenizer=tokenizer, plm_probability=1 / 6, max_span_length=5)


def measure_xlnet(seq_len: int, batch_size: int, steps: int, warmup: int, *, size: str, device: str,
                  dtype: torch.dtype, seed: int = 0) -> dict:
    from transformers import XLNetConfig, XLNetLMHeadModel

    dims = SIZES[size]
    config = XLNetConfig(vocab_size=dims["vocab_size"], d_model=dims["d_model"], n_layer=dims["n_layers"],
                         n_head=dims["n_heads"], d_inner=dims["ffn_hidden"], ff_activation="gelu",
                         dropout=0.0, mem_len=None, pad_token_id=0)  # our model runs without dropout too
    torch.manual_seed(seed)
    model = XLNetLMHeadModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collator = xlnet_collator(dims["vocab_size"])

    def make(i: int):
        rng = np.random.default_rng([seed, seq_len, i])
        torch.manual_seed(seed * 1_000_003 + seq_len * 1009 + i)  # the collator draws from torch's RNG
        windows = rng.integers(FIRST_WORD_ID, dims["vocab_size"], size=(batch_size, seq_len))
        return {k: v.to(device) for k, v in collator([torch.from_numpy(w) for w in windows]).items()}

    def step(batch):
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")

    walls, cpus, predicted = time_steps(step, make, warmup + steps, warmup, device,
                                        lambda b: (b["labels"] != -100).sum())
    return summarise(walls, cpus, batch_size * seq_len, float(np.mean(predicted))) | {
        "system": "hf-xlnet", "preset": "plm", "seq_len": seq_len, "batch_size": batch_size}


# --------------------------------------------------------------------------- workers

def run_worker(args) -> dict:
    """Measure one system (or the objective sweep) in this process; returns rows with memory."""
    torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    baseline = peak_rss_bytes()
    common = dict(size=args.size, device=device, dtype=dtype)
    if args.worker == "hf-xlnet":
        rows = [measure_xlnet(args.seq_len, args.batch_size, args.steps, args.warmup, **common)]
    elif args.worker == "ours":
        rows = [measure_ours("plm", args.seq_len, args.batch_size, args.steps, args.warmup,
                             checkpointing=args.checkpointing, **common)]
    else:  # objective sweep on one model; the preset order rotates every round
        model = build_model(args.size, device, checkpointing=args.checkpointing)
        timings = {p: [] for p in OBJECTIVE_PRESETS}
        for round_ in range(args.rounds):
            shift = round_ % len(OBJECTIVE_PRESETS)
            for preset in OBJECTIVE_PRESETS[shift:] + OBJECTIVE_PRESETS[:shift]:
                timings[preset].append(measure_ours(preset, args.seq_len, args.batch_size, args.steps,
                                                    args.warmup if round_ == 0 else 0, model=model, seed=round_, **common))
        rows = [merge_steps(timings[p]) for p in OBJECTIVE_PRESETS]
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()
    for row in rows:
        row |= {"peak_mem_bytes": peak, "baseline_mem_bytes": 0 if device.startswith("cuda") else baseline,
                "device": device, "dtype": args.dtype, "size": args.size}
    sync(device)
    return rows


def merge_steps(rows: list[dict]) -> dict:
    """Rows of the same (system, preset, L) from several runs -> one row of medians."""
    walls = [w for r in rows for w in r["step_times_s"]]
    cpus = [c for r in rows for c in r["cpu_times_s"]]
    predicted = float(np.mean([r["predicted_per_step"] for r in rows]))
    merged = summarise(walls, cpus, rows[0]["batch_size"] * rows[0]["seq_len"], predicted)
    merged["load_1min"] = float(np.mean([r["load_1min"] for r in rows]))  # as the workers saw it
    keep = {k: rows[0][k] for k in ("system", "preset", "seq_len", "batch_size", "device", "dtype", "size",
                                    "activation_checkpointing")
            if k in rows[0]}
    memory = {k: max(r[k] for r in rows) for k in ("peak_mem_bytes", "baseline_mem_bytes") if k in rows[0]}
    return keep | merged | memory


def spawn(worker: str, seq_len: int, args) -> list[dict]:
    """Run one worker in a fresh interpreter; on failure (e.g. out of memory) a row saying so."""
    command = [sys.executable, __file__, "--worker", worker, "--seq-len", str(seq_len),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--rounds", str(args.rounds),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
               "--dtype", args.dtype, "--size", args.size] + ["--checkpointing"] * args.checkpointing
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        if done.returncode < 0:
            reason = f"killed by signal {-done.returncode} (out of memory?)"
        print(f"  {worker} L={seq_len} failed: {reason}", file=sys.stderr)
        return [{"system": worker, "seq_len": seq_len, "error": reason}]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- tables

def scaling_rows(rows: list[dict]) -> list[dict]:
    """Per system: time per token and memory at each L, ratio to the previous L, fitted exponents."""
    out = []
    for system in SYSTEMS:
        mine = sorted((r for r in rows if r["system"] == system and "step_s" in r), key=lambda r: r["seq_len"])
        if not mine:
            continue
        lengths = np.array([r["seq_len"] for r in mine], dtype=float)
        steps = np.array([r["step_s"] for r in mine])
        memory = np.array([r["peak_mem_bytes"] for r in mine], dtype=float)
        cpus = np.array([r["cpu_s"] for r in mine])
        time_exp, cpu_exp, mem_exp = (float(np.polyfit(np.log(lengths), np.log(y), 1)[0]) if len(mine) > 1 else None
                                      for y in (steps, cpus, memory))
        for i, r in enumerate(mine):
            per_token = r["step_s"] / (r["batch_size"] * r["seq_len"])
            previous = out[-1] if i else None
            out.append({"system": system, "seq_len": r["seq_len"], "us_per_token": per_token * 1e6,
                        "per_token_vs_prev": per_token * 1e6 / previous["us_per_token"] if previous else None,
                        "mem_vs_prev": r["peak_mem_bytes"] / previous["peak_mem_bytes"] if previous else None,
                        "peak_mem_bytes": r["peak_mem_bytes"], "time_exponent": time_exp,
                        "cpu_time_exponent": cpu_exp, "mem_exponent": mem_exp})
    return out


def ratio_rows(rows: list[dict]) -> list[dict]:
    """ours / hf at each L where both ran."""
    out = []
    for seq_len in sorted({r["seq_len"] for r in rows}):
        pair = {r["system"]: r for r in rows if r["seq_len"] == seq_len and "step_s" in r}
        if len(pair) == 2:
            ours, hf = pair["ours"], pair["hf-xlnet"]
            out.append({"seq_len": seq_len, "speedup": ours["tokens_per_s"] / hf["tokens_per_s"],
                        "cpu_speedup": hf["cpu_s"] / ours["cpu_s"],
                        "mem_ratio": ours["peak_mem_bytes"] / hf["peak_mem_bytes"]})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for system in SYSTEMS:
        mine = sorted((r for r in rows if r["system"] == system and "step_s" in r), key=lambda r: r["seq_len"])
        lengths = [r["seq_len"] for r in mine]
        left.plot(lengths, [r["tokens_per_s"] for r in mine], "o-", label=system)
        right.plot(lengths, [r["peak_mem_bytes"] / 2**30 for r in mine], "o-", label=system)
    for axis, label in ((left, "training tokens/s"), (right, "peak memory (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length L")
        axis.set_ylabel(label)
        axis.legend()
    fig.suptitle("BigLearner vs HF XLNet, permutation LM (1/6 predicted), B=8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PEER_COLUMNS = [("system", "system", "s"), ("L", "seq_len", "d"), ("tokens/s", "tokens_per_s", ",.0f"),
                ("predicted/s", "predicted_per_s", ",.0f"), ("step s", "step_s", ".3f"), ("cpu s", "cpu_s", ".3f"),
                ("peak MiB", "peak_mib", ",.0f"), ("load", "load_1min", ".1f"), ("error", "error", "s")]
RATIO_COLUMNS = [("L", "seq_len", "d"), ("ours/hf tokens/s", "speedup", ".2f"),
                 ("hf/ours cpu s", "cpu_speedup", ".2f"), ("ours/hf peak mem", "mem_ratio", ".2f")]
OBJECTIVE_COLUMNS = [("preset", "preset", "s"), ("L", "seq_len", "d"), ("tokens/s", "tokens_per_s", ",.0f"),
                     ("predicted/s", "predicted_per_s", ",.0f"), ("step s", "step_s", ".3f"),
                     ("step / clm", "vs_clm", ".2f"), ("cpu / clm", "cpu_vs_clm", ".2f")]
SCALING_COLUMNS = [("system", "system", "s"), ("L", "seq_len", "d"), ("us/token", "us_per_token", ".1f"),
                   ("x prev L", "per_token_vs_prev", ".2f"), ("peak MiB", "peak_mib", ",.0f"),
                   ("mem x prev", "mem_vs_prev", ".2f"), ("time exp", "time_exponent", ".2f"),
                   ("cpu time exp", "cpu_time_exponent", ".2f"),
                   ("mem exp", "mem_exponent", ".2f")]


def with_mib(rows):
    return [r | ({"peak_mib": r["peak_mem_bytes"] / 2**20} if "peak_mem_bytes" in r else {}) for r in rows]


# --------------------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (even; HF's collator needs it); "
                        "default 128 512 1024 on CPU, 128 512 1024 2048 4096 on GPU")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two systems per L")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per worker")
    parser.add_argument("--objective-len", type=int, default=512, help="L of the objective-cost table")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--size", choices=("auto",) + tuple(SIZES), default="auto", help="auto: tiny on CPU, base on GPU")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: float32 on CPU, bfloat16 (autocast) on GPU")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    parser.add_argument("--checkpointing", action="store_true",
                        help="our model with activation checkpointing (less memory, ~30%% more compute)")
    parser.add_argument("--json", type=Path, help="write every row here as a JSON list (the plot goes next to it)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: --json path with .png, else peers.png)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one step: checks the script runs")
    parser.add_argument("--worker", choices=SYSTEMS + ("objective",), help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device.startswith("cuda")
    if args.size == "auto":
        args.size = "base" if on_gpu else "tiny"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if on_gpu else "float32"
    if args.lengths is None:
        args.lengths = [128, 512, 1024, 2048, 4096] if on_gpu else [128, 512, 1024]
    if args.quick:
        args.lengths, args.batch_size, args.rounds, args.steps, args.warmup = [32], 2, 1, 1, 0
        args.objective_len, args.threads = 32, 1
    if any(n < 2 or n % 2 for n in args.lengths + [args.objective_len]):
        raise ValueError("--lengths and --objective-len must be even and >= 2 (HF's PLM collator needs even L)")
    if min(args.batch_size, args.rounds, args.steps) < 1 or args.warmup < 0:
        raise ValueError("--batch-size, --rounds, --steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return []
    from tqdm import tqdm

    jobs = [(system if r % 2 == 0 else SYSTEMS[1 - i], seq_len)
            for seq_len in args.lengths for r in range(args.rounds) for i, system in enumerate(SYSTEMS)]
    runs = {}
    for system, seq_len in tqdm(jobs + [("objective", args.objective_len)], desc="peers (one worker each)",
                                disable=args.quick):
        runs.setdefault((system, seq_len), []).extend(spawn(system, seq_len, args))
    peers = []
    for (system, seq_len), got in runs.items():
        if system == "objective":
            continue
        ok = [r for r in got if "error" not in r]
        peers.append((merge_steps(ok) if ok else got[0]) | {"table": "peers"})
    peers.sort(key=lambda r: (r["seq_len"], r["system"] != "ours"))
    objective = [r | {"table": "objective"} for r in runs[("objective", args.objective_len)]]
    clm = next((r for r in objective if r.get("preset") == "clm"), None)
    for r in objective:
        if clm is not None and "step_s" in r:
            r |= {"vs_clm": r["step_s"] / clm["step_s"], "cpu_vs_clm": r["cpu_s"] / clm["cpu_s"]}

    print(f"\n1. Training step, XLNet permutation LM (1/6 predicted, spans <= 5), B={args.batch_size}, "
          f"{args.size} size, {args.device} {args.dtype}, {args.threads} threads, "
          f"our activation checkpointing {'on' if args.checkpointing else 'off'}; "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(format_table(with_mib(peers), PEER_COLUMNS))
    print()
    print(format_table(ratio_rows(peers), RATIO_COLUMNS))
    print(f"\n2. Cost of the objective (ours, L={args.objective_len}), relative to clm")
    print(format_table(objective, OBJECTIVE_COLUMNS))
    print("\n3. Scaling: time per token and peak memory as L grows (exponents fitted over all L)")
    print(format_table(with_mib(scaling_rows(peers)), SCALING_COLUMNS))
    rows = peers + objective
    plot_path = args.plot or (args.json.with_suffix(".png") if args.json else Path("peers.png"))
    plot(peers, plot_path)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\nplot: {plot_path}" + (f", rows: {args.json}" if args.json else ""))
    return rows


if __name__ == "__main__":
    main()

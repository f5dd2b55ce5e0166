"""BigLearner vs Hugging Face XLNet and Llama: one training step, same shapes, same harness.

Every system gets the same dims (tiny on CPU: d=256, 4 layers, 4 heads, FFN 1024, vocab 8000;
the base shape, d=768 x 12 layers, on GPU) and the same batch size (B=8). All HF models are
built from their configs (random init, no download).

  1. peers      ours vs XLNet under XLNet's own objective: span-based permutation LM, 1/6 of the
                tokens predicted in spans of up to 5 (HF's masks from its own
                DataCollatorForPermutationLanguageModeling, ours from the plm preset with
                span=True); tokens/s, predicted tokens/s, peak memory per L.
  2. yardstick  ours (model.streams 1 and 2, presets clm and biglearn) vs
                transformers.LlamaForCausalLM (sdpa attention, causal LM): step time and time
                per predicted token relative to Llama's, and peak memory, per L.
  3. objective  our step time under clm, mlm, plm, biglearn at one L in both modes, relative to
                clm in the same mode, with the rows each mode computes per predicted token.
  4. scaling    time per token and peak memory as L doubles; fitted exponents (t ~ L^a).

Each (system, L) runs in a fresh subprocess, so peak memory is per system: peak RSS on CPU,
torch.cuda.max_memory_allocated on GPU; the systems' order rotates every round. One timed
step = forward + backward + AdamW step; batches are made before the clock starts. Medians over
all timed steps of all rounds. `--interleaved` adds a 5th table: per L, the chosen systems built
in ONE process and timed in turns (process CPU time, no memory), so that every system sees the
same heap, the same page-fault state and the same load.

    python bench/peers.py --threads 1                    # CPU: L = 128 512 1024 (HF XLNet's L=1024 is slowest)
    python bench/peers.py --lengths 128 512 1024 2048 --json peers.json
    python bench/peers.py --systems hf-llama ours-1-clm  # a subset
    python bench/peers.py --systems hf-llama ours-1-clm --interleaved   # + both in one process, in turns
    python bench/peers.py --quick                         # seconds; checks the script runs
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from data_pipeline.files import atomic_write
from throughput import (FIRST_WORD_ID, SIZES, batch_maker, build_model, format_table, measure, measure_ours,
                        ours_runner, peak_rss_bytes, summarise, sync, train_step)


XLNET_SYSTEMS = ("ours", "hf-xlnet")  # table 1: "ours" is the two-stream model under XLNet's plm
# table 2: "ours-<streams>-<preset>"
YARDSTICK_SYSTEMS = ("hf-llama", "ours-1-clm", "ours-2-clm", "ours-1-biglearn", "ours-2-biglearn")
SYSTEMS = XLNET_SYSTEMS + YARDSTICK_SYSTEMS
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


def xlnet_runner(seq_len: int, batch_size: int, *, size: str, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
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

    return {"step": train_step(lambda batch: model(**batch).loss, optimizer, device, dtype), "make": make,
            "predicted_of": lambda b: (b["labels"] != -100).sum(),
            "row": {"system": "hf-xlnet", "preset": "plm", "seq_len": seq_len, "batch_size": batch_size}}


# --------------------------------------------------------------------------- HF Llama

def llama_runner(seq_len: int, batch_size: int, *, size: str, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """transformers.LlamaForCausalLM with our dims (SwiGLU FFN, RMSNorm, RoPE, tied embeddings),
    sdpa attention, causal LM on random windows: L - 1 predicted tokens per window."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = SIZES[size]
    config = LlamaConfig(vocab_size=dims["vocab_size"], hidden_size=dims["d_model"],
                         intermediate_size=dims["ffn_hidden"], num_hidden_layers=dims["n_layers"],
                         num_attention_heads=dims["n_heads"], num_key_value_heads=dims["n_heads"],
                         max_position_embeddings=max(2048, seq_len), rms_norm_eps=1e-5, tie_word_embeddings=True,
                         attn_implementation="sdpa", pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def make(i: int):
        rng = np.random.default_rng([seed, seq_len, i])
        return torch.from_numpy(rng.integers(FIRST_WORD_ID, dims["vocab_size"], size=(batch_size, seq_len))).to(device)

    return {"step": train_step(lambda ids: model(input_ids=ids, labels=ids).loss, optimizer, device, dtype),
            "make": make, "predicted_of": lambda ids: ids.shape[0] * (ids.shape[1] - 1),
            "row": {"system": "hf-llama", "preset": "clm", "seq_len": seq_len, "batch_size": batch_size}}


def rows_per_prediction(model, preset: str, seq_len: int, batch_size: int, seed: int) -> float:
    """Rows the model computes per predicted token on the preset's batches (docs/model.md)."""
    make = batch_maker(preset, seq_len, batch_size, model.config.vocab_size, seed)
    batches = [make(i) for i in range(4)]
    return sum(float(model.rows_computed(b).sum()) for b in batches) / sum(float(b.target_mask.sum()) for b in batches)


# --------------------------------------------------------------------------- workers

def runner(system: str, args, **common) -> dict:
    """The system, built and ready to time (throughput.measure)."""
    if system == "hf-xlnet":
        return xlnet_runner(args.seq_len, args.batch_size, **common)
    if system == "hf-llama":
        return llama_runner(args.seq_len, args.batch_size, **common)
    streams, preset = (2, "plm") if system == "ours" else (int(system.split("-")[1]), system.split("-")[2])
    ready = ours_runner(preset, args.seq_len, args.batch_size, streams=streams, checkpointing=args.checkpointing,
                        **common)
    ready["row"]["system"] = system
    return ready


def run_worker(args) -> dict:
    """Measure one system (or the objective sweep) in this process; returns rows with memory."""
    torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    baseline = peak_rss_bytes()
    common = dict(size=args.size, device=device, dtype=dtype)
    if args.worker in SYSTEMS:
        rows = [measure(runner(args.worker, args, **common), args.steps, args.warmup, device)]
    elif args.worker == "interleaved":  # every system in this one process, in turns (time only)
        runners = {system: runner(system, args, **common) for system in args.systems}
        timings = {system: [] for system in args.systems}
        for round_ in range(args.rounds):
            shift = round_ % len(args.systems)
            for system in args.systems[shift:] + args.systems[:shift]:
                timings[system].append(measure(runners[system], args.steps, args.warmup if round_ == 0 else 0,
                                               device, first_input=round_ * (args.warmup + args.steps)))
        return [merge_steps(timings[system]) | {"table": "interleaved"} for system in args.systems]
    else:  # objective sweep on one model per mode; the (mode, preset) order rotates every round
        models = {s: build_model(args.size, device, checkpointing=args.checkpointing, streams=s,
                                 max_seq_len=max(2048, args.seq_len)) for s in (1, 2)}
        cases = [(s, p) for s in (1, 2) for p in OBJECTIVE_PRESETS]
        timings = {case: [] for case in cases}
        for round_ in range(args.rounds):
            shift = round_ % len(cases)
            for streams, preset in cases[shift:] + cases[:shift]:
                timings[streams, preset].append(measure_ours(
                    preset, args.seq_len, args.batch_size, args.steps, args.warmup if round_ == 0 else 0,
                    model=models[streams], seed=round_, **common))
        rows = [merge_steps(timings[s, p]) | {"rows_per_pred": rows_per_prediction(
            models[s], p, args.seq_len, args.batch_size, seed=0)} for s, p in cases]
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
    keep = {k: rows[0][k] for k in ("system", "preset", "streams", "seq_len", "batch_size", "device", "dtype",
                                    "size", "activation_checkpointing")
            if k in rows[0]}
    memory = {k: max(r[k] for r in rows) for k in ("peak_mem_bytes", "baseline_mem_bytes") if k in rows[0]}
    return keep | merged | memory


def spawn(worker: str, seq_len: int, args) -> list[dict]:
    """Run one worker in a fresh interpreter; on failure (e.g. out of memory) a row saying so."""
    command = [sys.executable, __file__, "--worker", worker, "--seq-len", str(seq_len),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--rounds", str(args.rounds),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
               "--dtype", args.dtype, "--size", args.size, "--systems", *args.systems] + \
        ["--checkpointing"] * args.checkpointing
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
    """ours / hf-xlnet at each L where both ran."""
    out = []
    for seq_len in sorted({r["seq_len"] for r in rows}):
        pair = {r["system"]: r for r in rows if r["seq_len"] == seq_len and "step_s" in r}
        if "ours" in pair and "hf-xlnet" in pair:
            ours, hf = pair["ours"], pair["hf-xlnet"]
            out.append({"seq_len": seq_len, "speedup": ours["tokens_per_s"] / hf["tokens_per_s"],
                        "cpu_speedup": hf["cpu_s"] / ours["cpu_s"],
                        "mem_ratio": ours["peak_mem_bytes"] / hf["peak_mem_bytes"]})
    return out


def yardstick_rows(rows: list[dict]) -> list[dict]:
    """Per L, each of our (streams, preset) systems against HF Llama's causal LM: step time, time per
    predicted token and peak memory as ratios to Llama's."""
    out = []
    for seq_len in sorted({r["seq_len"] for r in rows}):
        here = {r["system"]: r for r in rows if r["seq_len"] == seq_len and "step_s" in r}
        llama = here.get("hf-llama")
        for system in YARDSTICK_SYSTEMS:
            if system not in here:
                continue
            r = here[system]
            per_pred = r["step_s"] / r["predicted_per_step"]
            row = {"system": system, "seq_len": seq_len, "step_s": r["step_s"], "us_per_pred": per_pred * 1e6,
                   "peak_mem_bytes": r["peak_mem_bytes"], "load_1min": r["load_1min"]}
            if llama is not None:
                row |= {"step_vs_llama": r["step_s"] / llama["step_s"],
                        "per_pred_vs_llama": per_pred / (llama["step_s"] / llama["predicted_per_step"]),
                        "mem_vs_llama": r["peak_mem_bytes"] / llama["peak_mem_bytes"]}
            out.append(row)
    return out


def interleaved_rows(rows: list[dict]) -> list[dict]:
    """Per L, CPU time per step and per predicted token of each system relative to HF Llama's (and
    ours relative to HF XLNet's), all timed in one process."""
    out = []
    for seq_len in sorted({r["seq_len"] for r in rows if "cpu_s" in r}):
        here = {r["system"]: r for r in rows if r["seq_len"] == seq_len and "cpu_s" in r}
        llama, xlnet = here.get("hf-llama"), here.get("hf-xlnet")
        for system, r in here.items():
            row = {"system": system, "seq_len": seq_len, "cpu_s": r["cpu_s"], "load_1min": r["load_1min"],
                   "us_per_pred": r["cpu_s"] / r["predicted_per_step"] * 1e6}
            if llama is not None and system in YARDSTICK_SYSTEMS:
                row |= {"cpu_vs_llama": r["cpu_s"] / llama["cpu_s"],
                        "per_pred_vs_llama": row["us_per_pred"] / (llama["cpu_s"] / llama["predicted_per_step"] * 1e6)}
            if xlnet is not None and system == "ours":
                row["speed_vs_xlnet"] = xlnet["cpu_s"] / r["cpu_s"]  # same tokens per step
            out.append(row)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for system in XLNET_SYSTEMS + ("hf-llama", "ours-1-clm"):
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
    fig.suptitle("BigLearner vs HF XLNet (permutation LM, 1/6 predicted) and HF Llama (causal LM), B=8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PEER_COLUMNS = [("system", "system", "s"), ("L", "seq_len", "d"), ("tokens/s", "tokens_per_s", ",.0f"),
                ("predicted/s", "predicted_per_s", ",.0f"), ("step s", "step_s", ".3f"), ("cpu s", "cpu_s", ".3f"),
                ("peak MiB", "peak_mib", ",.0f"), ("load", "load_1min", ".1f"), ("error", "error", "s")]
RATIO_COLUMNS = [("L", "seq_len", "d"), ("ours/hf tokens/s", "speedup", ".2f"),
                 ("hf/ours cpu s", "cpu_speedup", ".2f"), ("ours/hf peak mem", "mem_ratio", ".2f")]
OBJECTIVE_COLUMNS = [("streams", "streams", "d"), ("preset", "preset", "s"), ("L", "seq_len", "d"),
                     ("tokens/s", "tokens_per_s", ",.0f"), ("predicted/s", "predicted_per_s", ",.0f"),
                     ("step s", "step_s", ".3f"), ("step / clm", "vs_clm", ".2f"), ("cpu / clm", "cpu_vs_clm", ".2f"),
                     ("rows/pred", "rows_per_pred", ".2f")]
YARDSTICK_COLUMNS = [("system", "system", "s"), ("L", "seq_len", "d"), ("step s", "step_s", ".3f"),
                     ("us/pred", "us_per_pred", ".1f"), ("step / llama", "step_vs_llama", ".2f"),
                     ("per pred / llama", "per_pred_vs_llama", ".2f"), ("peak MiB", "peak_mib", ",.0f"),
                     ("mem / llama", "mem_vs_llama", ".2f"), ("load", "load_1min", ".1f")]
SCALING_COLUMNS = [("system", "system", "s"), ("L", "seq_len", "d"), ("us/token", "us_per_token", ".1f"),
                   ("x prev L", "per_token_vs_prev", ".2f"), ("peak MiB", "peak_mib", ",.0f"),
                   ("mem x prev", "mem_vs_prev", ".2f"), ("time exp", "time_exponent", ".2f"),
                   ("cpu time exp", "cpu_time_exponent", ".2f"),
                   ("mem exp", "mem_exponent", ".2f")]


INTERLEAVED_COLUMNS = [("system", "system", "s"), ("L", "seq_len", "d"), ("cpu s", "cpu_s", ".3f"),
                       ("cpu us/pred", "us_per_pred", ".1f"), ("cpu / llama", "cpu_vs_llama", ".2f"),
                       ("per pred / llama", "per_pred_vs_llama", ".2f"), ("x xlnet speed", "speed_vs_xlnet", ".2f"),
                       ("load", "load_1min", ".1f")]


def with_mib(rows):
    return [r | ({"peak_mib": r["peak_mem_bytes"] / 2**20} if "peak_mem_bytes" in r else {}) for r in rows]


# --------------------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (even; HF's collator needs it); "
                        "default 128 512 1024 on CPU, 128 512 1024 2048 4096 on GPU")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per L; the systems' order rotates each round")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="systems to time "
                        "(default all; ours-<streams>-<preset> are the yardstick rows against hf-llama)")
    parser.add_argument("--no-objective", dest="objective", action="store_false", help="skip the objective-cost table")
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
    parser.add_argument("--interleaved", action="store_true",
                        help="also time the chosen systems in ONE process per L, in turns (5th table: CPU-time "
                             "ratios, no memory); separate processes differ by their own heap growth")
    parser.add_argument("--worker", choices=SYSTEMS + ("objective", "interleaved"), help=argparse.SUPPRESS)
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
    args.systems = [s for s in SYSTEMS if s in args.systems]  # one fixed order, no repeats
    if min(args.batch_size, args.rounds, args.steps) < 1 or args.warmup < 0:
        raise ValueError("--batch-size, --rounds, --steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return []
    from tqdm import tqdm

    systems = args.systems
    jobs = [(system, seq_len) for seq_len in args.lengths for r in range(args.rounds)
            for system in systems[r % len(systems):] + systems[:r % len(systems)]]
    jobs += [("objective", args.objective_len)] if args.objective else []
    jobs += [("interleaved", seq_len) for seq_len in args.lengths] if args.interleaved else []
    runs = {}
    for system, seq_len in tqdm(jobs, desc="peers (one worker each)", disable=args.quick):
        runs.setdefault((system, seq_len), []).extend(spawn(system, seq_len, args))
    peers = []
    for (system, seq_len), got in runs.items():
        if system in ("objective", "interleaved"):
            continue
        ok = [r for r in got if "error" not in r]
        peers.append((merge_steps(ok) if ok else got[0]) | {"table": "peers"})
    peers.sort(key=lambda r: (r["seq_len"], SYSTEMS.index(r["system"])))
    objective = [r | {"table": "objective"} for r in runs.get(("objective", args.objective_len), [])]
    for r in objective:
        clm = next((c for c in objective if c.get("preset") == "clm" and c.get("streams") == r.get("streams")), None)
        if clm is not None and "step_s" in r and "step_s" in clm:
            r |= {"vs_clm": r["step_s"] / clm["step_s"], "cpu_vs_clm": r["cpu_s"] / clm["cpu_s"]}

    settings = (f"B={args.batch_size}, {args.size} size, {args.device} {args.dtype}, {args.threads} threads, "
                f"our activation checkpointing {'on' if args.checkpointing else 'off'}; "
                f"median of {args.rounds} rounds x {args.steps} steps")
    xlnet = [r for r in peers if r["system"] in XLNET_SYSTEMS]
    print(f"\n1. Training step, XLNet permutation LM (1/6 predicted, spans <= 5), ours with two streams, {settings}")
    print(format_table(with_mib(xlnet), PEER_COLUMNS))
    print()
    print(format_table(ratio_rows(peers), RATIO_COLUMNS))
    print(f"\n2. Against HF Llama (causal LM, sdpa): ours-<streams>-<preset>, {settings}")
    print(format_table(with_mib(yardstick_rows(peers)), YARDSTICK_COLUMNS))
    print(f"\n3. Cost of the objective (ours, L={args.objective_len}), relative to clm in the same mode")
    print(format_table(objective, OBJECTIVE_COLUMNS))
    print("\n4. Scaling: time per token and peak memory as L grows (exponents fitted over all L)")
    print(format_table(with_mib(scaling_rows(peers)), SCALING_COLUMNS))
    interleaved = [r for (system, _), got in runs.items() if system == "interleaved" for r in got]
    if args.interleaved:
        print(f"\n5. Interleaved: the systems in turns in ONE process per L, process CPU time, {settings}")
        print(format_table(interleaved_rows(interleaved), INTERLEAVED_COLUMNS))
    rows = peers + objective + interleaved
    plot_path = args.plot or (args.json.with_suffix(".png") if args.json else Path("peers.png"))
    plot(peers, plot_path)
    if args.json:
        atomic_write(args.json, json.dumps(rows, indent=1))
    print(f"\nplot: {plot_path}" + (f", rows: {args.json}" if args.json else ""))
    return rows


if __name__ == "__main__":
    main()

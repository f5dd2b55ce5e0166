"""One-command GPU check: kernel tests, attention kernels, peers and MFU, one summary table.

    make gpu-check                                # or: python bench/gpu_check.py --json gpu_check.json
    python bench/gpu_check.py --parts attention   # a subset

Parts, each in its own process (about 8 minutes on one GPU in all):
  kernels    the `gpu`-marked kernel tests (fp32, bf16, fp16): pytest -m gpu tests/kernels
  attention  bench/attention.py: fused kernel vs SDPA dense mask vs FlexAttention (BlockMask
             build included) vs flash-attn causal, both attention modes, with tile ratios
  peers      bench/peers.py --size base in bf16: ours (both modes) vs HF Llama vs HF XLNet
  training   60 seconds of experiment=demo_gpu training; the MFU it logs
Then the goals (docs/benchmarks.md) are read from the parts' JSON and printed as one table,
also written with --json. Without a CUDA GPU every part is skipped with the reason and the
command exits 0, so it can run anywhere; a part that fails is a row, not the end of the run.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_pipeline.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("kernels", "attention", "peers", "training")
TRAIN_SECONDS = 60


def gpu_name() -> str | None:
    """The CUDA device's name, or None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def part_command(part: str, out: Path) -> list[str]:
    """The command of one part; its JSON output goes under `out`."""
    python = sys.executable
    if part == "kernels":
        return [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests" / "kernels")]
    if part == "attention":
        return [python, str(ROOT / "bench" / "attention.py"), "--json", str(out / "attention.jsonl")]
    if part == "peers":
        return [python, str(ROOT / "bench" / "peers.py"), "--size", "base", "--dtype", "bfloat16", "--lengths",
                "1024", "2048", "--rounds", "1", "--steps", "3", "--no-objective", "--json", str(out / "peers.json"),
                "--plot", str(out / "peers.png")]
    return [python, "-m", "pretrain.train", "experiment=demo_gpu", f"run_dir={out / 'train'}",
            f"trainer.max_minutes={TRAIN_SECONDS / 60}", "trainer.max_steps=100000", "trainer.save_every=100000",
            "trainer.eval_every=100000", "trainer.export_at_end=false"]


def pytest_counts(output: str) -> dict:
    """{"passed": n, "failed": n, "skipped": n, ...} from pytest's last summary line."""
    lines = [line for line in output.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                                   lines[-1] if lines else "")}


def ratio_goal(goal: str, value: float | None, limit: float, at_most: bool = True) -> dict:
    if value is None:
        return {"goal": goal, "measured": None, "status": "not measured"}
    met = value <= limit if at_most else value >= limit
    return {"goal": goal, "measured": round(value, 3), "status": "met" if met else "missed"}


def attention_goals(rows: list[dict], tiles: dict[str, float]) -> list[dict]:
    """Fused kernel goals on the big-learning layout, fwd+bwd times of bench/attention.py."""
    time_of = {(r["layout"], r["method"]): r["fwd_bwd_ms"] for r in rows}
    flash = time_of.get(("biglearn", "flash-attn causal (content only)"))
    single = time_of.get(("biglearn, 1 stream", "group triton (fused)"))
    double = time_of.get(("biglearn", "group triton (fused)"))
    flex = min((t for (layout, method), t in time_of.items() if layout == "biglearn" and method.startswith("flex")),
               default=None)
    both = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
    return [
        ratio_goal("single-stream biglearn fused fwd+bwd / flash-attn causal <= 1.15", both(single, flash), 1.15),
        ratio_goal("two-stream biglearn fused fwd+bwd / (flash-attn causal x tile ratio) <= 1.2",
                   both(double, None if flash is None or "biglearn" not in tiles else flash * tiles["biglearn"]), 1.2),
        ratio_goal("FlexAttention (BlockMask build included) / fused, biglearn >= 1.5", both(flex, double), 1.5,
                   at_most=False),
    ]


def peers_goals(rows: list[dict], seq_len: int) -> list[dict]:
    """Ours vs HF Llama and XLNet at one L, from bench/peers.py rows."""
    here = {r["system"]: r for r in rows if r.get("seq_len") == seq_len and "step_s" in r}

    def per_pred(system):
        return here[system]["step_s"] / here[system]["predicted_per_step"] if system in here else None

    def ratio(a, b):
        return None if a is None or b is None else a / b

    step = lambda s: here[s]["step_s"] if s in here else None  # noqa: E731
    tokens = lambda s: here[s]["tokens_per_s"] if s in here else None  # noqa: E731
    return [
        ratio_goal(f"streams=1 clm step / HF Llama, L={seq_len} <= 1.05", ratio(step("ours-1-clm"), step("hf-llama")), 1.05),
        ratio_goal(f"streams=1 biglearn time per predicted token / HF Llama, L={seq_len} <= 1.35",
                   ratio(per_pred("ours-1-biglearn"), per_pred("hf-llama")), 1.35),
        ratio_goal(f"streams=2 clm step / HF Llama, L={seq_len} <= 1.35", ratio(step("ours-2-clm"), step("hf-llama")), 1.35),
        ratio_goal(f"ours / HF XLNet tokens/s (plm), L={seq_len} >= 5", ratio(tokens("ours"), tokens("hf-xlnet")), 5,
                   at_most=False),
    ]


def training_mfu(metrics: Path) -> float | None:
    """Median MFU over the train records of a run's metrics.jsonl (None when it logged none)."""
    if not metrics.is_file():
        return None
    values = sorted(r["mfu"] for r in map(json.loads, metrics.read_text().splitlines())
                    if r.get("kind") == "train" and r.get("mfu") is not None)
    return values[len(values) // 2] if values else None


def summarise(part: str, out: Path, output: str) -> tuple[str, list[dict]]:
    """(one-line result, goal rows) of a part that ran."""
    if part == "kernels":
        counts = pytest_counts(output)
        return ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary", []
    if part == "attention":
        lines = [json.loads(line) for line in (out / "attention.jsonl").read_text().splitlines()]
        tiles = {r["layout"]: r["tile_ratio"] for r in lines if "tile_ratio" in r}
        rows = [r for r in lines if "method" in r]
        return f"{len(rows)} timed rows", attention_goals(rows, tiles)
    if part == "peers":
        rows = json.loads((out / "peers.json").read_text())
        return f"{len(rows)} rows", peers_goals(rows, 2048) + peers_goals(rows, 1024)
    mfu = training_mfu(out / "train" / "metrics.jsonl")
    return f"median MFU {mfu:.3f}" if mfu is not None else "no MFU logged", []


def run_part(part: str, out: Path, timeout_s: float) -> dict:
    command = part_command(part, out)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"part": part, "status": "failed", "result": f"timed out after {timeout_s:.0f} s", "goals": []}
    seconds = time.perf_counter() - start
    (out / f"{part}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"part": part, "status": "failed", "result": last[0][:200], "seconds": seconds, "goals": []}
    try:
        result, goals = summarise(part, out, done.stdout)
    except (OSError, ValueError, KeyError) as err:
        return {"part": part, "status": "failed", "result": f"unreadable output: {err}", "seconds": seconds, "goals": []}
    return {"part": part, "status": "ran", "result": result, "seconds": seconds, "goals": goals}


def format_summary(report: dict) -> str:
    lines = [f"GPU: {report['gpu'] or 'none'}", "", "| part | status | seconds | result |", "|---|---|---:|---|"]
    for p in report["parts"]:
        seconds = f"{p['seconds']:.0f}" if p.get("seconds") is not None else "-"
        lines.append(f"| {p['part']} | {p['status']} | {seconds} | {p['result']} |")
    goals = [g for p in report["parts"] for g in p["goals"]]
    if goals:
        lines += ["", "| goal | measured | status |", "|---|---:|---|"]
        lines += [f"| {g['goal']} | {'-' if g['measured'] is None else g['measured']} | {g['status']} |" for g in goals]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default all)")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--out", type=Path, help="folder for the parts' logs and JSON (default: a temporary one)")
    parser.add_argument("--part-timeout", type=float, default=240, help="seconds before a part is stopped")
    args = parser.parse_args(argv)
    name = gpu_name()
    report = {"gpu": name, "command": "python bench/gpu_check.py " + " ".join(argv or sys.argv[1:]), "parts": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        for part in args.parts:
            if name is None:
                reason = "skipped: no CUDA GPU (torch.cuda.is_available() is False)"
                print(f"gpu-check: {part} {reason}", file=sys.stderr)
                report["parts"].append({"part": part, "status": "skipped", "result": reason, "goals": []})
                continue
            print(f"gpu-check: running {part} ...", file=sys.stderr)
            report["parts"].append(run_part(part, out, args.part_timeout))
    print(format_summary(report))
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=1))
    return 1 if any(p["status"] == "failed" for p in report["parts"]) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Which fine-tuning defaults work on small data: a learning rate x epochs sweep on a small text
classification task, fine-tuning the demo's pretrained export (docs/capabilities.md, fine-tuning).

The task: which standard-library package (tkinter, xml, unittest) a docstring comes from, taken
from modules the demo does not pretrain on (after its first 800 stdlib files), first paragraph of
each function or class docstring, 140 training and up to 60 dev examples per label (420 / 168
with Python 3.11).

    make demo                                       # runs/demo/export, the model fine-tuned here
    python bench/finetune_defaults.py               # the sweep of docs/capabilities.md (~7 min on 2 cores)
    python bench/finetune_defaults.py --task-only   # only write train.tsv and dev.tsv
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

from data_pipeline.sources import stdlib_files

PACKAGES = ("tkinter", "xml", "unittest")
DEMO_FILES = 800  # configs/experiment/demo.yaml, data.demo_max_files: the files the demo pretrains on


def docstrings_by_package(skip_files: int = DEMO_FILES) -> dict[str, list[str]]:
    """The first paragraph of every function and class docstring of PACKAGES (whitespace joined,
    at most 300 characters, duplicates dropped), in the stdlib's file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, seen = {package: [] for package in PACKAGES}, set()
    for path in stdlib_files()[skip_files:]:
        package = path.relative_to(root).parts[0]
        if package not in texts:
            continue
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (doc := ast.get_docstring(node)):
                text = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()[:300]
                if len(text) >= 20 and text not in seen:
                    seen.add(text)
                    texts[package].append(text)
    return texts


def write_task(out: Path, n_train: int = 140, n_dev: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """train.tsv and dev.tsv (columns text, label) under `out`, shuffled with `seed`."""
    rng = random.Random(seed)
    train, dev = [], []
    for package, texts in docstrings_by_package().items():
        rng.shuffle(texts)
        train += [(text, package) for text in texts[:n_train]]
        dev += [(text, package) for text in texts[n_train:n_train + n_dev]]
    rng.shuffle(train)
    rng.shuffle(dev)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.tsv", out / "dev.tsv"
    for path, rows in zip(paths, (train, dev)):
        path.write_text("text\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/demo/export", help="pretrained export to fine-tune (default: %(default)s)")
    parser.add_argument("--out", default="runs/finetune_defaults", help="task files and runs (default: %(default)s)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[4e-5, 5e-4, 2e-3], help="(default: %(default)s)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 6], help="(default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="(default: %(default)s)")
    parser.add_argument("--task-only", action="store_true", help="write the task's TSV files and stop")
    args = parser.parse_args(argv)
    out = Path(args.out)
    train, dev = write_task(out)
    dev_labels = [line.rsplit("\t", 1)[1] for line in dev.read_text(encoding="utf-8").splitlines()[1:]]
    majority = Counter(dev_labels).most_common(1)[0][1] / len(dev_labels)
    print(f"task: {train} and {dev} ({len(dev_labels)} dev examples; majority class {100 * majority:.1f}%)")
    if args.task_only:
        return 0
    grid = [(lr, epochs, seed) for lr in args.lrs for epochs in args.epochs for seed in args.seeds]
    sweep = ", ".join(f"{{trainer: {{lr: {lr!r}, epochs: {epochs}, seed: {seed}}}}}" for lr, epochs, seed in grid)
    command = [sys.executable, "-m", "pretrain.finetune", f"data.train={train}", f"data.dev={dev}",
               f"tokenizer={args.init}", f"init={args.init}", "save_model=false", "resume=never",
               f"out={out / 'sweep'}", f"sweep=[{sweep}]"]
    print(" ".join(command), flush=True)
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode:
        return done.returncode
    print("\n| lr | epochs | seed | dev accuracy | dev F1 |\n|---:|---:|---:|---:|---:|")
    for i in range(len(grid)):
        result = json.loads((out / "sweep" / f"run_{i}" / "result.json").read_text())
        print(f"| {result['lr']:g} | {result['epochs']:g} | {result['seed']} | {100 * result['dev_accuracy']:.1f}% "
              f"| {100 * result['dev_f1']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

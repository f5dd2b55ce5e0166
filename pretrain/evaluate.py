"""Evaluation matrix: NLL per token and perplexity of seven conditional tasks on validation data.

Every task is a fixed (S, T) draw per window, seeded by (eval.seed, batch, task), so numbers
are comparable across steps, runs and world sizes:

    joint          S empty, every token predicted, in a random order   (log p(x), one order)
    left_to_right  S empty, every token predicted left to right        (a causal LM's NLL)
    mlm            15% of the tokens predicted jointly from the rest   (BERT's task)
    infill         S = prefix + suffix, T = the middle, left to right  (infilling)
    biglearn       a random big-learning draw, random order            (the training task)
    prefix         S = the second half, T = the first half, left to right (what came before)
    suffix         S = the first half, T = the second half, left to right (a prefix LM's task)

Standalone: `python -m pretrain.evaluate ckpt=RUN_DIR_OR_CHECKPOINT_OR_EXPORT [key=value ...]`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .collate import TaskBatch, collate
from .config import EvalConfig
from .errors import UserError, add_debug_flag, cli_main
from .objectives import EVAL_TASKS, ObjectiveSampler, eval_split
from .utils import METRICS, format_matrix

PLOT = "training.png"
_SEED_TAG = 7919  # keeps these draws apart from the training sampler's streams


def validation_windows(manifest, n_batches: int, batch_size: int, split: str = "val") -> list[list[np.ndarray]]:
    """The first n_batches x batch_size windows of the validation split (or `split`), in file order.
    Read through BatchStream with the causal-LM layout, whose labels are the window itself."""
    from .data import BatchStream

    stream = BatchStream(manifest, split=split, sampler=ObjectiveSampler("clm"), batch_size=batch_size,
                         rank=0, world_size=1, num_workers=0, shuffle=False)
    windows = []
    for batch in stream:
        windows.append([batch.labels[b, :batch.n_target[b]].copy() for b in range(batch.batch_size)])
        if len(windows) == n_batches:
            break
    if not windows:
        raise ValueError(f"{manifest}: the validation split has fewer than {batch_size} windows")
    return windows


def eval_batches(windows: list[list[np.ndarray]], config: EvalConfig, pad_id: int) -> dict[str, list[TaskBatch]]:
    """{task: [TaskBatch]} with draws seeded by (config.seed, batch index, task index)."""
    out = {}
    for task_index, task in enumerate(config.tasks):
        batches = []
        for batch_index, batch_windows in enumerate(windows):
            rng = np.random.default_rng([config.seed, _SEED_TAG, batch_index, EVAL_TASKS.index(task)])
            specs = [eval_split(task, len(w), rng, mlm_ratio=config.mlm_ratio, infill_ratio=config.infill_ratio)
                     for w in batch_windows]
            batches.append(collate(batch_windows, specs, pad_id))
        out[task] = batches
    return out


@torch.no_grad()
def evaluate(loss_fn, batches: dict[str, list[TaskBatch]], device, rank: int = 0, world_size: int = 1) -> dict:
    """{task: {"nll": per token, "ppl": exp(nll), "tokens": predicted tokens}}.

    loss_fn(TaskBatch) -> (loss, per-target NLL [B, Nt]): a DeepSpeed engine or BigLearner.loss.
    Rank r scores batches r, r + world, ...; every rank runs the same number of forward passes
    (ZeRO-3 gathers parameters collectively), the extra ones weighted 0, then sums are all-reduced."""
    totals = torch.zeros(len(batches), 2, dtype=torch.float64, device=device)
    for t, task_batches in enumerate(batches.values()):
        rounds = math.ceil(len(task_batches) / world_size)
        for i in range(rounds):
            index = i * world_size + rank
            real = index < len(task_batches)
            batch = task_batches[index if real else 0].to_torch(device)
            _, nll = loss_fn(batch)
            if real:
                totals[t, 0] += nll.sum().double()
                totals[t, 1] += batch.target_mask.sum().double()
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    result = {}
    for (task, _), (nll_sum, count) in zip(batches.items(), totals.tolist()):
        nll = nll_sum / max(count, 1.0)
        result[task] = {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": int(count)}
    return result


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def matrix_panels(matrix: dict, baseline: dict | None = None) -> list[tuple[str, list[str], np.ndarray]]:
    """The heatmap's panels, one per quantity so each gets its own colour scale:
    ("NLL / token (nats)", row labels, values [rows, tasks]) with the untrained model's row when
    given, then ("perplexity", ...)."""
    tasks = list(matrix)
    nll_labels, nll_rows = ["trained"], [[matrix[t]["nll"] for t in tasks]]
    ppl_labels, ppl_rows = ["trained"], [[matrix[t]["ppl"] for t in tasks]]
    if baseline:
        nll_labels.append("untrained")
        nll_rows.append([baseline[t]["nll"] for t in tasks])
        ppl_labels.append("untrained")
        ppl_rows.append([baseline[t]["ppl"] for t in tasks])
    return [("NLL / token (nats)", nll_labels, np.array(nll_rows)), ("perplexity", ppl_labels, np.array(ppl_rows))]


def _heatmap(fig, ax, tasks: list[str], title: str, labels: list[str], values: np.ndarray) -> None:
    """One quantity: its own colour scale (min..max of its cells), a colour bar, the numbers in the cells."""
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    middle = (values.min() + values.max()) / 2
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.4g}", ha="center", va="center", fontsize=9,
                    color="white" if values[i, j] < middle else "black")
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(title, fontsize=10)


def plot_run(run_dir, matrix: dict | None = None, baseline: dict | None = None, out: Path | None = None) -> Path:
    """PNG with the training/validation loss curves and the final evaluation matrix (NLL and
    perplexity as two heatmaps, each on its own colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    matrix = matrix or (evals[-1]["tasks"] if evals else None)
    fig = plt.figure(figsize=(14, 5.5))
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.15])
    curves = fig.add_subplot(grid[:, 0])
    if train:
        steps = [r["step"] for r in train]
        curves.plot(steps, [r["loss"] for r in train], label="train (all tasks)", color="black", lw=1.5)
        tasks = sorted({k for r in train for k in r.get("task_loss", {})})
        for task in tasks if len(tasks) > 1 else []:  # a single objective is the black curve already
            points = [(r["step"], r["task_loss"][task]) for r in train if task in r.get("task_loss", {})]
            curves.plot(*zip(*points), label=f"train {task}", lw=0.8, alpha=0.7)
    for task in sorted({k for r in evals for k in r["tasks"]}):
        points = [(r["step"], r["tasks"][task]["nll"]) for r in evals if task in r["tasks"]]
        curves.plot(*zip(*points), "o--", label=f"val {task}", ms=3, lw=0.8)
    curves.set(xlabel="optimizer step", ylabel="NLL per predicted token (nats)", title="Loss curves")
    curves.grid(alpha=0.3)
    if train or evals:
        curves.legend(fontsize=7)
    if matrix:
        step = evals[-1]["step"] if evals else "?"
        for row, (quantity, labels, values) in enumerate(matrix_panels(matrix, baseline)):
            _heatmap(fig, fig.add_subplot(grid[row, 1]), list(matrix),
                     f"validation {quantity} (step {step})", labels, values)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / PLOT
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- command line

@dataclass
class EvaluateArgs:
    ckpt: str = "???"  # run dir, checkpoints/ dir, step_* tag or exported model dir
    manifest: str | None = None  # default: the manifest the run trained on
    batches: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    tasks: list[str] | None = None
    device: str = "auto"
    out: str | None = None  # JSON file for the matrix (default: print only)
    plot: str | None = None  # PNG path: loss curves of the run (when ckpt is a run) + the matrix
    trust_checkpoint: bool = False  # read a DeepSpeed checkpoint's pickles (weights-only) when no export exists


def parse_args(argv, prog: str = "python -m pretrain.evaluate") -> EvaluateArgs:
    """EvaluateArgs from key=value overrides, composed onto configs/evaluate.yaml like the
    training config (pretrain.config.compose): a mistyped key or value fails naming it."""
    from .config import compose, to_schema

    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("Standalone")[0] + "\nArguments are key=value pairs:\n" + "\n".join(
            f"  {name:<11} {doc}" for name, doc in (
                ("ckpt", "run dir, checkpoints/ dir, step_* checkpoint or exported model dir (required)"),
                ("manifest", "manifest.json whose val split is used (default: the run's)"),
                ("batches", "validation batches per task (default: the run's eval.batches)"),
                ("batch_size", "windows per batch (default: the run's)"),
                ("seed", "seed of the (S, T) draws (default: the run's eval.seed)"),
                ("tasks", f"subset of {list(EVAL_TASKS)}, e.g. tasks=[joint,mlm]"),
                ("device", "cpu, cuda or auto"),
                ("out", "write the matrix as JSON here"),
                ("plot", "write a PNG (loss curves of the run, if any, and the matrix)"))),
        epilog="example: python -m pretrain.evaluate ckpt=runs/demo batches=4 plot=runs/demo/eval.png")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    from omegaconf import OmegaConf

    tree = compose(args.overrides, config_name="evaluate", cls=EvaluateArgs)
    if OmegaConf.is_missing(tree, "ckpt"):
        raise UserError("ckpt=... is required: a run dir, checkpoints/ dir, step_* checkpoint or exported model dir")
    return to_schema(tree, EvaluateArgs)


def _run_manifest(ckpt, meta: dict) -> str | None:
    """The manifest a run trained on: as recorded, else as its newest checkpoint records it (an
    export keeps only the manifest's name: exports hold no absolute paths)."""
    from .checkpoint import META, find_checkpoint

    recorded = meta.get("manifest")
    if recorded and Path(recorded).is_file():
        return recorded
    tag = find_checkpoint(ckpt)
    return json.loads((tag / META).read_text()).get("manifest") if tag is not None else recorded


def _main(argv: list[str], prog: str) -> int:
    from data_pipeline import load_manifest

    from .checkpoint import load_for_inference
    from .config import TrainConfig, to_schema

    args = parse_args(argv, prog)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model, meta = load_for_inference(args.ckpt, device, trust_checkpoint=args.trust_checkpoint)
    run_config = to_schema(meta["config"]) if "config" in meta else TrainConfig()
    manifest = args.manifest or _run_manifest(args.ckpt, meta)
    if not manifest:
        raise ValueError(f"{args.ckpt} does not record its manifest: pass manifest=PATH")
    config = replace(run_config.eval, **{k: v for k, v in (("batches", args.batches), ("seed", args.seed),
                                                            ("tasks", args.tasks)) if v is not None})
    batch_size = args.batch_size or config.batch_size or run_config.data.batch_size
    windows = validation_windows(manifest, config.batches, batch_size)
    pad_id = int(load_manifest(manifest)["pad_id"])
    matrix = evaluate(model.loss, eval_batches(windows, config, pad_id), device)
    print(format_matrix(matrix))
    if args.out:
        Path(args.out).write_text(json.dumps(matrix, indent=2))
    if args.plot:
        run_dir = Path(meta.get("run_dir", args.ckpt))
        print(f"plot: {plot_run(run_dir if run_dir.is_dir() else args.ckpt, matrix, out=Path(args.plot))}")
    return 0


def main(argv=None, prog: str = "python -m pretrain.evaluate") -> int:
    # Every ValueError of this path names the checkpoint, manifest or key it rejects.
    return cli_main(lambda args: _main(args, prog), prog, argv, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())

"""The picture of a run: loss curves and the evaluation matrix (run_dir/training.png).

Read at a glance: the legend sits outside the curves, validation evaluations are markers (a
few points, not a measured curve), the weights at step 0 (the trainer evaluates them before the
first step: the untrained model, or model.init's) are a row of the matrix and the first
validation markers, and each heat-map panel writes its cells in one number format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint.rundir import last_eval, read_metrics

PLOT = "training.png"


def matrix_panels(matrix: dict, baseline: dict | None = None,
                  baseline_label: str = "untrained") -> list[tuple[str, list[str], np.ndarray]]:
    """The heatmap's panels, one per quantity so each gets its own colour scale:
    ("NLL / token (nats)", row labels, values [rows, tasks]) with the baseline's row when
    given, then ("perplexity", ...)."""
    tasks = list(matrix)
    labels = ["trained"] + ([baseline_label] if baseline else [])
    panels = []
    for title, key in (("NLL / token (nats)", "nll"), ("perplexity", "ppl")):
        rows = [[matrix[t][key] for t in tasks]] + ([[baseline[t][key] for t in tasks]] if baseline else [])
        panels.append((title, list(labels), np.array(rows)))
    return panels


def cell_format(values: np.ndarray) -> str:
    """One format for every cell of a panel: 3 significant digits for its largest value (its
    decimals used for all cells), scientific notation from 10^5 on."""
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    if largest >= 1e5:
        return "{:.2e}"
    digits = int(np.floor(np.log10(largest))) + 1 if largest >= 1 else 1
    return f"{{:.{max(0, 3 - digits)}f}}"


def _heatmap(fig, ax, tasks: list[str], title: str, labels: list[str], values: np.ndarray) -> None:
    """One quantity: its own colour scale (min..max of its cells), a colour bar, the numbers in the cells."""
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    middle = (values.min() + values.max()) / 2
    number = cell_format(values)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, number.format(values[i, j]), ha="center", va="center", fontsize=9,
                    color="white" if values[i, j] < middle else "black")
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(title, fontsize=10)


def plot_run(run_dir, matrix: dict | None = None, baseline: dict | None = None, out: Path | None = None) -> Path:
    """PNG with the training loss curves, the validation evaluations as markers, and the final
    evaluation matrix (NLL and perplexity as two heatmaps, each on its own colour scale) against
    `baseline`, by default the run's step-0 evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    matrix = matrix or (evals[-1]["tasks"] if evals else None)
    baseline_label = "untrained"
    if baseline is None:
        baseline, baseline_label = last_eval(run_dir, 0), "step 0"
    if matrix and baseline and not all(task in baseline for task in matrix):
        baseline = None  # another set of tasks (e.g. `biglearn eval tasks=[...]`)
    fig = plt.figure(figsize=(15, 5.5))
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.1])
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
        curves.plot(*zip(*points), "o", label=f"val {task}", ms=4, alpha=0.8)
    curves.set(xlabel="optimizer step", ylabel="NLL per predicted token (nats)",
               title="Loss curves (lines: training; markers: validation)")
    curves.grid(alpha=0.3)
    if train or evals:  # below the axes, never over the curves
        curves.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    if matrix:
        step = evals[-1]["step"] if evals else "?"
        for row, (quantity, labels, values) in enumerate(matrix_panels(matrix, baseline, baseline_label)):
            _heatmap(fig, fig.add_subplot(grid[row, 1]), list(matrix),
                     f"validation {quantity} (step {step})", labels, values)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / PLOT
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out

"""The picture of a run: loss curves and the evaluation matrix (run_dir/training.png)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint.rundir import read_metrics

PLOT = "training.png"


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

"""What the plots and TensorBoard show: NLL and perplexity heatmaps on their own colour scales
(with colour bars and the numbers in the cells), perplexity in TensorBoard, no digest curve."""
import json
import math

import numpy as np
import pytest

from pretrain.train.plots import cell_format, matrix_panels, plot_run
from pretrain.train.metrics import scalars
from pretrain.train.trainer import MetricsLog
from pretrain.checkpoint.rundir import METRICS


def random_matrix(rng, tasks=("joint", "left_to_right", "mlm")):
    out = {}
    for task in tasks:
        nll = float(rng.uniform(1.0, 6.0))
        out[task] = {"nll": nll, "ppl": math.exp(nll), "tokens": int(rng.integers(10, 100))}
    return out


def test_heatmap_has_one_colour_scale_per_quantity(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng()
    matrix, baseline = random_matrix(rng), random_matrix(rng)
    panels = matrix_panels(matrix, baseline)
    assert [p[0] for p in panels] == ["NLL / token (nats)", "perplexity"]
    (_, nll_labels, nll), (_, ppl_labels, ppl) = panels
    assert nll_labels == ppl_labels == ["trained", "untrained"]
    assert np.allclose(nll, [[matrix[t]["nll"] for t in matrix], [baseline[t]["nll"] for t in matrix]])
    assert np.allclose(ppl, np.exp(nll))

    # The figure: each heatmap's colour limits are its own cells' range, a colour bar each,
    # every cell's number written in it.
    captured = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    out = plot_run(tmp_path, matrix, baseline)
    assert out.is_file() and out.stat().st_size > 0
    fig = captured["fig"]
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    for image, values in zip(images, (nll, ppl)):
        assert image.get_clim() == pytest.approx((values.min(), values.max()))
        texts = {t.get_text() for t in image.axes.texts}
        assert {cell_format(values).format(v) for v in values.ravel()} <= texts
    assert sum(1 for ax in fig.axes if ax.get_label() == "<colorbar>") == 2
    plt.close(fig)


def test_tensorboard_has_perplexity_and_no_digest(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = np.random.default_rng()
    matrix = random_matrix(rng)
    train = {"kind": "train", "step": 3, "loss": float(rng.uniform(1, 5)), "task_loss": {"mlm": 2.5},
             "lr": 1e-3, "data_digest": int(rng.integers(1, 2 ** 60)), "data": {"tokens_per_source": {"a": 3}}}
    evaluation = {"kind": "eval", "step": 3, "tasks": matrix}
    log = MetricsLog(tmp_path, None, ["jsonl", "tensorboard"])
    log.write(train)
    log.write(evaluation)
    log.close()

    lines = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert lines[0]["data_digest"] == train["data_digest"]  # kept for resume checks
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "train/data_digest" not in tags and not any("digest" in t for t in tags)
    assert events.Scalars("train/loss")[0].value == pytest.approx(train["loss"])
    assert events.Scalars("train/task_loss/mlm")[0].value == pytest.approx(2.5)
    for task, item in matrix.items():
        assert events.Scalars(f"eval/tasks/{task}")[0].value == pytest.approx(item["nll"], rel=1e-6)
        assert events.Scalars(f"eval/ppl/{task}")[0].value == pytest.approx(math.exp(item["nll"]), rel=1e-5)
    assert set(scalars(train)) | set(scalars(evaluation)) == tags


def test_one_number_format_per_panel():
    assert cell_format(np.array([5.1234, 0.5, 3.0])) == "{:.2f}"
    assert cell_format(np.array([12.5, 345.678, 1.01])) == "{:.0f}"
    assert cell_format(np.array([0.01, 0.5])) == "{:.2f}"
    assert cell_format(np.array([1.5e6, 20.0])) == "{:.2e}"


def test_the_plot_reads_at_a_glance(tmp_path, monkeypatch):
    """The legend lies outside the curves; validation evaluations are markers, not lines; the
    step-0 evaluation is the matrix's baseline row; every cell of a panel has the same decimals."""
    import re

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng()
    records = [{"kind": "train", "step": s, "loss": float(6 - s / 10), "task_loss": {"mlm": 5.0, "clm": 4.0}}
               for s in range(1, 41)]
    evals = {step: random_matrix(rng) for step in (0, 20, 40)}
    records += [{"kind": "eval", "step": step, "tasks": matrix} for step, matrix in evals.items()]
    (tmp_path / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
    captured = {}
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: captured.setdefault("fig", fig) and real_savefig(fig, *a, **k))
    plot_run(tmp_path)
    fig = captured["fig"]
    fig.canvas.draw()
    curves = next(ax for ax in fig.axes if ax.get_legend() is not None)
    legend_box = curves.get_legend().get_window_extent()
    assert not legend_box.overlaps(curves.get_window_extent())
    validation = [line for line in curves.get_lines() if line.get_label().startswith("val ")]
    assert len(validation) == 3 and all(line.get_linestyle() == "None" and line.get_marker() == "o"
                                        for line in validation)
    assert [list(line.get_xdata()) for line in validation] == [[0, 20, 40]] * 3
    heatmaps = [ax for ax in fig.axes if ax.images]
    for ax, key in zip(heatmaps, ("nll", "ppl")):
        assert [t.get_text() for t in ax.get_yticklabels()] == ["trained", "step 0"]
        assert ax.images[0].get_array()[1].tolist() == pytest.approx([evals[0][t][key] for t in evals[0]])
        decimals = {len(m.group(1)) if m.group(1) else 0
                    for m in (re.fullmatch(r"-?\d+(?:\.(\d+))?", t.get_text()) for t in ax.texts)}
        assert len(decimals) == 1, [t.get_text() for t in ax.texts]
    plt.close(fig)

"""What the plots and TensorBoard show: NLL and perplexity heatmaps on their own colour scales
(with colour bars and the numbers in the cells), perplexity in TensorBoard, no digest curve."""
import json
import math

import numpy as np
import pytest

from pretrain.train.plots import matrix_panels, plot_run
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
        assert {f"{v:.4g}" for v in values.ravel()} <= texts
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

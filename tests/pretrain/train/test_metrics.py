"""trainer.loggers: the same curves reach every backend; W&B offline and MLflow's local file
store write their files (skipped when the extras are not installed); bad names fail at start."""
import json
import math

import numpy as np
import pytest

from pretrain.train.config import load_config
from data_pipeline.errors import UserError
from pretrain.train.metrics import scalars
from pretrain.train.trainer import MetricsLog


def records(rng):
    out = []
    for step in (1, 2, 3):
        out.append({"kind": "train", "step": step, "loss": float(rng.uniform(1, 5)), "lr": float(rng.uniform(0, 1e-3)),
                    "data_digest": int(rng.integers(1, 2 ** 60))})
    nll = float(rng.uniform(1, 5))
    out.append({"kind": "eval", "step": 3, "tasks": {"joint": {"nll": nll, "ppl": math.exp(nll), "tokens": 9}}})
    return out


def log_records(run_dir, backend: str) -> list[dict]:
    """Fresh random records written through MetricsLog to jsonl and `backend`, then closed."""
    written = records(np.random.default_rng())
    log = MetricsLog(run_dir, None, ["jsonl", backend], config={"trainer": {"lr": 1e-3}})
    for record in written:
        log.write(record)
    log.close()
    return written


def test_wandb_offline_writes_the_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    written = log_records(tmp_path, "wandb")
    wandb.teardown()  # what the process's exit does: the wandb service writes out what it holds
    (data,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # The offline run file holds each history row as protobuf items: the key, then the value as JSON.
    raw = data.read_bytes()
    for record in written[:3]:
        assert b"train/loss" in raw and json.dumps(record["loss"]).encode() in raw
    assert json.dumps(written[3]["tasks"]["joint"]["ppl"]).encode() in raw and b"eval/ppl/joint" in raw
    assert b"data_digest" not in raw


def test_mlflow_file_store_holds_every_curve(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    written = log_records(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("biglearn").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["trainer.lr"] == "0.001"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in written[:3]])
    expected = {k for r in written for k in scalars(r)}
    assert set(run.data.metrics) == expected and "train/data_digest" not in expected


def test_logger_names_are_checked_at_start():
    with pytest.raises(UserError, match="trainer.loggers"):
        load_config(["trainer.loggers=[jsonl,neptune]"])
    with pytest.raises(UserError, match="must include jsonl"):
        load_config(["trainer.loggers=[tensorboard]"])
    assert load_config([]).trainer.loggers == ["jsonl", "tensorboard"]

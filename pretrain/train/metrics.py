"""The metrics log of a run: JSON lines in run_dir/metrics.jsonl (rank 0), and the same curves
to the backends `trainer.loggers` picks among TensorBoard, Weights & Biases (offline, files under
run_dir/wandb; `pip install biglearn[wandb]`) and MLflow (a local file store, run_dir/mlruns;
`pip install biglearn[mlflow]`). Each backend receives the same curves, `scalars(record)`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint.rundir import METRICS

LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
# Kept in metrics.jsonl (resume checks compare it) but not a quantity to plot: a checksum.
NOT_SCALARS = ("step", "data_digest")


def scalars(record: dict) -> dict[str, float]:
    """The curves of a log record, by tag: "{kind}/{key}" for numbers, "{kind}/{key}/{task}" for
    per-task numbers, and for evaluation results (dicts with "nll" and "ppl") the NLL under
    "{kind}/{key}/{task}" and the perplexity under "{kind}/ppl/{task}"."""
    prefix, out = record["kind"], {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{prefix}/{key}"] = float(value)
        elif isinstance(value, dict):
            for task, item in value.items():
                if isinstance(item, dict) and "nll" in item:
                    out[f"{prefix}/{key}/{task}"] = float(item["nll"])
                    if "ppl" in item:
                        out[f"{prefix}/ppl/{task}"] = float(item["ppl"])
                elif isinstance(item, (int, float)) and not isinstance(item, bool):
                    out[f"{prefix}/{key}/{task}"] = float(item)
    return out


def _import(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(f"trainer.loggers: {extra} needs the {extra} extra (pip install 'biglearn[{extra}]')") from None


class TensorBoardLogger:
    def __init__(self, run_dir: Path, resume_step: int | None, config: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Offline unless WANDB_MODE says otherwise (`wandb sync run_dir/wandb/offline-run-*` uploads)."""

    def __init__(self, run_dir: Path, resume_step: int | None, config: dict | None):
        wandb = _import("wandb", "wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "biglearn"), name=run_dir.name,
                              dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"), config=config or {},
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """A run in the local file store run_dir/mlruns (`mlflow ui --backend-store-uri file:run_dir/mlruns`),
    or on the server MLFLOW_TRACKING_URI names."""

    def __init__(self, run_dir: Path, resume_step: int | None, config: dict | None):
        _import("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        # MLflow 3 keeps the file store (no database needed, which mlflow-skinny lacks) behind this opt-in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("biglearn")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("biglearn")
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        for key, value in _flatten(config or {}).items():
            self.client.log_param(self.run_id, key, value)

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow's limit on a parameter value
    return out


BACKENDS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}


def open_loggers(names, run_dir: Path, resume_step: int | None, config: dict | None = None) -> list:
    """The backends named in `names` (besides jsonl, which MetricsLog writes itself)."""
    return [BACKENDS[name](run_dir, resume_step, config) for name in names if name != "jsonl"]


class MetricsLog:
    """JSON lines (run_dir/metrics.jsonl), rank 0 only, and the same curves to each backend of
    `loggers` (tensorboard, wandb, mlflow)."""

    def __init__(self, run_dir: Path, resume_step: int | None, loggers=("jsonl",), config: dict | None = None):
        self.path = run_dir / METRICS
        kept = []
        if resume_step is not None and self.path.is_file():
            # Records past the resumed checkpoint belong to the interrupted attempt: drop them.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.backends = open_loggers(loggers, run_dir, resume_step, config)
        self.path.write_text("".join(line + "\n" for line in kept))  # a fresh run starts a fresh file
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        values = scalars(record)
        for backend in self.backends:
            backend.log(values, record["step"])

    def close(self) -> None:
        self.file.close()
        for backend in self.backends:
            backend.close()

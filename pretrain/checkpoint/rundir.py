"""The files of a run directory that more than one layer reads (docs/training.md, outputs).

    metrics.jsonl     train and eval records, one JSON object per line (the trainer writes it;
                      plots, exports and resume checks read it)
    checkpoints/      DeepSpeed tags (pretrain.checkpoint.sharded)
    export/           the fp32 export of the last checkpoint (pretrain.checkpoint.export)
    model/            the same in a fine-tuning run (pretrain.finetune), with its label layout
"""
from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"
EXPORT = "export"
FINETUNED = "model"


def read_metrics(run_dir) -> list[dict]:
    """Every record of run_dir/metrics.jsonl ([] when there is none)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_eval(run_dir, step: int) -> dict | None:
    """The validation matrix the run logged at `step`, if any."""
    try:
        records = read_metrics(run_dir)
    except (OSError, TypeError, ValueError):
        return None
    found = [r["tasks"] for r in records if r.get("kind") == "eval" and r.get("step") == step]
    return found[-1] if found else None

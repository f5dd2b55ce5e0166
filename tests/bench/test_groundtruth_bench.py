import math
import runpy
from pathlib import Path

from pretrain.objectives import EVAL_TASKS

BENCH = Path(__file__).resolve().parents[2] / "bench" / "groundtruth.py"


def test_quick_groundtruth_table_has_every_task():
    rows = runpy.run_path(str(BENCH))["main"](["--quick"])
    assert [r["task"] for r in rows] == list(EVAL_TASKS)
    assert all(math.isfinite(r["model_nll"]) and r["exact_nll"] > 0 for r in rows)

"""bench/gpu_check.py: without a GPU every part is skipped with its reason; the goal readers
against hand-computed ratios; the pytest summary parser on pytest's own output format."""
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
check = runpy.run_path(str(BENCH))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_every_part_is_skipped_with_the_reason(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert check["main"](["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["gpu"] is None and [p["part"] for p in report["parts"]] == list(check["PARTS"])
    assert all(p["status"] == "skipped" and "no CUDA GPU" in p["result"] for p in report["parts"])
    captured = capsys.readouterr()
    assert captured.err.count("skipped: no CUDA GPU") == 4 and "| training | skipped |" in captured.out


def test_attention_goals_read_the_fused_and_baseline_times():
    rng = np.random.default_rng()
    flash, single, double, flex, tile = rng.uniform(1, 10, 5)
    rows = [{"layout": "biglearn", "method": "flash-attn causal (content only)", "fwd_bwd_ms": flash},
            {"layout": "biglearn, 1 stream", "method": "group triton (fused)", "fwd_bwd_ms": single},
            {"layout": "biglearn", "method": "group triton (fused)", "fwd_bwd_ms": double},
            {"layout": "biglearn", "method": "flex attention, eager mask", "fwd_bwd_ms": flex},
            {"layout": "biglearn", "method": "flex attention, compiled mask", "fwd_bwd_ms": flex * 2}]
    goals = check["attention_goals"](rows, {"biglearn": tile})
    expected = [(single / flash, single / flash <= 1.15), (double / (flash * tile), double / (flash * tile) <= 1.2),
                (flex / double, flex / double >= 1.5)]
    for goal, (value, met) in zip(goals, expected):
        assert goal["measured"] == pytest.approx(value, abs=1e-3) and goal["status"] == ("met" if met else "missed")
    assert all(g["status"] == "not measured" for g in check["attention_goals"]([], {}))


def test_peers_goals_against_llama_and_xlnet():
    rows = [{"system": "hf-llama", "seq_len": 1024, "step_s": 2.0, "predicted_per_step": 1000, "tokens_per_s": 1},
            {"system": "ours-1-clm", "seq_len": 1024, "step_s": 2.2, "predicted_per_step": 1001, "tokens_per_s": 1},
            {"system": "ours-1-biglearn", "seq_len": 1024, "step_s": 1.8, "predicted_per_step": 700, "tokens_per_s": 1},
            {"system": "ours", "seq_len": 1024, "step_s": 1.0, "predicted_per_step": 10, "tokens_per_s": 600},
            {"system": "hf-xlnet", "seq_len": 1024, "step_s": 1.0, "predicted_per_step": 10, "tokens_per_s": 100}]
    got = {g["goal"].split(",")[0]: g for g in check["peers_goals"](rows, 1024)}
    assert got["streams=1 clm step / HF Llama"]["measured"] == 1.1 and got["streams=1 clm step / HF Llama"]["status"] == "missed"
    biglearn = got["streams=1 biglearn time per predicted token / HF Llama"]
    assert biglearn["measured"] == pytest.approx(1.8 / 700 / (2.0 / 1000), abs=1e-3) and biglearn["status"] == "met"
    assert got["streams=2 clm step / HF Llama"]["status"] == "not measured"
    assert got["ours / HF XLNet tokens/s (plm)"]["measured"] == 6 and got["ours / HF XLNet tokens/s (plm)"]["status"] == "met"


def test_pytest_counts_and_training_mfu(tmp_path):
    counts = check["pytest_counts"]("....\n12 passed, 2 skipped, 30 deselected in 3.1s\n")
    assert counts == {"passed": 12, "skipped": 2, "deselected": 30}
    assert check["pytest_counts"]("1 failed, 3 passed in 1s") == {"failed": 1, "passed": 3}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [{"kind": "train", "mfu": 0.3}, {"kind": "eval"},
                                                         {"kind": "train", "mfu": 0.1}, {"kind": "train", "mfu": 0.2}]))
    assert check["training_mfu"](metrics) == 0.2 and check["training_mfu"](tmp_path / "missing") is None

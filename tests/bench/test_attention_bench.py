"""bench/attention.py --quick runs on CPU and prints a complete table (no timing asserts)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import INVALID_GROUP, visibility

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_table_has_every_row_and_no_nan(bench, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = {(layout, method) for layout in bench.LAYOUTS for method in ("torch reference", "sdpa dense mask")}
    assert {(r["layout"], r["method"]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "tflops", "mask_mib"):
            assert math.isfinite(r[key]) and r[key] > 0, (r, key)
        assert f"| {r['layout']} | {r['method']} |" in table
    assert "nan" not in table.lower()
    assert "| 4096 |" in table and "| 16384 |" in table


@pytest.mark.parametrize("layout", ["causal", "mlm", "plm", "biglearn"])
def test_layouts_follow_the_sorted_layout_rules(bench, layout):
    rng = np.random.default_rng()
    groups, query_groups = bench.make_layout(layout, 3, 60, rng)
    for row, query in zip(groups.tolist(), query_groups.tolist()):
        assert row == sorted(row)  # S (0) | targets (1..) | INVALID padding
        targets = [g for g in row if 0 < g < INVALID_GROUP]
        assert query[:len(targets)] == targets and set(query[len(targets):]) <= {INVALID_GROUP}
        if layout == "causal":
            assert row == list(range(1, 61))
        elif layout == "mlm":
            assert targets == [1] * 9 and row.count(0) == 51
        elif layout == "plm":
            assert targets == list(range(1, 11)) and row.count(0) == 50
        else:
            assert targets == list(range(1, len(targets) + 1)) and len(targets) >= 1


def test_visible_pairs_matches_the_dense_rule(bench):
    rng = np.random.default_rng()
    groups, query_groups = bench.make_layout("biglearn", 4, 50, rng)
    for q_groups, strict in ((groups, False), (query_groups, True)):
        dense = int(visibility(q_groups, groups, strict=strict).sum())
        assert bench.visible_pairs(q_groups, groups, strict=strict) == dense


@pytest.mark.slow
def test_flex_block_masks_give_the_reference_output(bench):
    """The FlexAttention row computes the same attention (forward; flex has no CPU backward)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    groups, query_groups = bench.make_layout("biglearn", 2, 256, np.random.default_rng())
    q_c, q_q = torch.randn(2, 2, 256, 16), torch.randn(2, 2, query_groups.shape[1], 16)
    k, v = torch.randn(2, 2, 256, 16), torch.randn(2, 2, 256, 16)
    masks = bench.flex_block_masks(create_block_mask, groups, query_groups)
    flex = torch.compile(flex_attention)
    want = bench.reference_two_stream(q_c, q_q, k, v, groups, query_groups)
    for q, mask, w in zip((q_c, q_q), masks, want):
        assert (flex(q, k, v, block_mask=mask) - w).abs().max() < 1e-5

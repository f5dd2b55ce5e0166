"""bench/attention.py --quick runs on CPU and prints a complete table (no timing asserts)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from biglearn_kernels import INVALID_GROUP, visibility

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
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    rows = [r for r in lines if "method" in r]
    assert [t["layout"] for t in lines if "tile_ratio" in t] == sorted({r["layout"] for r in rows}, key=[
        r["layout"] for r in rows].index)
    layouts = list(bench.LAYOUTS) + [f"{layout}, 1 stream" for layout in bench.SINGLE_STREAM_LAYOUTS]
    expected = {(layout, method) for layout in layouts for method in ("torch reference", "sdpa dense mask")}
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


def test_single_stream_rows(bench):
    """START joins S in group 0, the last target's row goes, and only targets of (or after) a
    group of several tokens keep a query row."""
    row = np.array([0, 0, 1, 2, 2, 3, 4, INVALID_GROUP])
    content, queries = bench.single_stream_rows(row)
    assert content.tolist() == [0, 0, 0, 1, 2, 2, 3, INVALID_GROUP] and queries.tolist() == [2, 2, 3]
    groups, query_groups = bench.make_layout("causal", 2, 16, np.random.default_rng(), streams=1)
    assert groups.tolist() == [list(range(16))] * 2 and query_groups.shape == (2, 0)


def test_key_tiles_match_a_loop_over_tiles(bench):
    rng = np.random.default_rng()
    tile = (int(rng.integers(2, 9)), int(rng.integers(2, 9)))
    for layout in bench.LAYOUTS:
        groups, query_groups = bench.make_layout(layout, 3, 40, rng)
        for q_groups, strict in ((groups, False), (query_groups, True)):
            seen = visibility(q_groups, groups, strict=strict)
            expected = sum(bool(seen[b, i:i + tile[0], j:j + tile[1]].any())
                           for b in range(3) for i in range(0, seen.shape[1], tile[0])
                           for j in range(0, seen.shape[2], tile[1]))
            assert bench.key_tiles(q_groups, groups, strict=strict, tile=tile) == expected
    causal, _ = bench.make_layout("causal", 2, 256, rng, streams=1)
    assert bench.tile_ratio(causal, causal[:, :0]) == 1.0


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

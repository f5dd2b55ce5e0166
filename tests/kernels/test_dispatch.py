"""Backend choice, its one-time log, and the flash-attn special cases (kernels/biglearn_kernels/dispatch.py)."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from biglearn_kernels import INVALID_GROUP, group_attention, reference_attention, two_stream_attention
from biglearn_kernels import visibility
from biglearn_kernels.dispatch import flash_attn_case

REPO = Path(__file__).resolve().parents[2]


def int32(rows):
    return torch.tensor(rows, dtype=torch.int32)


def random_sorted_groups(rng, batch, n):
    return torch.tensor(np.sort(rng.integers(0, 4, size=(batch, n)), axis=1), dtype=torch.int32)


def test_auto_on_cpu_is_the_reference_and_logs_once(caplog):
    rng = np.random.default_rng()
    groups = random_sorted_groups(rng, 2, 9)
    q, k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 1, 9, 8), torch.randn(2, 1, 9, 8)
    with caplog.at_level(logging.INFO, logger="biglearn_kernels.dispatch"):
        from biglearn_kernels import dispatch
        dispatch._logged.clear()
        for _ in range(3):
            o = group_attention(q, k, v, groups, groups, strict=False)
    assert torch.equal(o, reference_attention(q, k, v, groups, groups, strict=False))
    choices = [r.message for r in caplog.records if "attention backend" in r.message]
    assert choices == ["kernels: attention backend = torch reference (auto, tensors on cpu)"]


def test_two_stream_reference_path_equals_two_reference_calls():
    rng = np.random.default_rng()
    groups = random_sorted_groups(rng, 2, 10)
    query_groups = groups[:, 4:].contiguous()
    q_c, q_q = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 6, 8)
    k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    o_c, o_q = two_stream_attention(q_c, q_q, k, v, groups, query_groups, backend="torch")
    assert torch.equal(o_c, reference_attention(q_c, k, v, groups, groups, strict=False))
    assert torch.equal(o_q, reference_attention(q_q, k, v, query_groups, groups, strict=True))
    none_c, o_q_last = two_stream_attention(None, q_q, k, v, groups, query_groups, backend="torch")
    assert none_c is None and torch.equal(o_q_last, o_q)


def test_unknown_backend_is_rejected():
    groups = int32([[0, 1, 2]])
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        group_attention(q, q, q, groups, groups, strict=False, backend="cuda")


@pytest.mark.parametrize("rows, strict, expected", [
    ([[1, 2, 3, 4], [5, 6, 7, 9]], False, "causal"),
    ([[0, 0, 0, 0], [3, 3, 3, 3]], False, "full"),
    ([[0, 0, 1, 1]], False, None),               # MLM: bidirectional prefix + joint group
    ([[1, 2, 3, 4]], True, None),                # strict rule is not flash-attn's causal
    ([[1, 2, 3, INVALID_GROUP]], False, None),   # padding
    ([[1, 2, 3, 4], [0, 0, 0, 0]], False, None), # mixed batch
])
def test_flash_attn_case(rows, strict, expected):
    groups = int32(rows)
    assert flash_attn_case(groups, groups, strict=strict) == expected
    # Independent check of a positive answer: the dense rule is exactly that mask.
    n = groups.shape[1]
    masks = {"causal": torch.ones(n, n, dtype=torch.bool).tril(), "full": torch.ones(n, n, dtype=torch.bool)}
    if expected is not None:
        assert (visibility(groups, groups, strict=strict) == masks[expected]).all()


def test_flash_attn_case_needs_the_same_groups_for_rows_and_keys():
    assert flash_attn_case(int32([[1, 2, 3]]), int32([[1, 2, 4]]), strict=False) is None


def test_triton_without_cuda_or_interpreter_is_a_clear_error():
    """A fresh process without TRITON_INTERPRET: backend='triton' on CPU tensors must raise."""
    code = ("import torch, biglearn_kernels as kernels\n"
            "g = torch.zeros(1, 4, dtype=torch.int32); q = torch.randn(1, 1, 4, 16)\n"
            "try:\n"
            "    kernels.group_attention(q, q, q, g, g, strict=False, backend='triton')\n"
            "except ValueError as err:\n"
            "    print('ValueError:', err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "ValueError: backend='triton'" in result.stdout, result.stdout + result.stderr
    assert "TRITON_INTERPRET" in result.stdout

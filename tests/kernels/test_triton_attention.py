"""Triton group-causal attention against the dense torch reference (docs/design.md, "Visibility rule").

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before the kernel module is imported), in fp32 with tiny shapes and 16x16 tiles; with CUDA the
same tests run the compiled, autotuned kernels. Every layout is drawn fresh; the seed is in
the failure message.
"""
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from biglearn_kernels import INVALID_GROUP, group_attention, reference_attention, two_stream_attention
from biglearn_kernels import triton_attention

REPO = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4


def rel_err(got, want):
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def sample_layout(rng, n, kind):
    """One sorted row [S | T in prediction order | padding] and its target groups."""
    if kind == "padding_only":
        return np.full(n, INVALID_GROUP), np.zeros(0)
    n_pad = int(rng.integers(0, n // 3 + 1))
    n_used = n - n_pad
    if kind == "s_empty":
        n_source = 0
    elif kind == "s_all_but_one":
        n_source = n_used - 1
    else:
        n_source = int(rng.integers(0, n_used))
    n_target = n_used - n_source
    if kind == "one_group":
        targets = np.ones(n_target)
    elif kind == "own_group":
        targets = np.arange(1, n_target + 1)
    else:  # random semi-autoregressive grouping
        targets = np.sort(rng.integers(1, n_target + 1, size=n_target))
    row = np.concatenate([np.zeros(n_source), targets, np.full(n_pad, INVALID_GROUP)])
    return row, targets


def make_batch(rng, kind, batch, n):
    """Content groups [B, N] and query-stream groups [B, Nt] (targets, INVALID padding)."""
    kinds = [kind] * batch
    if kind == "padding_only":  # one real sample beside an all-padding one
        kinds[0] = "random"
    rows, targets = zip(*(sample_layout(rng, n, k) for k in kinds))
    n_t = max(1, max(len(t) for t in targets))
    query = [np.concatenate([t, np.full(n_t - len(t), INVALID_GROUP)]) for t in targets]
    as_int = lambda x: torch.tensor(np.array(x), dtype=torch.int32, device=DEVICE)
    return as_int(rows), as_int(query)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()


def fresh_rng():
    """A new seed per test run for numpy and torch alike, so a failure's seed reproduces it."""
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    torch.manual_seed(seed)
    return seed, np.random.default_rng(seed)


def grads(outputs, inputs, seed):
    torch.manual_seed(seed)
    outs = [o for o in outputs if o is not None]
    # randn(shape), not randn_like: the same values whatever memory layout each output has.
    d_outs = [torch.randn(o.shape, dtype=o.dtype, device=o.device) for o in outs]
    return torch.autograd.grad(outs, inputs, d_outs)


def check_two_stream(kind, batch=2, heads=2, kv_heads=2, n=37, head_dim=16, with_content=True):
    seed, rng = fresh_rng()
    groups, query_groups = make_batch(rng, kind, batch, n)
    q_c = rand(batch, heads, n, head_dim) if with_content else None
    q_q = rand(batch, heads, query_groups.shape[1], head_dim)
    k, v = rand(batch, kv_heads, n, head_dim), rand(batch, kv_heads, n, head_dim)
    inputs = [x for x in (q_c, q_q, k, v) if x is not None]
    got = two_stream_attention(q_c, q_q, k, v, groups, query_groups, backend="triton")
    want = (reference_attention(q_c, k, v, groups, groups, strict=False) if with_content else None,
            reference_attention(q_q, k, v, query_groups, groups, strict=True))
    info = f"kind={kind} seed={seed} groups={groups.tolist()} query_groups={query_groups.tolist()}"
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert not torch.isnan(g).any(), info
            assert rel_err(g, w) < TOL, info
    names = ["q_content", "q_query", "k", "v"][0 if with_content else 1:]
    for name, g, w in zip(names, grads(got, inputs, seed), grads(want, inputs, seed)):
        assert rel_err(g, w) < TOL, f"d{name} {info}"


@pytest.mark.parametrize("kind", ["random", "s_empty", "s_all_but_one", "one_group", "own_group", "padding_only"])
def test_two_stream_matches_reference(kind):
    check_two_stream(kind)


def test_grouped_query_attention_and_ragged_length():
    check_two_stream("random", heads=4, kv_heads=2, n=int(np.random.default_rng().integers(17, 32)) | 1)


def test_query_stream_only_as_in_the_last_layer():
    check_two_stream("own_group", heads=2, kv_heads=1, with_content=False)


def test_head_dim_64():
    check_two_stream("random", batch=1, heads=1, kv_heads=1, n=20, head_dim=64)


@pytest.mark.parametrize("strict", [False, True])
def test_single_stream_with_unsorted_query_groups(strict):
    """group_attention allows any query-group order (only keys must be sorted)."""
    seed, rng = fresh_rng()
    groups, _ = make_batch(rng, "random", 2, 33)
    q_groups = groups[:, torch.randperm(33, device=DEVICE)[:21]].contiguous()
    q = rand(2, 2, 21, 16)
    k, v = rand(2, 1, 33, 16), rand(2, 1, 33, 16)
    got = group_attention(q, k, v, q_groups, groups, strict=strict, backend="triton")
    want = reference_attention(q, k, v, q_groups, groups, strict=strict)
    info = f"seed={seed} q_groups={q_groups.tolist()} k_groups={groups.tolist()}"
    assert rel_err(got, want) < TOL, info
    for g, w in zip(grads([got], [q, k, v], seed), grads([want], [q, k, v], seed)):
        assert rel_err(g, w) < TOL, info


def test_non_contiguous_inputs_and_custom_scale():
    """Views in the model's [B, N, H, D] -> [B, H, N, D] layout, and a strided head_dim."""
    seed, rng = fresh_rng()
    groups, query_groups = make_batch(rng, "random", 2, 24)
    q_c = torch.randn(2, 24, 2, 16, device=DEVICE).transpose(1, 2).requires_grad_()
    q_q = torch.randn(2, 2, query_groups.shape[1], 32, device=DEVICE)[..., ::2].requires_grad_()  # stride 2
    k = torch.randn(2, 24, 2, 16, device=DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 24, 2, 16, device=DEVICE).transpose(1, 2).requires_grad_()
    got = two_stream_attention(q_c, q_q, k, v, groups, query_groups, scale=0.3, backend="triton")
    want = (reference_attention(q_c, k, v, groups, groups, strict=False, scale=0.3),
            reference_attention(q_q, k, v, query_groups, groups, strict=True, scale=0.3))
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL, f"seed={seed}"
    for g, w in zip(grads(got, [q_c, q_q, k, v], seed), grads(want, [q_c, q_q, k, v], seed)):
        assert rel_err(g, w) < TOL, f"seed={seed}"


def test_rows_that_see_nothing_are_zero_with_zero_gradient():
    """Source rows in the query stream (strict, group 0) and padding rows see no key."""
    groups = torch.tensor([[0, 0, 1, 2, INVALID_GROUP] * 4], dtype=torch.int32, device=DEVICE).sort(dim=1).values
    q, k, v = rand(1, 2, 20, 16), rand(1, 2, 20, 16), rand(1, 2, 20, 16)
    o = group_attention(q, k, v, groups, groups, strict=True, backend="triton")
    blind = (groups[0] == 0) | (groups[0] == INVALID_GROUP)
    assert not torch.isnan(o).any()
    assert (o[:, :, blind] == 0).all() and (o[:, :, ~blind].abs() > 0).any()
    (dq,) = torch.autograd.grad(o.square().sum() + o.sum(), [q])
    assert (dq[:, :, blind] == 0).all() and not torch.isnan(dq).any()


def test_tiles_past_the_visible_prefix_are_skipped():
    """Block skipping, observed: NaN in a whole tile of padding keys and padding rows reaches
    no output or gradient: those tiles are skipped, not masked (a masked NaN still poisons P @ V)."""
    seed, rng = fresh_rng()
    tile = 16 if triton_attention.INTERPRET else 128  # largest tile of the GPU autotune space
    n_used = 2 * tile
    rows = [np.concatenate([np.sort(rng.integers(0, 5, size=n_used)), np.full(tile, INVALID_GROUP)])
            for _ in range(2)]
    groups = torch.tensor(np.array(rows), dtype=torch.int32, device=DEVICE)
    query_groups = groups[:, :n_used].clone()
    clean = [torch.randn(2, 2, n, 16, device=DEVICE) for n in (3 * tile, n_used, 3 * tile, 3 * tile)]
    poisoned = [t.clone() for t in clean]
    for t in (poisoned[0], poisoned[2], poisoned[3]):  # content rows, keys and values of the padding tile
        t[:, :, n_used:] = float("nan")
    got_in = [t.requires_grad_() for t in poisoned]
    want_in = [t.requires_grad_() for t in clean]
    got = two_stream_attention(*got_in, groups, query_groups, backend="triton")
    want = two_stream_attention(*want_in, groups, query_groups, backend="torch")
    for g, w in zip(got, want):
        assert not torch.isnan(g).any() and rel_err(g, w) < TOL, f"seed={seed}"
    for g, w in zip(grads(got, got_in, seed), grads(want, want_in, seed)):
        assert not torch.isnan(g).any() and rel_err(g, w) < TOL, f"seed={seed}"


def test_gradcheck_reference_float64():
    """The reference's autograd (which the kernel is checked against) by finite differences."""
    groups = torch.tensor([[0, 0, 1, 1, 2, INVALID_GROUP]], dtype=torch.int32)
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True)
    for strict in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: reference_attention(q, k, v, groups, groups, strict=strict), (q, k, v))


def test_unsorted_key_groups_and_bad_shapes_are_rejected():
    q, k, v = rand(1, 2, 8, 16), rand(1, 2, 8, 16), rand(1, 2, 8, 16)
    unsorted = torch.tensor([[0, 2, 1, 3, 4, 5, 6, 7]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="non-decreasing"):
        group_attention(q, k, v, unsorted, unsorted, strict=False, backend="triton")
    sorted_groups = unsorted.sort(dim=1).values
    with pytest.raises(ValueError, match="q_groups"):
        group_attention(q, k, v, sorted_groups[:, :5], sorted_groups, strict=False, backend="triton")
    with pytest.raises(ValueError, match="must agree"):
        two_stream_attention(q, rand(1, 4, 3, 16), k, v, sorted_groups, sorted_groups[:, :3], backend="triton")


def test_unsupported_head_dim_falls_back_with_a_log(caplog):
    groups = torch.tensor([[0, 0, 1, 2, 3, 3]], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(1, 2, 6, 24), rand(1, 2, 6, 24), rand(1, 2, 6, 24)
    assert "head_dim=24" in triton_attention.unsupported_reason(q, k, v)
    with caplog.at_level(logging.WARNING, logger="biglearn_kernels.dispatch"):
        o = group_attention(q, k, v, groups, groups, strict=False, backend="triton")
    assert "head_dim=24" in caplog.text
    assert torch.equal(o, reference_attention(q, k, v, groups, groups, strict=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_gpu(head_dim, dtype):
    seed, rng = fresh_rng()
    groups, query_groups = make_batch(rng, "padding_only", 3, 700)
    tensors = [torch.randn(3, 4, n, head_dim, device="cuda") for n in (700, query_groups.shape[1])]
    tensors += [torch.randn(3, 2, 700, head_dim, device="cuda") for _ in range(2)]
    low = [t.to(dtype).requires_grad_() for t in tensors]
    full = [t.to(dtype).float().requires_grad_() for t in tensors]
    got = two_stream_attention(*low, groups, query_groups, backend="triton")
    want = two_stream_attention(*full, groups, query_groups, backend="torch")
    for g, w in zip(got, want):
        assert not torch.isnan(g).any(), f"seed={seed}"
        assert rel_err(g, w) < 1e-2, f"seed={seed}"
    assert (got[0][1] == 0).all()  # the all-padding sample sees nothing
    for g, w in zip(grads(got, low, seed), grads(want, full, seed)):
        assert not torch.isnan(g).any() and rel_err(g, w) < 1e-2, f"seed={seed}"


COMPILE_FOR_GPU = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from biglearn_kernels import triton_attention as ta
assert not ta.INTERPRET
for kernel in (ta._fwd_kernel, ta._bwd_dq_kernel, ta._bwd_dkdv_kernel):
    fn, config = kernel.fn, kernel.configs[0]
    consts = dict(HEAD_DIM=128, HAS_A=True, HAS_B=True, STRICT_A=0, STRICT_B=1, PRECISION="tf32", N_STEPS=15,
                  **config.kwargs)
    def arg_type(name):
        if name in consts:
            return "constexpr"
        if name.startswith("s_") or name in ("n_heads", "kv_group", "n_qa", "n_qb", "n_k"):
            return "i32"
        if name in ("qk_scale", "sm_scale"):
            return "fp32"
        if name.startswith(("G", "KG", "SORTED")):
            return "*i32"
        return "*fp32" if name.startswith(("LSE", "DELTA")) else "*bf16"
    signature = {name: arg_type(name) for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", int(sys.argv[1]), 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    print(fn.__name__, "cubin bytes", len(compiled.asm["cubin"]), "shared", compiled.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpu_without_one(arch):
    """The GPU path (not the interpreter) type-checks and assembles: Triton front end, LLVM and
    the bundled ptxas for sm_90 / sm_80, bf16, head_dim 128, both streams. About a minute each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU, str(arch)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)  # sizes, shown with pytest -s
    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        assert f"{name} cubin bytes" in result.stdout

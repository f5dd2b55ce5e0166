"""Group-causal two-stream flash attention in Triton (docs/design.md, "Visibility rule", "Stream modes").

Visibility comes from per-token int32 groups only (no mask tensor): row i sees key j iff
valid_i and group[j] <= thr_i, where thr_i = group[i] for the inclusive (content) rule and
group[i] - 1 for the strict (query-stream) rule, and valid_i = group[i] != INVALID. Keys are
sorted by group, so a row sees exactly a prefix of the keys, and for a query tile:

- the visible prefix ends at count(kg <= max thr): key tiles past it are never loaded;
- key tiles inside count(kg <= min thr) are fully visible and skip the elementwise mask;
- a tile with no valid row does no work and writes zeros.

Counts are binary searches over the sorted key groups (O(log Nk) scalar loads per tile).
Online softmax follows FlashAttention-2 (Dao, 2023): running max m and sum l in fp32, exp2
with log2(e) folded into the scale, and lse = m + log2(l) saved for the backward pass.

Two streams share one launch: program m handles tile m of stream A (content rows) and tile m
of stream B (query-stream rows) against the same K/V tiles, loading each K/V tile once for
both. The backward pass has a dq kernel with the same structure and a dk/dv kernel that, per
key tile, walks the query tiles of both streams (and every query head sharing the K/V head
under grouped-query attention), skipping query tiles that cannot see the key tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import INVALID_GROUP

# Read once at import: kernels are built for the interpreter or the GPU at decoration time.
INTERPRET = bool(triton.knobs.runtime.interpret)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
# Globals read inside @triton.jit code must be constexpr.
_INVALID = tl.constexpr(INVALID_GROUP)
_INT32_MIN = tl.constexpr(-(2**31))
_INT32_MAX = tl.constexpr(2**31 - 1)


def _fix_interpreter_scalar_index():
    """The interpreter (triton 3.6) stores scalars as 1-element arrays and turns them into
    loop bounds with int(array), which NumPy >= 2.4 rejects; index them with .item() instead.
    Interpreter mode only: compiled kernels never go through this path."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "scalar_index_fixed", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.scalar_index_fixed = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_scalar_index()


def _configs(block_pairs):
    """Autotune space on GPU; one small fixed tile in interpreter mode (keeps CPU tests fast)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn in block_pairs for w in (4, 8) for s in (2, 3)]


# N_STEPS = bit_length(longest row) buckets lengths by powers of two, so a query stream whose
# length changes every batch does not re-run the tuning each time (dtypes are keyed implicitly).
_TUNE_KEY = ["N_STEPS", "HEAD_DIM", "HAS_A", "HAS_B"]


@triton.jit
def _count_le(groups_ptr, n, x, N_STEPS: tl.constexpr):
    """Number of entries <= x in the non-decreasing int32 row groups_ptr[0:n]."""
    lo = tl.zeros([], dtype=tl.int32)  # n may arrive as a constexpr 1: force a tensor
    hi = lo + n
    for _ in tl.static_range(N_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        value = tl.load(groups_ptr + mid, mask=active, other=0)
        go_right = active & (value <= x)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(active & (value > x), mid, hi)
    return lo


@triton.jit
def _row_thresholds(g_ptr, rows, n_q, STRICT: tl.constexpr):
    """Per-row threshold thr (row sees key j iff kg[j] <= thr) and its tile max/min."""
    g = tl.load(g_ptr + rows, mask=rows < n_q, other=_INVALID)
    valid = g != _INVALID
    thr = tl.where(valid, g - STRICT, _INT32_MIN)
    return thr, valid, tl.max(thr, 0), tl.min(tl.where(valid, thr, _INT32_MAX), 0)


@triton.jit
def _stream_bounds(g_ptr, rows, n_q, kg_ptr, n_k, N_STEPS: tl.constexpr, STRICT: tl.constexpr, BLOCK_N: tl.constexpr):
    """thr per row, end of the visible key prefix, and end of the fully visible key tiles."""
    thr, valid, thr_max, thr_min = _row_thresholds(g_ptr, rows, n_q, STRICT)
    n_end = _count_le(kg_ptr, n_k, thr_max, N_STEPS)
    full_end = (_count_le(kg_ptr, n_k, thr_min, N_STEPS) // BLOCK_N) * BLOCK_N
    return thr, n_end, full_end


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k, v, kg, thr, apply_mask, qk_scale, PRECISION: tl.constexpr):
    """One online-softmax step (scores in log2 units); masked entries get -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if apply_mask:
        s = tl.where(kg[None, :] <= thr[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _store_rows(acc, m_i, l_i, thr, kg_first, O_ptr, LSE_ptr, rows, n_q, offs_d, HEAD_DIM: tl.constexpr):
    """o = acc / l and lse = m + log2(l); rows that see no key get o = 0 and lse = +inf."""
    sees = thr >= kg_first
    o = tl.where(sees[:, None], acc / tl.where(sees, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(sees, m_i + tl.math.log2(tl.where(sees, l_i, 1.0)), float("inf"))
    in_rows = rows < n_q
    tl.store(O_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], o.to(O_ptr.dtype.element_ty),
             mask=in_rows[:, None])
    tl.store(LSE_ptr + rows, lse, mask=in_rows)


@triton.autotune(configs=_configs([(128, 64), (64, 64), (128, 128), (64, 32)]), key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(QA, QB, K, V, GA, GB, KG, OA, OB, LSEA, LSEB,
                s_qab, s_qah, s_qan, s_qbb, s_qbh, s_qbn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                n_heads, kv_group, n_qa, n_qb, n_k, qk_scale,
                HEAD_DIM: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr,
                STRICT_A: tl.constexpr, STRICT_B: tl.constexpr, PRECISION: tl.constexpr, N_STEPS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # later row tiles see more keys: start them first
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // kv_group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kg_row = KG + b * n_k
    kg_first = tl.load(kg_row)  # smallest key group of the sample
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    n_end = tl.zeros([], dtype=tl.int32)
    if HAS_A:
        thr_a, end_a, full_a = _stream_bounds(GA + b * n_qa, rows, n_qa, kg_row, n_k, N_STEPS, STRICT_A, BLOCK_N)
        q_a = tl.load(QA + b * s_qab + h * s_qah + rows[:, None] * s_qan + offs_d[None, :],
                      mask=(rows < n_qa)[:, None], other=0.0)
        acc_a = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_a = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_a = tl.zeros([BLOCK_M], dtype=tl.float32)
        n_end = tl.maximum(n_end, end_a)
    if HAS_B:
        thr_b, end_b, full_b = _stream_bounds(GB + b * n_qb, rows, n_qb, kg_row, n_k, N_STEPS, STRICT_B, BLOCK_N)
        q_b = tl.load(QB + b * s_qbb + h * s_qbh + rows[:, None] * s_qbn + offs_d[None, :],
                      mask=(rows < n_qb)[:, None], other=0.0)
        acc_b = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_b = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_b = tl.zeros([BLOCK_M], dtype=tl.float32)
        n_end = tl.maximum(n_end, end_b)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + offs_n
        in_k = cols < n_k
        k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        kg = tl.load(kg_row + cols, mask=in_k, other=_INVALID)  # padding keys: never visible
        if HAS_A:
            if start_n < end_a:
                acc_a, m_a, l_a = _attend_tile(acc_a, m_a, l_a, q_a, k, v, kg, thr_a, start_n >= full_a,
                                               qk_scale, PRECISION)
        if HAS_B:
            if start_n < end_b:
                acc_b, m_b, l_b = _attend_tile(acc_b, m_b, l_b, q_b, k, v, kg, thr_b, start_n >= full_b,
                                               qk_scale, PRECISION)
    if HAS_A:
        _store_rows(acc_a, m_a, l_a, thr_a, kg_first, OA + pid_bh * n_qa * HEAD_DIM, LSEA + pid_bh * n_qa,
                    rows, n_qa, offs_d, HEAD_DIM)
    if HAS_B:
        _store_rows(acc_b, m_b, l_b, thr_b, kg_first, OB + pid_bh * n_qb * HEAD_DIM, LSEB + pid_bh * n_qb,
                    rows, n_qb, offs_d, HEAD_DIM)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k, v, kg, thr, apply_mask, qk_scale, PRECISION: tl.constexpr):
    """dq += dS K with dS = P * (dP - delta); rows with lse = +inf have P = 0."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if apply_mask:
        p = tl.where(kg[None, :] <= thr[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _load_stream_rows(Q, DO, LSE, DELTA, b, h, pid_bh, rows, n_q, s_qb, s_qh, s_qn, offs_d, HEAD_DIM: tl.constexpr):
    """q, dO, lse and delta for one tile of query rows (out-of-range rows: lse = +inf)."""
    in_rows = rows < n_q
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + offs_d[None, :], mask=in_rows[:, None], other=0.0)
    do = tl.load(DO + pid_bh * n_q * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=in_rows[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh * n_q + rows, mask=in_rows, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * n_q + rows, mask=in_rows, other=0.0)
    return q, do, lse, delta


@triton.autotune(configs=_configs([(64, 64), (128, 64), (64, 32)]), key=_TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(QA, QB, K, V, GA, GB, KG, DOA, DOB, LSEA, LSEB, DELTAA, DELTAB, DQA, DQB,
                   s_qab, s_qah, s_qan, s_qbb, s_qbh, s_qbn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                   n_heads, kv_group, n_qa, n_qb, n_k, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr,
                   STRICT_A: tl.constexpr, STRICT_B: tl.constexpr, PRECISION: tl.constexpr, N_STEPS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # later row tiles see more keys: start them first
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // kv_group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kg_row = KG + b * n_k
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    n_end = tl.zeros([], dtype=tl.int32)
    if HAS_A:
        thr_a, end_a, full_a = _stream_bounds(GA + b * n_qa, rows, n_qa, kg_row, n_k, N_STEPS, STRICT_A, BLOCK_N)
        q_a, do_a, lse_a, delta_a = _load_stream_rows(QA, DOA, LSEA, DELTAA, b, h, pid_bh, rows, n_qa,
                                                      s_qab, s_qah, s_qan, offs_d, HEAD_DIM)
        dq_a = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        n_end = tl.maximum(n_end, end_a)
    if HAS_B:
        thr_b, end_b, full_b = _stream_bounds(GB + b * n_qb, rows, n_qb, kg_row, n_k, N_STEPS, STRICT_B, BLOCK_N)
        q_b, do_b, lse_b, delta_b = _load_stream_rows(QB, DOB, LSEB, DELTAB, b, h, pid_bh, rows, n_qb,
                                                      s_qbb, s_qbh, s_qbn, offs_d, HEAD_DIM)
        dq_b = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        n_end = tl.maximum(n_end, end_b)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + offs_n
        in_k = cols < n_k
        k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        kg = tl.load(kg_row + cols, mask=in_k, other=_INVALID)
        if HAS_A:
            if start_n < end_a:
                dq_a = _dq_tile(dq_a, q_a, do_a, lse_a, delta_a, k, v, kg, thr_a, start_n >= full_a,
                                qk_scale, PRECISION)
        if HAS_B:
            if start_n < end_b:
                dq_b = _dq_tile(dq_b, q_b, do_b, lse_b, delta_b, k, v, kg, thr_b, start_n >= full_b,
                                qk_scale, PRECISION)
    if HAS_A:
        tl.store(DQA + pid_bh * n_qa * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
                 (dq_a * sm_scale).to(DQA.dtype.element_ty), mask=(rows < n_qa)[:, None])
    if HAS_B:
        tl.store(DQB + pid_bh * n_qb * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
                 (dq_b * sm_scale).to(DQB.dtype.element_ty), mask=(rows < n_qb)[:, None])


@triton.jit
def _dkdv_stream(dk, dv, k, v, kg, kg_lo, kg_hi, Q, DO, LSE, DELTA, G, QSORTED, b, h, pid_bh,
                 n_q, s_qb, s_qh, s_qn, N_STEPS: tl.constexpr, qk_scale, STRICT: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Add one stream's contribution to dk, dv of a key tile (transposed: rows = keys)."""
    g_row = G + b * n_q
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # Sorted query groups: rows seeing this key tile are the valid rows with g - STRICT >= kg_lo,
    # a contiguous range found by binary search. Otherwise walk every tile and test it.
    is_sorted = tl.load(QSORTED + b) != 0
    first = _count_le(g_row, n_q, kg_lo + STRICT - 1, N_STEPS)
    n_valid = _count_le(g_row, n_q, _INVALID - 1, N_STEPS)
    m_start = tl.where(is_sorted, (first // BLOCK_M) * BLOCK_M, 0)
    m_end = tl.where(is_sorted, n_valid, n_q)
    for start_m in range(m_start, m_end, BLOCK_M):
        rows = start_m + offs_m
        thr, valid, thr_max, thr_min = _row_thresholds(g_row, rows, n_q, STRICT)
        if thr_max >= kg_lo:
            q, do, lse, delta = _load_stream_rows(Q, DO, LSE, DELTA, b, h, pid_bh, rows, n_q,
                                                  s_qb, s_qh, s_qn, offs_d, HEAD_DIM)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            p_t = tl.math.exp2(s_t - lse[None, :])
            if thr_min < kg_hi:  # some (valid row, key) pair of the tile is hidden
                p_t = tl.where(kg[:, None] <= thr[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_configs([(64, 64), (64, 128), (32, 64)]), key=_TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(QA, QB, K, V, GA, GB, KG, SORTEDA, SORTEDB, DOA, DOB, LSEA, LSEB, DELTAA, DELTAB, DK, DV,
                     s_qab, s_qah, s_qan, s_qbb, s_qbh, s_qbn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                     n_heads, kv_group, n_qa, n_qb, n_k, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr,
                     STRICT_A: tl.constexpr, STRICT_B: tl.constexpr, PRECISION: tl.constexpr, N_STEPS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    n_kv_heads = n_heads // kv_group
    b = pid_bhk // n_kv_heads
    hk = pid_bhk % n_kv_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = cols < n_k
    kg_row = KG + b * n_k
    kg = tl.load(kg_row + cols, mask=in_k, other=_INVALID)
    kg_lo = tl.load(kg_row + pid_n * BLOCK_N)  # smallest group in the tile (keys are sorted)
    kg_hi = tl.load(kg_row + tl.minimum(pid_n * BLOCK_N + BLOCK_N, n_k) - 1)
    k = tl.load(K + b * s_kb + hk * s_kh + cols[:, None] * s_kn + offs_d[None, :], mask=in_k[:, None], other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + cols[:, None] * s_vn + offs_d[None, :], mask=in_k[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if kg_lo != _INVALID:  # a tile of padding keys is seen by nobody
        for head in range(kv_group):  # every query head that shares this K/V head
            h = hk * kv_group + head
            pid_bh = b * n_heads + h
            if HAS_A:
                dk, dv = _dkdv_stream(dk, dv, k, v, kg, kg_lo, kg_hi, QA, DOA, LSEA, DELTAA, GA, SORTEDA, b, h,
                                      pid_bh, n_qa, s_qab, s_qah, s_qan, N_STEPS, qk_scale, STRICT_A, HEAD_DIM,
                                      PRECISION, BLOCK_M)
            if HAS_B:
                dk, dv = _dkdv_stream(dk, dv, k, v, kg, kg_lo, kg_hi, QB, DOB, LSEB, DELTAB, GB, SORTEDB, b, h,
                                      pid_bh, n_qb, s_qbb, s_qbh, s_qbn, N_STEPS, qk_scale, STRICT_B, HEAD_DIM,
                                      PRECISION, BLOCK_M)
    out = pid_bhk * n_k * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_k[:, None])


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors, or None when it can."""
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim={q.shape[-1]} is not one of {SUPPORTED_HEAD_DIMS}"
    if v.shape[-1] != q.shape[-1]:
        return f"v head_dim={v.shape[-1]} differs from q head_dim={q.shape[-1]}"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q={q.dtype} k={k.dtype} v={v.dtype}: need one of {SUPPORTED_DTYPES}, all equal"
    if q.device.type != "cuda":
        if not INTERPRET:
            return f"tensors are on {q.device.type}; Triton needs CUDA (or TRITON_INTERPRET=1 set before import)"
        if q.dtype != torch.float32:
            return "the Triton interpreter on CPU runs float32 only"
    return None


def _row_major(x):
    """The kernels take any batch/head/row strides but need unit stride along head_dim."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _strides(x):
    return (0, 0, 0) if x is None else tuple(x.stride()[:3])


def _is_sorted(groups):
    """Per-sample flag (int32, on device, no host sync): groups non-decreasing along the row."""
    if groups.shape[1] < 2:
        return torch.ones(groups.shape[0], dtype=torch.int32, device=groups.device)
    return (groups[:, 1:] >= groups[:, :-1]).all(dim=1).to(torch.int32)


def _pick(x, placeholder):
    """An absent stream's tensors are never read (HAS_A / HAS_B = False) but need a pointer."""
    return placeholder if x is None else x


def _common_args(q_a, q_b, k, v, scale):
    ref = q_a if q_a is not None else q_b
    batch, n_heads, _, head_dim = ref.shape
    n_qa = 0 if q_a is None else q_a.shape[2]
    n_qb = 0 if q_b is None else q_b.shape[2]
    n_k = k.shape[2]
    n_steps = max(n_qa, n_qb, n_k).bit_length()  # binary-search steps over any row
    strides = (*_strides(q_a), *_strides(q_b), *_strides(k), *_strides(v))
    meta = dict(HEAD_DIM=head_dim, HAS_A=q_a is not None, HAS_B=q_b is not None, N_STEPS=n_steps,
                PRECISION="ieee" if ref.dtype == torch.float32 else "tf32")  # no TF32 rounding for fp32
    return ref, (batch, n_heads, n_qa, n_qb, n_k), strides, (n_heads, n_heads // k.shape[1], n_qa, n_qb, n_k,
                                                            scale * LOG2E), meta


def _forward(q_a, q_b, k, v, groups_a, groups_b, k_groups, strict_a, strict_b, scale):
    ref, (batch, n_heads, n_qa, n_qb, n_k), strides, scalars, meta = _common_args(q_a, q_b, k, v, scale)
    head_dim = ref.shape[-1]
    o_a = ref.new_empty(batch, n_heads, n_qa, head_dim) if q_a is not None else None
    o_b = ref.new_empty(batch, n_heads, n_qb, head_dim) if q_b is not None else None
    lse_a = ref.new_empty(batch, n_heads, n_qa, dtype=torch.float32) if q_a is not None else None
    lse_b = ref.new_empty(batch, n_heads, n_qb, dtype=torch.float32) if q_b is not None else None

    def grid(m):
        return (max(triton.cdiv(n_qa, m["BLOCK_M"]), triton.cdiv(n_qb, m["BLOCK_M"])), batch * n_heads)

    _fwd_kernel[grid](_pick(q_a, ref), _pick(q_b, ref), k, v, _pick(groups_a, k_groups), _pick(groups_b, k_groups),
                      k_groups, _pick(o_a, ref), _pick(o_b, ref), _pick(lse_a, ref), _pick(lse_b, ref),
                      *strides, *scalars, STRICT_A=int(strict_a), STRICT_B=int(strict_b), **meta)
    return o_a, o_b, lse_a, lse_b


def _backward(q_a, q_b, k, v, o_a, o_b, lse_a, lse_b, do_a, do_b, groups_a, groups_b, k_groups,
              strict_a, strict_b, scale):
    ref, (batch, n_heads, n_qa, n_qb, n_k), strides, scalars, meta = _common_args(q_a, q_b, k, v, scale)
    # delta_i = sum_d dO_id O_id, the row term of the softmax Jacobian (FlashAttention-2, Alg. 2).
    delta_a = (o_a.float() * do_a.float()).sum(-1) if q_a is not None else None
    delta_b = (o_b.float() * do_b.float()).sum(-1) if q_b is not None else None
    do_a = do_a.contiguous() if q_a is not None else None
    do_b = do_b.contiguous() if q_b is not None else None
    dq_a = torch.empty_like(o_a) if q_a is not None else None
    dq_b = torch.empty_like(o_b) if q_b is not None else None
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    streams = (_pick(q_a, ref), _pick(q_b, ref), k, v, _pick(groups_a, k_groups), _pick(groups_b, k_groups), k_groups)
    grads_in = (_pick(do_a, ref), _pick(do_b, ref), _pick(lse_a, ref), _pick(lse_b, ref),
                _pick(delta_a, ref), _pick(delta_b, ref))
    flags = dict(STRICT_A=int(strict_a), STRICT_B=int(strict_b), **meta)
    _bwd_dq_kernel[lambda m: (max(triton.cdiv(n_qa, m["BLOCK_M"]), triton.cdiv(n_qb, m["BLOCK_M"])),
                              batch * n_heads)](
        *streams, *grads_in, _pick(dq_a, ref), _pick(dq_b, ref), *strides, *scalars, scale, **flags)
    sorted_a = _is_sorted(groups_a) if q_a is not None else k_groups
    sorted_b = _is_sorted(groups_b) if q_b is not None else k_groups
    _bwd_dkdv_kernel[lambda m: (triton.cdiv(n_k, m["BLOCK_N"]), batch * k.shape[1])](
        *streams, sorted_a, sorted_b, *grads_in, dk, dv, *strides, *scalars, scale, **flags)
    return dq_a, dq_b, dk, dv


class _GroupAttentionFunction(torch.autograd.Function):
    """Autograd wrapper around the fused forward and the dq / dk-dv backward kernels."""

    @staticmethod
    def forward(ctx, q_a, q_b, k, v, groups_a, groups_b, k_groups, strict_a, strict_b, scale):
        o_a, o_b, lse_a, lse_b = _forward(q_a, q_b, k, v, groups_a, groups_b, k_groups, strict_a, strict_b, scale)
        ctx.save_for_backward(q_a, q_b, k, v, o_a, o_b, lse_a, lse_b, groups_a, groups_b, k_groups)
        ctx.rule = (strict_a, strict_b, scale)
        return o_a, o_b

    @staticmethod
    def backward(ctx, do_a, do_b):
        q_a, q_b, k, v, o_a, o_b, lse_a, lse_b, groups_a, groups_b, k_groups = ctx.saved_tensors
        if q_a is not None and do_a is None:
            do_a = torch.zeros_like(o_a)
        if q_b is not None and do_b is None:
            do_b = torch.zeros_like(o_b)
        dq_a, dq_b, dk, dv = _backward(q_a, q_b, k, v, o_a, o_b, lse_a, lse_b, do_a, do_b,
                                       groups_a, groups_b, k_groups, *ctx.rule)
        return dq_a, dq_b, dk, dv, None, None, None, None, None, None


def fused_group_attention(q_a, groups_a, q_b, groups_b, k, v, k_groups, *, strict_a: bool, strict_b: bool,
                          scale: float | None = None):
    """Two query streams against one K/V in one launch per pass; either stream may be None.

    Stream A rows see keys with k_group <= group (strict_a: <), stream B likewise with strict_b.
    Inputs must already pass `kernels.check_attention_inputs` and `unsupported_reason`;
    k_groups must be non-decreasing per row (the kernel's block skipping relies on it).
    Returns (o_a, o_b), None for an absent stream.
    """
    if q_a is None and q_b is None:
        raise ValueError("fused_group_attention needs at least one of q_a, q_b")
    ref = q_a if q_a is not None else q_b
    scale = ref.shape[-1] ** -0.5 if scale is None else float(scale)
    n_rows = sum(q.shape[2] for q in (q_a, q_b) if q is not None)
    if k.shape[2] == 0 or n_rows == 0:  # no keys (every row sees nothing) or no rows: no launch
        return (None if q_a is None else q_a * 0), (None if q_b is None else q_b * 0)
    q_a, q_b, k, v = (_row_major(x) for x in (q_a, q_b, k, v))
    groups_a = None if groups_a is None else groups_a.contiguous()
    groups_b = None if groups_b is None else groups_b.contiguous()
    return _GroupAttentionFunction.apply(q_a, q_b, k, v, groups_a, groups_b, k_groups.contiguous(),
                                         strict_a, strict_b, scale)

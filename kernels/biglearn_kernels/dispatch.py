"""Public entry points: argument checks and backend choice (docs/design.md, "Package map")."""
from __future__ import annotations

import logging

import torch

from .reference import INVALID_GROUP, reference_attention

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "triton")


def check_attention_inputs(q, k, v, q_groups, k_groups, *, check_sorted: bool = True) -> None:
    """Raise ValueError naming the offending argument; never let bad shapes produce numbers."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, N, D]; got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    batch, n_heads, n_queries, head_dim = q.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must agree in B, Hkv, Nk")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k{tuple(k.shape)} does not match q{tuple(q.shape)} in batch or head_dim")
    if n_heads % k.shape[1] != 0:
        raise ValueError(f"n_kv_heads={k.shape[1]} must divide n_heads={n_heads}")
    if tuple(q_groups.shape) != (batch, n_queries):
        raise ValueError(f"q_groups must be [B, Nq] = {(batch, n_queries)}; got {tuple(q_groups.shape)}")
    if tuple(k_groups.shape) != (batch, k.shape[2]):
        raise ValueError(f"k_groups must be [B, Nk] = {(batch, k.shape[2])}; got {tuple(k_groups.shape)}")
    for name, groups in (("q_groups", q_groups), ("k_groups", k_groups)):
        if groups.dtype != torch.int32:
            raise ValueError(f"{name} must be int32; got {groups.dtype}")
    if check_sorted and k_groups.shape[1] > 1 and bool((k_groups[:, 1:] < k_groups[:, :-1]).any()):
        raise ValueError("k_groups must be non-decreasing along each row (the sorted layout of docs/design.md)")


_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    """Log each distinct backend decision once per process, not once per layer call."""
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def _triton_kernels():
    """The Triton module, imported lazily: it fixes interpreter vs GPU mode when imported, so
    CPU runs that never ask for Triton never import it. None when triton is missing."""
    try:
        from . import triton_attention
    except ImportError as err:
        _log_once(logging.WARNING, f"kernels: triton unavailable ({err})")
        return None
    return triton_attention


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def flash_attn_case(q_groups, k_groups, *, strict: bool) -> str | None:
    """'causal' or 'full' when the group rule is plain causal / bidirectional attention for
    every sample (content rule, same groups for rows and keys, no padding), else None.
    Reads the groups on the host, so it is only asked when flash-attn could be used."""
    if strict or q_groups.shape != k_groups.shape or not torch.equal(q_groups, k_groups):
        return None
    if bool((k_groups == INVALID_GROUP).any()):
        return None
    if bool((k_groups == k_groups[:, :1]).all()):
        return "full"  # one group per row: everybody sees everybody
    if bool((k_groups[:, 1:] > k_groups[:, :-1]).all()):
        return "causal"  # strictly increasing groups: row i sees keys j <= i
    return None


def _resolve_backend(backend: str, *queries_kv) -> str:
    """'torch' or 'triton' for these tensors, logging the decision once."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    q = queries_kv[0]
    if backend == "torch":
        _log_once(logging.INFO, "kernels: attention backend = torch reference (requested)")
        return "torch"
    if backend == "auto" and not q.is_cuda:
        _log_once(logging.INFO, f"kernels: attention backend = torch reference (auto, tensors on {q.device.type})")
        return "torch"
    module = _triton_kernels()
    if module is None:
        if backend == "triton":
            raise ValueError("backend='triton' but triton cannot be imported; install triton or use backend='torch'")
        return "torch"
    *queries, k, v = queries_kv
    for query in queries:
        reason = module.unsupported_reason(query, k, v)
        if reason is None:
            continue
        if backend == "triton" and not query.is_cuda and not module.INTERPRET:
            raise ValueError(f"backend='triton': {reason}")
        _log_once(logging.WARNING, f"kernels: Triton cannot take this call ({reason}); using the torch reference")
        return "torch"
    _log_once(logging.INFO, f"kernels: attention backend = triton ({backend}, {q.device.type})")
    return "triton"


def group_attention(q, k, v, q_groups, k_groups, *, strict: bool, scale: float | None = None,
                    backend: str = "auto", check_sorted: bool = True):
    """Attention where query row i sees key j iff k_groups[j] <= q_groups[i] (strict: <).

    q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D] with Hkv dividing H; groups int32, k_groups
    non-decreasing per row. Rows that see no key return zeros. `check_sorted=False` skips the
    O(B*Nk) sortedness check (and its host sync) for callers that validated groups already.
    backend "auto" runs Triton on CUDA tensors and the torch reference elsewhere; with
    flash-attn installed, a pure causal or bidirectional batch in fp16/bf16 goes to flash-attn.
    """
    check_attention_inputs(q, k, v, q_groups, k_groups, check_sorted=check_sorted)
    choice = _resolve_backend(backend, q, k, v)
    if choice == "torch":
        return reference_attention(q, k, v, q_groups, k_groups, strict=strict, scale=scale)
    flash = _flash_attn_func() if backend == "auto" and q.dtype in (torch.float16, torch.bfloat16) else None
    case = flash_attn_case(q_groups, k_groups, strict=strict) if flash is not None else None
    if case is not None:
        _log_once(logging.INFO, f"kernels: flash-attn used for a pure {case} batch")
        o = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                  causal=case == "causal")
        return o.transpose(1, 2)
    o, _ = _triton_kernels().fused_group_attention(q, q_groups, None, None, k, v, k_groups,
                                                   strict_a=strict, strict_b=True, scale=scale)
    return o


def two_stream_attention(q_content, q_query, k, v, groups, query_groups, *, scale: float | None = None,
                         backend: str = "auto", check_sorted: bool = True):
    """Both XLNet streams against the same content keys/values.

    Content rows (groups) use the inclusive rule, query-stream rows (query_groups) the strict
    one. Returns (o_content, o_query). q_content may be None (e.g. the last layer, whose
    content output nobody reads). On the Triton backend both streams run in one fused launch
    per pass, each K/V tile loaded once for both.
    """
    if q_content is not None:
        check_attention_inputs(q_content, k, v, groups, groups, check_sorted=check_sorted)
    check_attention_inputs(q_query, k, v, query_groups, groups,
                           check_sorted=check_sorted and q_content is None)
    queries = (q_query,) if q_content is None else (q_content, q_query)
    if q_content is not None and (q_content.shape[:2] != q_query.shape[:2] or q_content.dtype != q_query.dtype):
        raise ValueError(f"q_content {tuple(q_content.shape)} {q_content.dtype} and q_query {tuple(q_query.shape)} "
                         f"{q_query.dtype} must agree in batch, heads and dtype")
    if _resolve_backend(backend, *queries, k, v) == "triton":
        return _triton_kernels().fused_group_attention(q_content, groups, q_query, query_groups, k, v, groups,
                                                       strict_a=False, strict_b=True, scale=scale)
    o_content = None
    if q_content is not None:
        o_content = reference_attention(q_content, k, v, groups, groups, strict=False, scale=scale)
    o_query = reference_attention(q_query, k, v, query_groups, groups, strict=True, scale=scale)
    return o_content, o_query


__all__ = ["INVALID_GROUP", "BACKENDS", "group_attention", "two_stream_attention", "check_attention_inputs",
           "flash_attn_case"]

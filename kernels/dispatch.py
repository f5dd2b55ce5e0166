"""Public entry points: argument checks and backend choice (design.md §4)."""
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
        raise ValueError("k_groups must be non-decreasing along each row (sorted layout, design.md §2)")


def group_attention(q, k, v, q_groups, k_groups, *, strict: bool, scale: float | None = None,
                    backend: str = "auto", check_sorted: bool = True):
    """Attention where query row i sees key j iff k_groups[j] <= q_groups[i] (strict: <).

    q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D] with Hkv dividing H; groups int32, k_groups
    non-decreasing per row. Rows that see no key return zeros. `check_sorted=False` skips the
    O(B*Nk) sortedness check (and its host sync) for callers that validated groups already.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    check_attention_inputs(q, k, v, q_groups, k_groups, check_sorted=check_sorted)
    if backend == "triton":
        raise ValueError("backend='triton' is not available in this build; use 'torch' or 'auto'")
    return reference_attention(q, k, v, q_groups, k_groups, strict=strict, scale=scale)


def two_stream_attention(q_content, q_query, k, v, groups, query_groups, *, scale: float | None = None,
                         backend: str = "auto", check_sorted: bool = True):
    """Both XLNet streams against the same content keys/values.

    Content rows (groups) use the inclusive rule, query-stream rows (query_groups) the strict
    one. Returns (o_content, o_query). q_content may be None (e.g. the last layer, whose
    content output nobody reads).
    """
    o_content = None
    if q_content is not None:
        o_content = group_attention(q_content, k, v, groups, groups, strict=False, scale=scale,
                                    backend=backend, check_sorted=check_sorted)
    o_query = group_attention(q_query, k, v, query_groups, groups, strict=True, scale=scale,
                              backend=backend, check_sorted=False if q_content is not None else check_sorted)
    return o_content, o_query


__all__ = ["INVALID_GROUP", "group_attention", "two_stream_attention", "check_attention_inputs"]

"""Dense PyTorch reference for group-causal attention (design.md §2).

Visibility is derived from per-token int32 groups, never stored as an L x L mask for the
whole sequence: the reference materialises it one query chunk at a time, so memory stays
O(chunk x Nk) however long the sequence is. The Triton kernel is checked against this.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INVALID_GROUP = 2**31 - 1  # dropped tokens and padding

# Upper bound on the number of mask / score elements (B x H x chunk x Nk) held at once.
_CHUNK_ELEMENTS = 1 << 26


def visibility(q_groups: torch.Tensor, k_groups: torch.Tensor, *, strict: bool) -> torch.Tensor:
    """Dense visibility rule, bool [B, Nq, Nk].

    content (strict=False): row i sees key j iff k_group[j] <= q_group[i]
    query   (strict=True):  row i sees key j iff k_group[j] <  q_group[i]
    A row whose group is INVALID sees nothing, and an INVALID key is seen by no valid row.
    """
    qg = q_groups[:, :, None]
    kg = k_groups[:, None, :]
    seen = kg < qg if strict else kg <= qg
    return seen & (qg != INVALID_GROUP) & (kg != INVALID_GROUP)


def reference_attention(q, k, v, q_groups, k_groups, *, strict: bool, scale: float | None = None):
    """Softmax attention under the group rule; rows that see no key return zeros.

    q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D]. Keys must be sorted by group (non-decreasing),
    which lets each query chunk stop at the last key any of its rows can see.
    """
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    if n_kv_heads != n_heads:  # grouped-query attention: share each K/V head across H/Hkv heads
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
    scale = head_dim**-0.5 if scale is None else scale
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * n_heads * n_keys))
    out = q.new_zeros(batch, n_heads, n_queries, v.shape[-1])
    for start in range(0, n_queries, chunk):
        stop = min(n_queries, start + chunk)
        qg = q_groups[:, start:stop]
        valid = qg != INVALID_GROUP
        if not bool(valid.any()):
            continue  # padding-only chunk: output stays zero
        # Keys are sorted, so every visible key lies in the prefix whose groups are <= the
        # chunk's largest valid group; the rest of the row is skipped.
        top = int(torch.where(valid, qg, qg.new_tensor(-1)).max())
        n_visible = int((k_groups <= top).sum(dim=1).max())
        if n_visible == 0:
            continue
        mask = visibility(qg, k_groups[:, :n_visible], strict=strict)[:, None]  # [B,1,c,n]
        sees_any = mask.any(dim=-1, keepdim=True)
        # An all-False row would give NaN in softmax; let it see everything, then zero it.
        safe_mask = mask | ~sees_any
        o = F.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, :n_visible], v[:, :, :n_visible],
            attn_mask=safe_mask, scale=scale,
        )
        out[:, :, start:stop] = torch.where(sees_any, o, torch.zeros((), dtype=o.dtype, device=o.device))
    return out

"""Dense PyTorch reference for group-causal attention (docs/design.md, "Visibility rule").

Visibility is derived from per-token int32 groups, never stored as an L x L mask for the
whole sequence: the reference materialises it one query chunk at a time, so memory stays
O(chunk x Nk) however long the sequence is. The Triton kernel is checked against this.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

INVALID_GROUP = 2**31 - 1  # dropped tokens and padding

# Upper bound on the number of mask / score elements (B x H x chunk x Nk) held at once.
_CHUNK_ELEMENTS = 1 << 26
# Fewest query rows for which the per-sample causal path below pays: it makes two SDPA calls per
# sample, and with short rows their overhead outweighs the keys they skip (biglearn, single
# stream, CPU: L=32 with B=64 ran 1.2x slower, L=128 and 256 the same, L=1024 7% faster per step).
_PREFIX_CAUSAL_MIN_ROWS = 256


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


def visible_prefix(q_groups: torch.Tensor, k_groups: torch.Tensor, *, strict: bool) -> torch.Tensor:
    """int64 [B, Nq]: how many keys row i sees. Keys are sorted by group, so the visible keys of
    every row are a prefix of the row (the rule above, as a count); INVALID rows see none."""
    n_visible = torch.searchsorted(k_groups.contiguous(), q_groups.contiguous(), right=not strict)
    # An INVALID row would count INVALID keys as "<=" itself; an INVALID key is never counted
    # for a valid row, because INVALID is the largest group and keys are sorted.
    return n_visible.masked_fill_(q_groups == INVALID_GROUP, 0)


class _Plan:
    """How reference_attention cuts one (q_groups, k_groups, strict) call: query chunks, the key
    bound of each, and each chunk's additive float mask (`mask`; None where every row sees all
    `bound` keys). Every layer of a forward pass attends under the same groups, so the plan is built
    once and shared: one host sync per forward instead of one per layer, and one mask tensor
    that all layers save for backward instead of a fresh copy per layer (SDPA converts a bool
    mask to the query's dtype itself and saves that copy)."""

    def __init__(self, q_groups, k_groups, strict: bool, n_heads: int, dtype):
        batch, n_queries = q_groups.shape
        n_keys = k_groups.shape[1]
        n_visible = visible_prefix(q_groups, k_groups, strict=strict)  # [B, Nq]
        chunk = min(n_queries, max(1, _CHUNK_ELEMENTS // max(1, batch * n_heads * n_keys)))
        starts = list(range(0, n_queries, chunk))
        # Longest prefix per chunk, read in one host sync. Rows are non-decreasing in prefix length
        # except for INVALID rows (zero), so a max is needed rather than the chunk's last row.
        padded = F.pad(n_visible, (0, len(starts) * chunk - n_queries))
        # Row i seeing exactly keys 0..i in every sample (a causal LM's rows) is SDPA's is_causal case,
        # which needs no mask and skips the upper triangle. So is row i seeing keys 0..i+c-1 for one
        # c <= 1 (c = 0: the query stream of a causal order, which sees the keys strictly before it):
        # rows below 1 - c see nothing, and the rest are the causal case against the keys shifted by
        # 1 - c. Read with the bounds, in the same host sync.
        rows = torch.arange(n_queries, device=q_groups.device)
        shift = n_visible - rows  # c per row
        uniform = (shift == shift[:1, :1]).all()
        # Content rows of S followed by singleton target groups (big learning, prefix LM, in the
        # sorted layout): in each sample, the first P rows see exactly the first P keys (S sees
        # itself), each later valid row i sees keys 0..i, and the V - P rows after them are padding
        # (dropped tokens) that see nothing. Per sample that is SDPA's causal case over V rows with
        # the first P redone over their P keys: no mask, and half the keys of a full pass.
        # Checked only where it can pay (long content rows), so short calls (a decoding step's
        # few rows) spend no operations on it.
        read = [padded.view(batch, len(starts), chunk).amax(dim=(0, 2)), uniform.view(1), shift[:1, 0]]
        if not strict and n_queries >= _PREFIX_CAUSAL_MIN_ROWS:
            prefix = n_visible[:, :1]  # P per sample
            valid = (n_visible > 0).sum(1, keepdim=True)  # V per sample
            prefix_causal = (torch.where(rows < prefix, n_visible == prefix,
                                         torch.where(rows < valid, n_visible == rows + 1, n_visible == 0)).all()
                             & (valid > prefix).any())
            read += [prefix_causal.view(1), prefix[:, 0], valid[:, 0]]
        read = torch.cat(read).tolist()
        bounds, (uniform, offset) = read[:len(starts)], read[len(starts):len(starts) + 2]
        prefix_causal = len(read) > len(starts) + 2 and read[len(starts) + 2]
        prefix_and_valid = list(zip(read[-2 * batch:-batch], read[-batch:]))
        # causal_skip: None, or how many leading rows see no key before the causal case begins
        self.causal_skip = 1 - offset if uniform and offset <= 1 else None
        # prefix_causal: None, or (P, V) per sample for the causal case with redone prefixes (above)
        self.prefix_causal = prefix_and_valid if prefix_causal and self.causal_skip is None else None
        self.dtype = dtype
        # (start, stop, bound, rows' visible key counts or None, row multiplier or None); none on the causal paths
        self.chunks = []
        self._masks = {}  # chunk index -> additive mask, kept while autograd would save it anyway
        for start, bound in zip(starts, bounds) if self.causal_skip is None and self.prefix_causal is None else ():
            stop = min(n_queries, start + chunk)
            if bound == 0:  # no row sees a key (padding, strict rows of group 0)
                self.chunks.append((start, stop, bound, None, None))
                continue
            rows_visible = n_visible[:, start:stop, None]  # [B, c, 1]
            sees_any = rows_visible > 0
            # A row that sees nothing would give NaN in softmax: let it see the chunk's keys, then zero it.
            rows_visible = torch.where(sees_any, rows_visible, bound)
            if bool((rows_visible == bound).all()):
                rows_visible = None  # every row sees all `bound` keys: no mask, SDPA's fastest path
            keep = None if bool(sees_any.all()) else sees_any[:, None].to(dtype)
            self.chunks.append((start, stop, bound, rows_visible, keep))

    def rows_from(self, first: int) -> _Plan | None:
        """This plan for its rows first: onward against the same keys, cut from it without a host
        sync (the last layer of a decoding step attends with its query rows only). Each chunk
        keeps its key bound, a bound for the remaining rows too. None on the causal path."""
        if self.causal_skip is not None or self.prefix_causal is not None:
            return None
        plan = object.__new__(_Plan)
        plan.causal_skip, plan.prefix_causal, plan.dtype, plan._masks, plan.chunks = None, None, self.dtype, {}, []
        for index, (start, stop, bound, rows_visible, keep) in enumerate(self.chunks):
            if stop <= first:
                continue
            cut = max(start, first) - start  # rows of this chunk before `first`
            if index in self._masks:  # a mask already built: its rows from `first` on
                plan._masks[len(plan.chunks)] = self._masks[index][:, :, cut:]
            plan.chunks.append((start + cut - first, stop - first, bound,
                                None if rows_visible is None else rows_visible[:, cut:],
                                None if keep is None else keep[:, :, cut:]))
        return plan

    def mask(self, index: int):
        """Chunk `index`'s additive float mask [B, 1, c, bound], or None. With autograd on, every
        chunk's mask is saved for backward anyway, so it is built once and shared by the layers;
        without it, one chunk's mask at a time (memory O(chunk x Nk) however long the sequence),
        kept when the plan has one chunk (a decoding step's rows: built once, not once per layer)."""
        _, _, bound, rows_visible, _ = self.chunks[index]
        if rows_visible is None:
            return None
        if index in self._masks:
            return self._masks[index]
        hidden = torch.arange(bound, device=rows_visible.device) >= rows_visible
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=hidden.device).masked_fill_(
            hidden, float("-inf"))[:, None]
        if torch.is_grad_enabled() or len(self.chunks) == 1:
            self._masks[index] = mask
        return mask


_plans: list[tuple[tuple, tuple, _Plan]] = []  # (key, weak references to the group tensors, plan), newest last
_PLANS_KEPT = 4  # a forward pass uses up to three (content rows, query rows, the last layer's readout)


def _plan(q_groups, k_groups, strict: bool, n_heads: int, dtype) -> _Plan:
    """The plan of this call, reused while the same group tensors come back unchanged. Keyed by
    the tensors' identity and version counters (an in-place write, as the KV cache's groups get,
    bumps the version). The cache holds the tensors weakly: a plan, and the masks it keeps, go
    when the forward pass that made its groups is over, and an id reused by a later tensor never
    matches a dead entry. Tensors made under torch.inference_mode have no version counter, so
    their plans are not kept."""
    if q_groups.is_inference() or k_groups.is_inference():
        return _Plan(q_groups, k_groups, strict, n_heads, dtype)  # no version counter: never reused
    _plans[:] = [entry for entry in _plans if all(ref() is not None for ref in entry[1])]
    key = (id(q_groups), q_groups._version, id(k_groups), k_groups._version, strict, n_heads, dtype,
           q_groups.device, tuple(q_groups.shape), tuple(k_groups.shape), _CHUNK_ELEMENTS)
    for entry_key, (q_ref, k_ref), plan in _plans:
        if entry_key == key and q_ref() is q_groups and k_ref() is k_groups:
            return plan
    plan = _Plan(q_groups, k_groups, strict, n_heads, dtype)
    _plans.append((key, (weakref.ref(q_groups), weakref.ref(k_groups)), plan))
    del _plans[:-_PLANS_KEPT]
    return plan


def attention_plan(q_groups, k_groups, *, strict: bool, n_heads: int, dtype) -> _Plan:
    """reference_attention's plan for these groups, built now for a caller that applies it to
    several q, k, v itself (planned_attention): the layers of a decoding step, whose groups are
    made under torch.inference_mode, so the plan cache above cannot key them."""
    return _Plan(q_groups, k_groups, strict, n_heads, dtype)


def reference_attention(q, k, v, q_groups, k_groups, *, strict: bool, scale: float | None = None):
    """Softmax attention under the group rule; rows that see no key return zeros.

    q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D]. Keys must be sorted by group (non-decreasing), so
    each row sees a prefix of the keys whose length never decreases along the row: the mask is
    one comparison against that length, and a query chunk stops at the longest prefix of its
    rows. (Smaller chunks skip more of the staircase but were slower on CPU: the SDPA calls get
    small and the sliced K/V gradients are re-assembled; measured in docs/benchmarks.md.)
    """
    if q.shape[0] == 0 or q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    return planned_attention(q, k, v, _plan(q_groups, k_groups, strict, q.shape[1], q.dtype), scale=scale)


def planned_attention(q, k, v, plan: _Plan, *, scale: float | None = None):
    """reference_attention of q [B, H, Nq, D] (B, Nq >= 1) over k, v [B, Hkv, Nk, D] under a
    plan built for q's rows and k's keys."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if n_kv_heads != n_heads:  # grouped-query attention: share each K/V head across H/Hkv heads
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
    scale = head_dim**-0.5 if scale is None else scale
    if plan.causal_skip is not None:
        skip = min(plan.causal_skip, n_queries)
        width = n_queries - skip
        o = F.scaled_dot_product_attention(q[:, :, skip:], k[:, :, :width], v[:, :, :width], is_causal=True,
                                           scale=scale)
        return o if skip == 0 else torch.cat([q.new_zeros(batch, n_heads, skip, v.shape[-1]), o], dim=2)
    if plan.prefix_causal is not None:
        samples = []
        # split, not indexing: one gradient concatenation per tensor in backward instead of a
        # zero-filled full-size copy per sample; 4-d pieces, which SDPA's fused CPU kernel needs
        for q_b, k_b, v_b, (prefix, valid) in zip(q.split(1), k.split(1), v.split(1), plan.prefix_causal):
            parts = [] if prefix == 0 else [F.scaled_dot_product_attention(
                q_b[:, :, :prefix], k_b[:, :, :prefix], v_b[:, :, :prefix], scale=scale)]
            if valid > prefix:
                parts.append(F.scaled_dot_product_attention(q_b[:, :, :valid], k_b[:, :, :valid], v_b[:, :, :valid],
                                                            is_causal=True, scale=scale)[:, :, prefix:])
            if valid < n_queries:  # padding rows see nothing: zeros
                parts.append(q_b.new_zeros(1, n_heads, n_queries - valid, v.shape[-1]))
            samples.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        return torch.cat(samples)
    pieces = []
    for index, (start, stop, bound, _, keep) in enumerate(plan.chunks):
        if bound == 0:
            pieces.append(q.new_zeros(batch, n_heads, stop - start, v.shape[-1]))
            continue
        o = F.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, :bound], v[:, :, :bound], attn_mask=plan.mask(index), scale=scale)
        pieces.append(o if keep is None else o * keep)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

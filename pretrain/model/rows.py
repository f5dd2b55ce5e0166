"""What every layer of one pass shares: which rows there are, where their keys and values come
from, which keys each row sees, and the rows' rotary tables (docs/design.md, "Stream modes"):
one for the content rows' keys (at their own positions) and one for every row's queries (in
single-stream mode a predicting row attends from one left of its target, docs/model.md).

A pass holds n_content CONTENT rows (they give the keys and values) followed by QUERY rows.
Block.forward takes either kind of pass, so training and decoding run the same blocks:

    BatchRows    a forward pass over a TaskBatch: keys and values are the content rows' own;
                 content rows follow the content rule, query rows the strict rule at their group
    DecodeStep   one incremental decoding step: the new content rows' keys and values are written
                 into the KVCache first, then every row attends over the cache under the content
                 rule (a query row of group g comes as g - 1: it sees groups strictly below g)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from biglearn_kernels import attention_plan, group_attention, planned_attention, two_stream_attention

from .kv_cache import KVCache
from .rope import RotaryRows


@dataclass
class BatchRows:
    """A forward pass over a batch. query_groups None: content rows only (a causal LM's batch in
    single-stream mode). weights None: the blocks multiply by their own nn.Linear weights."""
    groups: torch.Tensor               # [B, n_content] int32, sorted
    query_groups: torch.Tensor | None  # [B, n_query] int32
    rope: RotaryRows                   # tables of the content rows (their keys), then the query rows
    backend: str = "auto"
    query_rope: RotaryRows | None = None  # every row's queries where they differ from `rope` (single stream)
    weights = None

    def __post_init__(self):
        if self.query_rope is None:
            self.query_rope = self.rope

    @property
    def n_content(self) -> int:
        return self.groups.shape[1]

    def keys_values(self, layer: int, k, v):
        return k, v

    def attend(self, q, k, v, first: int):
        """Attention of the pass's rows first: (q) over the content keys: both streams at once,
        or the query rows alone (first = n_content, the last layer), or content rows alone."""
        if self.query_groups is None:
            return group_attention(q, k, v, self.groups, self.groups, strict=False, backend=self.backend,
                                   check_sorted=False)
        n = self.n_content
        q_content, q_query = (None, q) if first else (q[:, :, :n], q[:, :, n:])
        o_content, o_query = two_stream_attention(q_content, q_query, k, v, self.groups, self.query_groups,
                                                  backend=self.backend, check_sorted=False)
        return o_query if first else torch.cat([o_content, o_query], dim=2)


@dataclass
class DecodeStep:
    """One decoding step (BigLearner.decode_step): its rows, their cache columns and rotary tables,
    and the attention plans every layer shares."""
    n_content: int                    # new content rows (the first rows of the step)
    write_index: torch.Tensor | None  # [B, Hkv, n_content, head_dim]: their cache columns
    row_groups: torch.Tensor          # [B, rows] int32: the content-rule group of each row
    cache: KVCache
    rope: RotaryRows                  # the rows' tables (the new content rows' keys)
    weights: list                     # BigLearner.decoding_weights: per block, [in, out] matrices
    query_rope: RotaryRows | None = None  # every row's queries where they differ from `rope` (single stream)
    plans: dict = field(default_factory=dict)  # first row -> attention_plan of rows first:

    def __post_init__(self):
        if self.query_rope is None:
            self.query_rope = self.rope

    def keys_values(self, layer: int, k, v):
        """The cache of this layer, with the new content rows' keys and values written BEFORE
        attending: they see themselves and everything cached with a group <= theirs. Cached rows
        never change: a content row only sees groups <= its own, all decoded before it."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if self.n_content:
            keys.scatter_(2, self.write_index, k)
            values.scatter_(2, self.write_index, v)
        return keys, values

    def attend(self, q, k, v, first: int):
        """Attention of the step's rows first: (q) over the cache (k, v), under a plan of which
        keys each row sees that is built once per step, not once per layer: deriving it cost
        ~4x the attention itself for a few rows on CPU. SDPA over the visible prefix whatever
        model.attention_backend says: a step has a few rows per sample, for which the Triton
        kernel's tiles are mostly empty."""
        if first not in self.plans:
            # The last layer's query rows: cut from the earlier layers' plan when there is one (a
            # plan costs ~0.15 ms to build, 6% of a small model's step).
            plan = self.plans[0].rows_from(first) if first and 0 in self.plans else None
            self.plans[first] = plan if plan is not None else attention_plan(
                self.row_groups[:, first:], self.cache.groups, strict=False, n_heads=q.shape[1], dtype=q.dtype)
        return planned_attention(q, k, v, self.plans[first])

"""Incremental decoding state (docs/design.md, key/value cache): the cache of content rows'
keys and values, and what every layer of one decoding step shares (BigLearner.decode_step)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import kernels


@dataclass
class DecodeStep:
    """What every layer of one decoding step shares, built once per step by decode_step."""
    n_new: int                       # new content rows (the first rows of the step)
    write_index: torch.Tensor | None  # [B, Hkv, n_new, head_dim]: their cache columns
    row_groups: torch.Tensor         # [B, rows] int32: the content-rule group of each row
    key_groups: torch.Tensor         # [B, capacity] int32: the cache's groups
    cos: torch.Tensor                # [B, 1, rows, head_dim] = cat(cos, cos) of rope_tables
    sin: torch.Tensor                # [B, 1, rows, head_dim] = cat(-sin, sin)
    plans: dict = field(default_factory=dict)  # first row -> kernels.attention_plan of rows first:

    def rope(self, x, start: int, stop: int | None):
        """apply_rope for the step's rows start:stop, as x * cos + roll(x, head_dim / 2) * sin with
        the tables widened once per step: bitwise the same numbers (a - b is a + (-b)), half the
        operations per call."""
        return x * self.cos[:, :, start:stop] + x.roll(x.shape[-1] // 2, -1) * self.sin[:, :, start:stop]

    def attention(self, q, k, v, first: int):
        """Attention of the step's rows first: (q) over the cache (k, v), under a plan of which
        keys each row sees that is built once per step, not once per layer: deriving it cost
        ~4x the attention itself for a few rows on CPU."""
        if first not in self.plans:
            # The last layer's query rows: cut from the earlier layers' plan when there is one (a
            # plan costs ~0.15 ms to build, 6% of a small model's step).
            plan = self.plans[0].rows_from(first) if first and 0 in self.plans else None
            self.plans[first] = plan if plan is not None else kernels.attention_plan(
                self.row_groups[:, first:], self.key_groups, strict=False, n_heads=q.shape[1], dtype=q.dtype)
        return kernels.planned_attention(q, k, v, self.plans[first])


@dataclass
class KVCache:
    """Content-stream keys/values of every layer for incremental decoding.

    Sample b's rows fill columns [0, length[b]) in decoding order; columns past that hold group
    INVALID, so each row of `groups` stays non-decreasing (docs/design.md, "Sorted layout").
    """
    keys: list[torch.Tensor]    # n_layers x [B, Hkv, capacity, head_dim], RoPE applied
    values: list[torch.Tensor]  # n_layers x [B, Hkv, capacity, head_dim]
    groups: torch.Tensor        # [B, capacity] int32
    length: torch.Tensor        # [B] int64 filled columns
    inv_freq: torch.Tensor      # rope_inv_freq of the model, computed once rather than every step

    @property
    def capacity(self) -> int:
        return int(self.groups.shape[1])

    def append(self, groups: torch.Tensor, check_sorted: bool = True) -> torch.Tensor:
        """Reserve the columns of new rows with `groups` [B, m] int32 (INVALID for a sample's unused
        trailing rows) and return them [B, m]. The cache stays sorted by group: after each
        sample's last cached group the new groups run non-decreasing; check_sorted=False skips
        that check (~4% of a small model's decoding step) for callers sorted by construction.
        Nothing is written when a check fails."""
        write_index = self.length[:, None] + torch.arange(groups.shape[1], device=groups.device)
        if check_sorted:
            last = self.groups.gather(1, (self.length[:, None] - 1).clamp(min=0))
            last = torch.where(self.length[:, None] > 0, last, torch.iinfo(torch.int32).min)
            following = torch.cat([last, groups], 1)
            unsorted = following[:, 1:] < following[:, :-1]
            needed, n_unsorted = torch.stack([write_index.max() + 1, unsorted.sum()]).tolist()
        else:
            needed, n_unsorted = int(write_index.max()) + 1, 0
        if needed > self.capacity:
            raise ValueError(f"KV cache is full: capacity {self.capacity} rows, needed {needed}")
        if n_unsorted:
            b = int(unsorted.any(1).nonzero()[0, 0])
            raise ValueError(f"decode_step: groups of sample {b}'s new rows {groups[b].tolist()} fall below a "
                             f"group already cached or decrease (last cached: {int(last[b, 0])}); each call "
                             f"writes groups no lower than the cache's, in non-decreasing order")
        self.groups.scatter_(1, write_index, groups)
        self.length += (groups != kernels.INVALID_GROUP).sum(1)
        return write_index

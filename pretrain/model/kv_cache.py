"""Incremental decoding state (docs/design.md, key/value cache): the cache of content rows'
keys and values of every layer (BigLearner.new_cache, BigLearner.decode_step)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from biglearn_kernels import INVALID_GROUP


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
        self.length += (groups != INVALID_GROUP).sum(1)
        return write_index

    def truncate(self, length: torch.Tensor, check: bool = True) -> None:
        """Forget each sample's columns from `length` [B] on (no more than it holds): their groups
        become INVALID, so no row sees them and later appends overwrite them. What speculative
        decoding needs to take back the content rows of drafted tokens it rejected
        (pretrain/infer/speculative.py); the keys and values stay as they are, unseen.
        check=False skips the bounds check (a host sync) for callers correct by construction."""
        if check and ((length > self.length) | (length < 0)).any():
            raise ValueError(f"KVCache.truncate: lengths {length.tolist()} must lie in [0, {self.length.tolist()}]")
        self.groups.masked_fill_(torch.arange(self.capacity, device=length.device) >= length[:, None], INVALID_GROUP)
        self.length.copy_(length)

"""BigLearner: one transformer p(x_T | x_S) with XLNet-style two-stream attention.

Reads top to bottom: embeddings -> blocks (content stream h, query stream g, shared weights)
-> logits on query-stream rows -> cross-entropy. Attention goes only through `kernels`.

- Content stream h: token embeddings; row i sees keys of groups <= its own (design.md §2).
- Query stream g: one row per target, starting from a learned vector (no token identity), its
  position entering through RoPE; it sees content keys of groups strictly below its own, so a
  target never sees itself or anything predicted jointly with or after it.
Loss = sum over targets of -log p(x_t | x_S, x_{T_<g}) (seed 000 eq. 6, seed 001 eq. 15).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels

from .collate import IGNORE_LABEL, TaskBatch
from .objectives import TASKS


@dataclass
class ModelConfig:
    vocab_size: int = 8000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    ffn_hidden: int | None = None  # None = SwiGLU default: 8/3 d_model rounded up to 64
    rope_base: float = 10000.0
    dropout: float = 0.0
    max_seq_len: int = 2048  # longest sample the model is meant for (inference checks it)
    tie_embeddings: bool = True
    n_segment_types: int = 0  # > 0 adds a learned embedding per segment id (multi-segment samples)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention_backend: str = "auto"
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key} must be a positive integer; got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"model head dim {self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1); got {self.dropout!r}")
        if self.attention_backend not in kernels.dispatch.BACKENDS:
            raise ValueError(f"model.attention_backend must be one of {kernels.dispatch.BACKENDS}; got {self.attention_backend!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in at least fp32 (bf16 sums of squares lose too much precision).
        wide = x.float() if x.element_size() < 4 else x
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, base: float, dtype):
    """cos/sin [B, 1, N, head_dim/2] for ORIGINAL positions (the sorted layout reorders rows)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None, :, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Block(nn.Module):
    """Pre-norm attention + SwiGLU, applied with the same weights to both streams."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d, hd = config.d_model, config.head_dim
        self.attn_norm = RMSNorm(d, config.norm_eps)
        self.wq = nn.Linear(d, config.n_heads * hd, bias=False)
        self.wkv = nn.Linear(d, 2 * config.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(config.n_heads * hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, config.norm_eps)
        self.w_gate_up = nn.Linear(d, 2 * config.ffn_hidden, bias=False)
        self.w_down = nn.Linear(config.ffn_hidden, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def _heads(self, x, n_heads):
        return x.view(x.shape[0], x.shape[1], n_heads, self.config.head_dim).transpose(1, 2)

    def _mlp(self, x):
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.dropout(self.w_down(F.silu(gate) * up))

    def _attend_residual(self, x, o):
        """Attention output projection + residual, then the MLP sub-block."""
        return self._mlp(x + self.dropout(self.wo(o.transpose(1, 2).flatten(2))))

    def forward(self, h, g, groups, target_groups, rope_content, rope_query, last: bool):
        c = self.config
        normed_h = self.attn_norm(h)
        k, v = self._heads(self.wkv(normed_h), 2 * c.n_kv_heads).split(c.n_kv_heads, dim=1)
        k = apply_rope(k, *rope_content)
        q_query = apply_rope(self._heads(self.wq(self.attn_norm(g)), c.n_heads), *rope_query)
        # The content stream's output after the last layer is never read: skip it there.
        q_content = None if last else apply_rope(self._heads(self.wq(normed_h), c.n_heads), *rope_content)
        o_content, o_query = kernels.two_stream_attention(
            q_content, q_query, k, v, groups, target_groups, backend=c.attention_backend, check_sorted=False)
        g = self._attend_residual(g, o_query)
        if not last:
            h = self._attend_residual(h, o_content)
        return h, g

    def decode(self, h, g, cache_k, cache_v, write_index, new_groups, key_groups, query_groups,
               rope_new, rope_query, last: bool):
        """One layer of incremental decoding (design.md §3 with a key/value cache).

        h: new content rows [B, m, d] or None; their keys/values are written into the cache at
        columns write_index [B, m] BEFORE attending, so they see themselves and everything
        cached with a group <= theirs. g: query rows [B, nq, d] or None, seeing cached keys of
        groups strictly below query_groups. Cached rows never change: a content row only sees
        groups <= its own, all of which were decoded before it.
        """
        c = self.config
        if h is not None:
            normed_h = self.attn_norm(h)
            k, v = self._heads(self.wkv(normed_h), 2 * c.n_kv_heads).split(c.n_kv_heads, dim=1)
            index = write_index[:, None, :, None].expand(-1, c.n_kv_heads, -1, c.head_dim)
            cache_k.scatter_(2, index, apply_rope(k, *rope_new))
            cache_v.scatter_(2, index, v)
            if not last:  # the last layer's content output is never read
                q_content = apply_rope(self._heads(self.wq(normed_h), c.n_heads), *rope_new)
                o_content = kernels.group_attention(q_content, cache_k, cache_v, new_groups, key_groups, strict=False,
                                                    backend=c.attention_backend, check_sorted=False)
                h = self._attend_residual(h, o_content)
        if g is not None:
            q_query = apply_rope(self._heads(self.wq(self.attn_norm(g)), c.n_heads), *rope_query)
            o_query = kernels.group_attention(q_query, cache_k, cache_v, query_groups, key_groups, strict=True,
                                              backend=c.attention_backend, check_sorted=False)
            g = self._attend_residual(g, o_query)
        return h, g


@dataclass
class KVCache:
    """Content-stream keys/values of every layer for incremental decoding.

    Sample b's rows fill columns [0, length[b]) in decoding order; columns past that hold group
    INVALID, so each row of `groups` stays non-decreasing (the sorted layout, design.md §2).
    """
    keys: list[torch.Tensor]    # n_layers x [B, Hkv, capacity, head_dim], RoPE applied
    values: list[torch.Tensor]  # n_layers x [B, Hkv, capacity, head_dim]
    groups: torch.Tensor        # [B, capacity] int32
    length: torch.Tensor        # [B] int64 filled columns

    @property
    def capacity(self) -> int:
        return int(self.groups.shape[1])


class BigLearner(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.segment_embed = nn.Embedding(config.n_segment_types, config.d_model) if config.n_segment_types else None
        self.query_start = nn.Parameter(torch.zeros(config.d_model))  # query stream's g_0
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init)
        nn.init.normal_(self.query_start, std=config.init_std)
        for block in self.blocks:  # GPT-2 style: scale residual projections by depth
            for proj in (block.wo, block.w_down):
                nn.init.normal_(proj.weight, std=config.init_std / math.sqrt(2 * config.n_layers))

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_batch(self, batch: TaskBatch) -> None:
        """ValueError naming the field; one host sync for all checks."""
        if batch.tokens.dim() != 2 or batch.groups.shape != batch.tokens.shape or batch.positions.shape != batch.tokens.shape:
            raise ValueError(f"batch.tokens, positions, groups must share shape [B, N]; got "
                             f"{tuple(batch.tokens.shape)}, {tuple(batch.positions.shape)}, {tuple(batch.groups.shape)}")
        if batch.target_index.shape != batch.target_groups.shape or batch.labels.shape != batch.target_groups.shape:
            raise ValueError("batch.target_index, target_groups, labels must share shape [B, Nt]")
        problems = torch.stack([
            (batch.tokens < 0).any() | (batch.tokens >= self.config.vocab_size).any(),
            (batch.groups[:, 1:] < batch.groups[:, :-1]).any() if batch.groups.shape[1] > 1 else batch.groups.new_zeros((), dtype=torch.bool),
            (batch.target_groups[:, 1:] < batch.target_groups[:, :-1]).any() if batch.target_groups.shape[1] > 1 else batch.groups.new_zeros((), dtype=torch.bool),
        ]).tolist()
        if problems[0]:
            raise ValueError(f"batch.tokens has ids outside [0, vocab_size={self.config.vocab_size}): "
                             "tokenizer and model vocabularies do not match")
        if problems[1]:
            raise ValueError("batch.groups must be non-decreasing along each row (sorted layout)")
        if problems[2]:
            raise ValueError("batch.target_groups must be non-decreasing along each row")

    def query_states(self, batch: TaskBatch) -> torch.Tensor:
        """Final query-stream states [B, Nt, d_model], one per target row."""
        self.check_batch(batch)
        c = self.config
        h = self.embed(batch.tokens)
        if self.segment_embed is not None and batch.segments is not None:
            h = h + self.segment_embed(batch.segments)
        batch_size, n_targets = batch.target_index.shape
        g = self.query_start.to(h.dtype).expand(batch_size, n_targets, -1)
        target_positions = batch.positions.gather(1, batch.target_index)
        rope_content = rope_tables(batch.positions, c.head_dim, c.rope_base, h.dtype)
        rope_query = rope_tables(target_positions, c.head_dim, c.rope_base, h.dtype)
        groups, target_groups = batch.groups, batch.target_groups
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if c.activation_checkpointing and self.training:
                h, g = checkpoint(block, h, g, groups, target_groups, rope_content, rope_query, last,
                                  use_reentrant=False)
            else:
                h, g = block(h, g, groups, target_groups, rope_content, rope_query, last)
        return self.norm(g)

    def new_cache(self, batch_size: int, capacity: int, device=None, dtype=None) -> KVCache:
        """An empty KVCache for `capacity` content rows per sample."""
        c = self.config
        param = next(self.parameters())
        device, dtype = device or param.device, dtype or param.dtype
        shape = (batch_size, c.n_kv_heads, capacity, c.head_dim)
        return KVCache(keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks],
                       values=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks],
                       groups=torch.full((batch_size, capacity), kernels.INVALID_GROUP, device=device, dtype=torch.int32),
                       length=torch.zeros(batch_size, device=device, dtype=torch.long))

    @torch.no_grad()
    def decode_step(self, cache: KVCache, tokens=None, positions=None, groups=None,
                    query_positions=None, query_groups=None, segments=None):
        """Append content rows to `cache`, then predict query rows against it.

        tokens, positions, groups [B, m]: new content rows (groups INVALID for a sample's unused
        trailing rows; valid groups must not be below any group already cached). query_positions,
        query_groups [B, nq]: rows to predict (INVALID for unused ones). Returns logits
        [B, nq, vocab], or None without query rows. Equals `forward` on the batch that holds the
        cached rows as S and earlier target groups, with m + nq rows of work instead of all of them.
        """
        c = self.config
        h = write_index = rope_new = None
        if tokens is not None and tokens.shape[1] > 0:
            groups = groups.to(torch.int32)
            n_new = (groups != kernels.INVALID_GROUP).sum(1)
            write_index = cache.length[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
            if int(write_index.max()) >= cache.capacity:
                raise ValueError(f"KV cache is full: capacity {cache.capacity} rows, "
                                 f"needed {int(write_index.max()) + 1}")
            cache.groups.scatter_(1, write_index, groups)
            cache.length += n_new
            h = self.embed(tokens)
            if self.segment_embed is not None and segments is not None:
                h = h + self.segment_embed(segments)
            rope_new = rope_tables(positions, c.head_dim, c.rope_base, h.dtype)
        g = rope_query = None
        if query_positions is not None and query_positions.shape[1] > 0:
            param = self.query_start
            g = param.expand(query_positions.shape[0], query_positions.shape[1], -1)
            rope_query = rope_tables(query_positions, c.head_dim, c.rope_base, param.dtype)
            query_groups = query_groups.to(torch.int32)
        for i, block in enumerate(self.blocks):
            h, g = block.decode(h, g, cache.keys[i], cache.values[i], write_index, groups, cache.groups,
                                query_groups, rope_new, rope_query, last=i == len(self.blocks) - 1)
        return None if g is None else self.head(self.norm(g))

    def forward(self, batch: TaskBatch) -> torch.Tensor:
        """Logits [B, Nt, vocab] for every target row (padding rows included)."""
        return self.head(self.query_states(batch))

    def loss(self, batch: TaskBatch):
        """The objective's weighted NLL, sum(target_weights * nll) / sum(loss_norm) (the mean NLL per
        target when the batch carries no weights), and per-task sums of the UNWEIGHTED NLL
        {"nll_sum", "count"} [len(TASKS)]."""
        states = self.query_states(batch)
        mask = batch.target_mask
        logits = self.head(states[mask])  # only real targets reach the vocabulary projection
        labels = batch.labels[mask]
        if logits.element_size() < 4:
            logits = logits.float()  # softmax over the vocabulary in fp32 under bf16/fp16
        nll = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_LABEL)
        weights = 1.0 if batch.target_weights is None else batch.target_weights[mask].to(nll.dtype)
        norm = batch.n_target.sum() if batch.loss_norm is None else batch.loss_norm.sum()
        loss = (nll * weights).sum() / norm.to(nll.dtype)
        task_of_row = batch.task_id[:, None].expand_as(mask)[mask]
        stats = {
            "nll_sum": torch.zeros(len(TASKS), device=nll.device).index_add_(0, task_of_row, nll.detach().float()),
            "count": torch.bincount(task_of_row, minlength=len(TASKS)).to(nll.device, torch.float32),
        }
        return loss, stats

"""BigLearner: one transformer p(x_T | x_S), two-stream (XLNet) or single-stream attention.

Reads top to bottom: embeddings -> blocks (content rows h, query rows g, shared weights)
-> the final state of each target's predictor row -> logits -> cross-entropy. Attention goes
only through `kernels`.

- Content rows h: token embeddings; row i sees keys of groups <= its own (docs/design.md).
- Query rows g: start from a learned vector (no token identity), the target's position
  entering through RoPE; they see content keys of groups strictly below the target's, so a
  target never sees itself or anything predicted jointly with or after it.
- streams=2: every target is predicted by a query row. streams=1 (single stream, "shifted"):
  a singleton target group after a singleton group (or first) is predicted by that group's
  content row (or the START row), told the target's position by a learned offset term; the
  other targets keep query rows. A content row of group g-1 sees exactly what a query row of
  group g sees, so both kinds are the same computation in the last layer.
- Content rows of the last target group feed nothing in any layer and are never computed.
Loss = sum over targets of -log p(x_t | x_S, x_{T_<g}) ("Big Learning" eq. 6,
"Big Cooperative Learning" eq. 15).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels

from .collate import IGNORE_LABEL, QUERY_PREDICTOR, START_PREDICTOR, TaskBatch
from .errors import UserError
from .kv_cache import DecodeStep, KVCache
from .ops import linear_cross_entropy, rms_norm, swiglu_down


@dataclass
class ModelConfig:
    vocab_size: int = 8000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    ffn_hidden: int | None = None  # None = SwiGLU default: 8/3 d_model rounded up to 64
    rope_base: float = 10000.0
    # Rotary frequency scaling as a transformers config writes it (rope_parameters / rope_scaling
    # without rope_theta), e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}. Empty: plain RoPE.
    rope_scaling: dict = field(default_factory=dict)
    dropout: float = 0.0
    max_seq_len: int = 2048  # longest sample the model is meant for (inference checks it)
    tie_embeddings: bool = True
    n_segment_types: int = 0  # > 0 adds a learned embedding per segment id (multi-segment samples)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention_backend: str = "auto"
    activation_checkpointing: bool = False
    streams: int = 2  # 2: two-stream attention; 1: single stream, query rows only where needed
    bos_id: int = 2  # streams=1: token of the START row (the tokenizer's BOS id)
    # Path of an export (ours, or a checkpoint imported by `pretrain.convert from-hf`) to start
    # training from: its architecture and weights, this config's stream mode (docs/hf.md).
    init: str = ""

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
        if isinstance(self.streams, bool) or not isinstance(self.streams, int) or self.streams not in (1, 2):
            raise ValueError(f"model.streams must be 1 or 2; got {self.streams!r}")
        if not isinstance(self.bos_id, int) or not 0 <= self.bos_id < self.vocab_size:
            raise ValueError(f"model.bos_id must be a token id in [0, vocab_size={self.vocab_size}); got {self.bos_id!r}")
        if self.rope_scaling:
            rope_inv_freq(self.head_dim, self.rope_base, self.rope_scaling)  # ValueError naming the missing key
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
        return rms_norm(x, self.weight, self.eps)


class LMHead(nn.Linear):
    """The vocabulary projection. Called with labels it returns (loss, per-row NLL) through the
    chunked linear cross-entropy of pretrain/ops.py, which never holds the [N, vocab] logits;
    one module either way, so that ZeRO-3 gathers the weight on entry under `head.weight`."""

    def forward(self, states, labels=None, weights=None, norm=None):
        if labels is None:
            return super().forward(states)
        return linear_cross_entropy(states, self.weight, labels, weights, norm, IGNORE_LABEL)


class SwiGLUDown(nn.Linear):
    """The down projection applied to [gate | up] as silu(gate) * up @ W.T, with the product
    recomputed in backward instead of saved (pretrain/ops.py). A module, so that ZeRO-3 gathers
    its weight on entry like any Linear's, under the usual `w_down.weight` name."""

    def forward(self, gate_up):
        return swiglu_down(gate_up, self.weight)


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """Rotary frequencies [head_dim/2], computed as transformers computes them (same formula, same
    fp32 operations) so that imported Llama-family weights see the same angles: plain RoPE
    ("RoFormer: Enhanced Transformer with Rotary Position Embedding", eq. 15), "linear" position
    interpolation, and Llama 3's frequency-dependent "llama3" scaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"model.rope_scaling.rope_type must be one of {tuple(ROPE_SCALING_KEYS)}; got {kind!r}")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
    if missing:
        raise ValueError(f"model.rope_scaling ({kind}) lacks {missing}")
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(positions: torch.Tensor, config: ModelConfig, dtype, inv_freq: torch.Tensor | None = None):
    """cos/sin [B, 1, N, head_dim/2] for ORIGINAL positions (the sorted layout reorders rows);
    inv_freq: rope_inv_freq's result when the caller keeps it (the KV cache does)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(config.head_dim, config.rope_base, config.rope_scaling, positions.device)
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
        self.w_down = SwiGLUDown(config.ffn_hidden, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def _heads(self, x, n_heads):
        return x.view(x.shape[0], x.shape[1], n_heads, self.config.head_dim).transpose(1, 2)

    def _mlp(self, x):
        return x + self.dropout(self.w_down(self.w_gate_up(self.mlp_norm(x))))

    def _attend_residual(self, x, o):
        """Attention output projection + residual, then the MLP sub-block."""
        return self._mlp(x + self.dropout(self.wo(o.transpose(1, 2).flatten(2))))

    def forward(self, h, g, groups, query_groups, rope_content, rope_query, last: bool):
        """h: content rows (keys and values of this layer); g: query rows or None. In the last
        layer the content rows' own outputs are never read, so only g is updated."""
        c = self.config
        normed_h = self.attn_norm(h)
        k, v = self._heads(self.wkv(normed_h), 2 * c.n_kv_heads).split(c.n_kv_heads, dim=1)
        k = apply_rope(k, *rope_content)
        q_content = None if last else apply_rope(self._heads(self.wq(normed_h), c.n_heads), *rope_content)
        if g is None:  # single stream with no query row in the batch (e.g. causal LM)
            o_content = kernels.group_attention(q_content, k, v, groups, groups, strict=False,
                                                backend=c.attention_backend, check_sorted=False)
            return self._attend_residual(h, o_content), None
        q_query = apply_rope(self._heads(self.wq(self.attn_norm(g)), c.n_heads), *rope_query)
        o_content, o_query = kernels.two_stream_attention(
            q_content, q_query, k, v, groups, query_groups, backend=c.attention_backend, check_sorted=False)
        g = self._attend_residual(g, o_query)
        if not last:
            h = self._attend_residual(h, o_content)
        return h, g

    def decode(self, x, step: DecodeStep, cache_k, cache_v, content_out: bool, weights):
        """One layer of incremental decoding (docs/design.md, key/value cache).

        x [B, step.n_new + nq, d]: the step's new content rows, then its query rows, as ONE batch
        of rows through the shared weights (read once per step, not once per stream). The content
        rows' keys/values are written into the cache BEFORE attending, so they see themselves and
        everything cached with a group <= theirs. Every row follows the content rule (a query
        row of group g comes as g - 1: it sees groups strictly below g), as step.row_groups say.
        Cached rows never change: a content row only sees groups <= its own, all of which were
        decoded before it. content_out=False: the content rows only give keys/values (the last
        layer, unless they predict in single-stream mode) and only the query rows are returned.
        weights: this block's (wq, wkv, wo, w_gate_up, w_down) as [in, out] matrices
        (BigLearner.decoding_weights). Inference only: no dropout. Attention goes through
        kernels.planned_attention (SDPA over the visible prefix) whatever model.attention_backend
        says: a step has a few rows per sample, for which the Triton kernel's tiles are mostly empty.
        """
        c = self.config
        n_new = step.n_new
        wq, wkv, wo, w_gate_up, w_down = weights
        normed = self.attn_norm(x)
        if n_new:
            k, v = self._heads(_rows_times(normed[:, :n_new], wkv), 2 * c.n_kv_heads).split(c.n_kv_heads, dim=1)
            cache_k.scatter_(2, step.write_index, step.rope(k, 0, n_new))
            cache_v.scatter_(2, step.write_index, v)
        first = 0 if content_out else n_new
        if first == x.shape[1]:
            return x[:, first:]
        x = x[:, first:]
        q = step.rope(self._heads(_rows_times(normed[:, first:], wq), c.n_heads), first, None)
        o = step.attention(q, cache_k, cache_v, first)
        x = x + _rows_times(o.transpose(1, 2), wo)
        gate, up = _rows_times(self.mlp_norm(x), w_gate_up).chunk(2, dim=-1)
        return x + _rows_times(F.silu(gate) * up, w_down)


def _rows_times(x, weight):
    """x [B, N, ...] (flattened after N) @ weight [in, out] as ONE GEMM over all B * N rows: a
    strided x made torch.matmul run a batched GEMM per sample."""
    return (x.reshape(-1, weight.shape[0]) @ weight).view(x.shape[0], x.shape[1], -1)


START_POSITION = -1  # RoPE position of the START row: one left of the window (windows start at 0)
NO_TARGET = -1  # decode_step target_positions entry of a content row that predicts nothing


class BigLearner(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.segment_embed = nn.Embedding(config.n_segment_types, config.d_model) if config.n_segment_types else None
        self.query_start = nn.Parameter(torch.zeros(config.d_model))  # query stream's g_0
        # streams=1: a predicting content row learns where its target is from offset =
        # pos(target) - pos(row), clamped to +-max_seq_len. Zero at initialisation, so an
        # imported causal LM (offset always +1) is reproduced exactly (docs/hf.md).
        self.offset_embed = nn.Embedding(2 * config.max_seq_len + 1, config.d_model) if config.streams == 1 else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = LMHead(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init)
        nn.init.normal_(self.query_start, std=config.init_std)
        if self.offset_embed is not None:
            nn.init.zeros_(self.offset_embed.weight)
        for block in self.blocks:  # GPT-2 style: scale residual projections by depth
            for proj in (block.wo, block.w_down):
                nn.init.normal_(proj.weight, std=config.init_std / math.sqrt(2 * config.n_layers))

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Refuse weights saved in the other attention mode, also when this model is loaded as a
        submodule (e.g. inside the DeepSpeed engine's wrapper): only single stream has offset_embed.
        A UserError, so that a resumed run or an inference command says it in one line."""
        saved = 1 if prefix + "offset_embed.weight" in state_dict else 2
        if saved != self.config.streams:
            raise UserError(f"checkpoint weights are for model.streams={saved} but the model has "
                            f"model.streams={self.config.streams}; set model.streams={saved}, or convert them: start a "
                            f"run from their export with model.init (docs/hf.md)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_batch(self, batch: TaskBatch) -> tuple[int, int]:
        """ValueError naming the field; one host sync for all checks. Returns (content rows to
        compute: the widest S u T without its last target group, query rows per sample)."""
        if batch.tokens.dim() != 2 or batch.groups.shape != batch.tokens.shape or batch.positions.shape != batch.tokens.shape:
            raise ValueError(f"batch.tokens, positions, groups must share shape [B, N]; got "
                             f"{tuple(batch.tokens.shape)}, {tuple(batch.positions.shape)}, {tuple(batch.groups.shape)}")
        if batch.target_index.shape != batch.target_groups.shape or batch.labels.shape != batch.target_groups.shape:
            raise ValueError("batch.target_index, target_groups, labels must share shape [B, Nt]")
        single = self.config.streams == 1
        if single and (batch.predictor is None or batch.predictor.shape != batch.target_groups.shape):
            raise ValueError("batch.predictor [B, Nt] is required with model.streams=1 (pretrain.collate.collate "
                             f"fills it); got {None if batch.predictor is None else tuple(batch.predictor.shape)}")
        false = batch.groups.new_zeros((), dtype=torch.bool)
        checks = [
            (batch.tokens < 0).any() | (batch.tokens >= self.config.vocab_size).any(),
            (batch.groups[:, 1:] < batch.groups[:, :-1]).any() if batch.groups.shape[1] > 1 else false,
            (batch.target_groups[:, 1:] < batch.target_groups[:, :-1]).any() if batch.target_groups.shape[1] > 1 else false,
            self._bad_predictors(batch) if single else false,
        ]
        counts = [(batch.groups < self._last_group(batch)[:, None]).sum(1).max(),
                  self._is_query(batch).sum(1).max() if single else torch.tensor(batch.target_groups.shape[1])]
        *problems, width, n_query = torch.stack([x.to(torch.int64) for x in checks + counts]).tolist()
        if problems[0]:
            raise ValueError(f"batch.tokens has ids outside [0, vocab_size={self.config.vocab_size}): "
                             "tokenizer and model vocabularies do not match")
        if problems[1]:
            raise ValueError("batch.groups must be non-decreasing along each row (sorted layout)")
        if problems[2]:
            raise ValueError("batch.target_groups must be non-decreasing along each row")
        if problems[3]:
            raise ValueError("batch.predictor must name, per target, QUERY_PREDICTOR, or START_PREDICTOR or a row of "
                             "the group just below the target's (one row per target): a layout single-stream rows "
                             "cannot express")
        return max(width, 1), n_query

    @staticmethod
    def _last_group(batch: TaskBatch) -> torch.Tensor:
        """[B] the last target group of each sample, whose content rows nobody reads."""
        return torch.where(batch.target_mask, batch.target_groups, 0).amax(1)

    @staticmethod
    def _is_query(batch: TaskBatch) -> torch.Tensor:
        return (batch.predictor == QUERY_PREDICTOR) & batch.target_mask

    @staticmethod
    def _bad_predictors(batch: TaskBatch) -> torch.Tensor:
        """Whether a target's predictor is not a query row, START or a row of the layout whose
        group is the one just below the target's (0 for the first group: START and S), so that it
        sees exactly what the target may see, or whether two targets share a predicting row (one
        row carries one target's offset term)."""
        p, width, target_groups = batch.predictor, batch.groups.shape[1], batch.target_groups
        by_row = (p >= START_PREDICTOR) & batch.target_mask
        row_group = torch.where(p == START_PREDICTOR, 0, batch.groups.gather(1, p.clamp(0, width - 1)))
        # Groups are sorted: the group below target k's is that of the target before its group's first.
        first = torch.searchsorted(target_groups.contiguous(), target_groups.contiguous())
        below = torch.where(first > 0, target_groups.gather(1, (first - 1).clamp(min=0)), 0)
        # Shared rows: equal neighbours once sorted; targets not read from a row get distinct negatives.
        readers = torch.where(by_row, p, -3 - torch.arange(p.shape[1], device=p.device)).sort(1).values
        shared = (readers[:, 1:] == readers[:, :-1]).any() if p.shape[1] > 1 else False
        return ((p < QUERY_PREDICTOR) | (p >= width) | (by_row & (row_group != below))).any() | shared

    def rows_computed(self, batch: TaskBatch) -> torch.Tensor:
        """[B] rows computed per sample in each layer but the last (content rows that someone
        reads, the START row, query rows): the cost model of docs/model.md."""
        content = (batch.groups < self._last_group(batch)[:, None]).sum(1)
        if self.config.streams == 1:
            return content + 1 + self._is_query(batch).sum(1)
        return content + batch.n_target

    def _offset_term(self, row_positions, target_positions) -> torch.Tensor:
        """The learned function of offset = pos(target) - pos(row) added to a predicting row's input."""
        bound = self.config.max_seq_len
        return self.offset_embed((target_positions - row_positions).clamp(-bound, bound) + bound)

    def _block(self, block, *args):
        if self.config.activation_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def predictor_states(self, batch: TaskBatch) -> torch.Tensor:
        """Final state [B, Nt, d_model] of each target's predictor row (padding targets included)."""
        width, n_query = self.check_batch(batch)
        c = self.config
        batch_size, n_targets = batch.target_index.shape
        # Content rows: S u T without the last target group (seen by no query row and no later row).
        tokens, positions = batch.tokens[:, :width], batch.positions[:, :width]
        groups = batch.groups[:, :width]
        groups = groups.masked_fill(groups >= self._last_group(batch)[:, None], kernels.INVALID_GROUP)
        h = self.embed(tokens)
        if self.segment_embed is not None and batch.segments is not None:
            h = h + self.segment_embed(batch.segments[:, :width])
        target_positions = batch.positions.gather(1, batch.target_index)
        if c.streams == 1:
            h, positions, groups, rows, is_query = self._single_stream_rows(batch, h, positions, groups, target_positions)
            slot = torch.argsort((~is_query).to(torch.int32), dim=1, stable=True)[:, :n_query]  # query rows, packed
            query_groups = torch.where(is_query.gather(1, slot), batch.target_groups.gather(1, slot),
                                       kernels.INVALID_GROUP)
            query_positions = target_positions.gather(1, slot)
        else:
            query_groups, query_positions = batch.target_groups, target_positions
        rope_content = rope_tables(positions, c, h.dtype)
        g = self.query_start.to(h.dtype).expand(batch_size, n_query, -1) if n_query else None
        rope_query = rope_tables(query_positions, c, h.dtype) if n_query else None
        for block in self.blocks[:-1]:
            h, g = self._block(block, h, g, groups, query_groups, rope_content, rope_query, False)
        # Last layer: every target's predictor row, under the strict rule at the target's group
        # (a content row of group g-1 sees exactly the groups below g).
        if c.streams == 1:
            readout = h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))
            readout_positions = torch.where(is_query, target_positions, positions.gather(1, rows))
            if n_query:
                dump = torch.where(is_query.gather(1, slot), slot, n_targets)  # unused query rows land past Nt
                from_query = h.new_zeros(batch_size, n_targets + 1, h.shape[-1]).scatter(
                    1, dump[..., None].expand(-1, -1, h.shape[-1]), g)[:, :n_targets]
                readout = torch.where(is_query[..., None], from_query, readout)
        else:
            readout, readout_positions = g, target_positions
        rope_readout = rope_tables(readout_positions, c, h.dtype)
        _, states = self._block(self.blocks[-1], h, readout, groups, batch.target_groups, rope_content,
                                rope_readout, True)
        return self.norm(states)

    def _single_stream_rows(self, batch, h, positions, groups, target_positions):
        """Prepend the START row and add the offset term to each predicting content row.
        Returns (h, positions, groups, rows [B, Nt] of each target's predictor in the new
        layout (0 for query-predicted targets), is_query [B, Nt])."""
        batch_size = h.shape[0]
        start = self.embed.weight[self.config.bos_id].to(h.dtype).expand(batch_size, 1, -1)
        h = torch.cat([start, h], 1)
        positions = torch.cat([positions.new_full((batch_size, 1), START_POSITION), positions], 1)
        groups = torch.cat([groups.new_zeros(batch_size, 1), groups], 1)
        is_query = self._is_query(batch)
        by_row = (batch.predictor >= START_PREDICTOR) & batch.target_mask
        rows = torch.where(by_row, batch.predictor - START_PREDICTOR, 0)  # START_PREDICTOR -> column 0
        term = self._offset_term(positions.gather(1, rows), target_positions) * by_row[..., None]
        # Each content row predicts at most one target, so adding per target is adding per row.
        h = h.scatter_add(1, rows[..., None].expand(-1, -1, h.shape[-1]), term.to(h.dtype))
        return h, positions, groups, rows, is_query

    def decoding_weights(self) -> tuple[list[tuple], torch.Tensor]:
        """Every decoding matmul's weight as [in, out]: per block (wq, wkv, wo, w_gate_up, w_down),
        and the head. A decoding step multiplies 1-64 rows by each weight, and on CPU GEMMs of so
        few rows against the [out, in] layout of nn.Linear ran 1.2-2.4x slower (docs/benchmarks.md,
        decoding), so CPU weights get contiguous copies (one more copy of the matmul weights in
        memory), kept until a parameter changes (its version counter or storage: a training step,
        a load, .to()); elsewhere the transposed views, as nn.Linear multiplies."""
        params = [p for b in self.blocks for p in (b.wq.weight, b.wkv.weight, b.wo.weight, b.w_gate_up.weight,
                                                     b.w_down.weight)] + [self.head.weight]
        # Inference tensors (a model built under torch.inference_mode) keep no version counter;
        # they cannot be changed outside inference mode either.
        key = [(p.data_ptr(), p.dtype, -1 if p.is_inference() else p._version) for p in params]
        saved = self.__dict__.get("_decoding_weights")
        if saved is None or saved[0] != key:
            with torch.no_grad():
                copies = [p.t().contiguous() if p.device.type == "cpu" else p.t() for p in params]
            saved = (key, [tuple(copies[i:i + 5]) for i in range(0, len(copies) - 1, 5)], copies[-1])
            self.__dict__["_decoding_weights"] = saved  # a plain attribute: not a parameter, not saved
        return saved[1], saved[2]

    def new_cache(self, batch_size: int, capacity: int, device=None, dtype=None) -> KVCache:
        """An empty KVCache for `capacity` content rows per sample (the START row included)."""
        c = self.config
        param = next(self.parameters())
        device, dtype = device or param.device, dtype or param.dtype
        shape = (batch_size, c.n_kv_heads, capacity, c.head_dim)
        return KVCache(keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks],
                       values=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks],
                       groups=torch.full((batch_size, capacity), kernels.INVALID_GROUP, device=device, dtype=torch.int32),
                       length=torch.zeros(batch_size, device=device, dtype=torch.long),
                       inv_freq=rope_inv_freq(c.head_dim, c.rope_base, c.rope_scaling, device))

    @torch.no_grad()
    def decode_step(self, cache: KVCache, tokens=None, positions=None, groups=None,
                    query_positions=None, query_groups=None, segments=None, target_positions=None,
                    check_groups: bool = True, weights=None):
        """Append content rows to `cache`, then predict from them or from query rows.

        tokens, positions, groups [B, m]: new content rows (groups INVALID for a sample's unused
        trailing rows; valid groups must not be below any group already cached). In
        single-stream mode the START row is written like any other: token bos_id at
        START_POSITION in group 0. target_positions [B, m] (streams=1 only): the position each
        new row predicts, or NO_TARGET; then the rows' logits [B, m, vocab] are returned (one row
        per step for a fixed order, as a GPT with a cache). Otherwise query_positions,
        query_groups [B, nq] are rows to predict (INVALID for unused ones) and their logits
        [B, nq, vocab] are returned, or None without query rows. Equals `forward` on the batch
        that holds the cached rows as S and earlier target groups, with m + nq rows of work.
        check_groups=False skips the check that the new groups keep the cache sorted (~4% of a
        step of a small model), for callers whose rows are sorted by construction (complete).
        weights: decoding_weights()'s result, fetched once by a caller that decodes many steps
        while the weights cannot change (complete; checking them costs ~0.1 ms a step); None:
        fetched here.
        """
        c = self.config
        readout = target_positions is not None
        has_queries = query_positions is not None and query_positions.shape[1] > 0
        if readout and c.streams != 1:
            raise ValueError(f"decode_step(target_positions=...) needs model.streams=1; this model has "
                             f"model.streams={c.streams}")
        if readout and (has_queries or tokens is None):
            raise ValueError("decode_step: target_positions predicts from new content rows; pass tokens and no "
                             "query_positions")
        rows, row_positions, row_groups = [], [], []
        n_new, write_index = 0, None
        if tokens is not None and tokens.shape[1] > 0:
            groups = groups.to(torch.int32)
            n_new = tokens.shape[1]
            write_index = cache.append(groups, check_sorted=check_groups)
            h = self.embed(tokens)
            if self.segment_embed is not None and segments is not None:
                # the START row has no segment in forward (it is no token of the window)
                h = h + self.segment_embed(segments) * (positions != START_POSITION)[..., None]
            if readout:
                h = h + self._offset_term(positions, target_positions) * (target_positions != NO_TARGET)[..., None]
            rows.append(h)
            row_positions.append(positions)
            row_groups.append(groups)
        if has_queries:
            rows.append(self.query_start.expand(query_positions.shape[0], query_positions.shape[1], -1))
            row_positions.append(query_positions)
            query_groups = query_groups.to(torch.int32)
            # strictly below g = at most g - 1, for integer groups (INVALID stays INVALID)
            row_groups.append(torch.where(query_groups == kernels.INVALID_GROUP, query_groups, query_groups - 1))
        if not rows:
            return None
        x = torch.cat(rows, 1) if len(rows) > 1 else rows[0]
        cos, sin = rope_tables(torch.cat(row_positions, 1), c, x.dtype, cache.inv_freq)
        if write_index is not None:
            write_index = write_index[:, None, :, None].expand(-1, c.n_kv_heads, -1, c.head_dim)
        step = DecodeStep(n_new, write_index, torch.cat(row_groups, 1), cache.groups, torch.cat([cos, cos], -1),
                          torch.cat([-sin, sin], -1))
        weights, head = self.decoding_weights() if weights is None else weights
        for i, block in enumerate(self.blocks):
            x = block.decode(x, step, cache.keys[i], cache.values[i], content_out=readout or i < len(self.blocks) - 1,
                             weights=weights[i])
        return _rows_times(self.norm(x), head) if x.shape[1] else None

    def forward(self, batch: TaskBatch) -> torch.Tensor:
        """Logits [B, Nt, vocab] for every target row (padding rows included)."""
        return self.head(self.predictor_states(batch))

    def loss(self, batch: TaskBatch):
        """The objective's weighted NLL, sum(target_weights * nll) / sum(loss_norm) (the mean NLL per
        target when the batch carries no weights), and the UNWEIGHTED NLL of every target row
        [B, Nt] (0 on padding rows)."""
        states = self.predictor_states(batch)
        mask = batch.target_mask
        labels = batch.labels[mask]  # only real targets reach the vocabulary projection
        weights = torch.ones_like(labels, dtype=torch.float32) if batch.target_weights is None else batch.target_weights[mask]
        norm = batch.n_target.sum() if batch.loss_norm is None else batch.loss_norm.sum()
        loss, nll = self.head(states[mask], labels, weights, norm)
        return loss, torch.zeros(mask.shape, dtype=nll.dtype, device=nll.device).masked_scatter(mask, nll)

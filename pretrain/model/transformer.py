"""BigLearner: one transformer p(x_T | x_S), two-stream (XLNet) or single-stream attention.

Reads top to bottom: embeddings -> blocks (content rows h, query rows g, shared weights)
-> the final state of each target's predictor row -> logits -> cross-entropy. Attention goes
only through biglearn_kernels, and training and decoding run the SAME blocks (Block.forward): a
pass is a BatchRows (a TaskBatch) or a DecodeStep (a few rows against the key/value cache),
pretrain.model.rows.

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
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from biglearn_kernels import INVALID_GROUP
from data_pipeline.errors import UserError

from ..layout import IGNORE_LABEL, QUERY_PREDICTOR, START_PREDICTOR, TaskBatch
from .config import ModelConfig
from .kv_cache import KVCache
from .ops import linear_cross_entropy, rms_norm, swiglu_down
from .rope import RotaryRows, rope_inv_freq
from .rows import BatchRows, DecodeStep


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class LMHead(nn.Linear):
    """The vocabulary projection. Called with labels it returns (loss, per-row NLL) through the
    chunked linear cross-entropy of pretrain/model/ops.py, which never holds the [N, vocab] logits;
    one module either way, so that ZeRO-3 gathers the weight on entry under `head.weight`."""

    def forward(self, states, labels=None, weights=None, norm=None):
        if labels is None:
            return super().forward(states)
        return linear_cross_entropy(states, self.weight, labels, weights, norm, IGNORE_LABEL)


class SwiGLUDown(nn.Linear):
    """The down projection applied to [gate | up] as silu(gate) * up @ W.T, with the product
    recomputed in backward instead of saved (pretrain/model/ops.py). A module, so that ZeRO-3 gathers
    its weight on entry like any Linear's, under the usual `w_down.weight` name."""

    def forward(self, gate_up):
        return swiglu_down(gate_up, self.weight)


class DecodingWeights(NamedTuple):
    """One block's matmul weights as contiguous [in, out] copies (BigLearner.decoding_weights)."""
    wq: torch.Tensor
    wkv: torch.Tensor
    wo: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor


def _rows_times(x, weight):
    """x [B, N, ...] (flattened after N) @ weight [in, out] as ONE GEMM over all B * N rows: a
    strided x made torch.matmul run a batched GEMM per sample."""
    return (x.reshape(-1, weight.shape[0]) @ weight).view(x.shape[0], x.shape[1], -1)


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

    def _dropout(self, x):
        return self.dropout(x) if self.training and self.config.dropout else x

    def forward(self, x, rows: BatchRows | DecodeStep, layer: int, content_out: bool = True):
        """One layer over the rows of a pass: x [B, n_content + n_query, d] holds the content
        rows, then the query rows, as ONE batch of rows through the shared weights. Keys and
        values come from the content rows (rows.keys_values: as they are, or written into the
        cache first); rows.attend says which keys each row sees. content_out=False: only the
        query rows come out (the content rows' outputs would feed nothing: the last layer).
        With rows.weights (decoding) the matmuls use those [in, out] copies: on CPU, GEMMs of a
        few rows against nn.Linear's [out, in] layout ran 1.2-2.4x slower (docs/benchmarks.md)."""
        c = self.config
        w = None if rows.weights is None else rows.weights[layer]
        n = rows.n_content
        normed = self.attn_norm(x)
        k = v = None
        if n:
            kv = self.wkv(normed[:, :n]) if w is None else _rows_times(normed[:, :n], w.wkv)
            k, v = self._heads(kv, 2 * c.n_kv_heads).split(c.n_kv_heads, dim=1)
            k = rows.rope(k, 0, n)
        k, v = rows.keys_values(layer, k, v)
        first = 0 if content_out else n
        if first == x.shape[1]:
            return x[:, first:]
        x, normed = x[:, first:], normed[:, first:]
        q = rows.query_rope(self._heads(self.wq(normed) if w is None else _rows_times(normed, w.wq), c.n_heads), first)
        o = rows.attend(q, k, v, first).transpose(1, 2).flatten(2)
        x = x + self._dropout(self.wo(o) if w is None else _rows_times(o, w.wo))
        normed = self.mlp_norm(x)
        if w is None:  # SwiGLUDown: the product recomputed in backward instead of saved
            return x + self._dropout(self.w_down(self.w_gate_up(normed)))
        gate, up = _rows_times(normed, w.w_gate_up).chunk(2, dim=-1)
        return x + self._dropout(_rows_times(F.silu(gate) * up, w.w_down))


START_POSITION = -1  # RoPE position of the START row: one left of the window (windows start at 0)
# streams=1: every predictor row's QUERIES are rotated at pos(target) - PREDICTOR_SHIFT, where a
# causal LM's predictor of that target sits; a content row's keys stay at its own position. Two
# streams learned the query pathway better than a single stream whose rows attended from
# wherever they stood (docs/model.md, "Single stream": measured on 13 chains).
PREDICTOR_SHIFT = 1
NO_TARGET = -1  # decode_step target_positions entry of a content row that predicts nothing


class BigLearner(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.require_memory()  # a UserError stating the estimate, before a config from a file allocates 1e12 floats
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
            raise ValueError("batch.predictor [B, Nt] is required with model.streams=1 (pretrain.layout.collate "
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

    def _content_rows(self, tokens, positions, segments=None, target_positions=None) -> torch.Tensor:
        """Inputs of content rows: token embeddings, plus segment embeddings (not for the START
        row: it is no token of the window), plus for a row that predicts the offset term, a
        learned function of offset = pos(target) - pos(row) (target_positions: NO_TARGET for a
        row that predicts nothing; streams=1 only)."""
        h = self.embed(tokens)
        if self.segment_embed is not None and segments is not None:
            h = h + self.segment_embed(segments) * (positions != START_POSITION)[..., None]
        if target_positions is not None:
            bound = self.config.max_seq_len
            offset = (target_positions - positions).clamp(-bound, bound) + bound
            h = h + self.offset_embed(offset) * (target_positions != NO_TARGET)[..., None]
        return h

    def _query_rows(self, batch_size: int, n_query: int, dtype) -> torch.Tensor:
        return self.query_start.to(dtype).expand(batch_size, n_query, -1)

    def _rope(self, positions, dtype) -> RotaryRows:
        c = self.config
        return RotaryRows(positions, rope_inv_freq(c.head_dim, c.rope_base, c.rope_scaling, positions.device), dtype)

    def _block(self, block, *args):
        if self.config.activation_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def predictor_states(self, batch: TaskBatch) -> torch.Tensor:
        """Final state [B, Nt, d_model] of each target's predictor row (padding targets included)."""
        width, n_query = self.check_batch(batch)
        c = self.config
        batch_size = batch.tokens.shape[0]
        # Content rows: S u T without the last target group (seen by no query row and no later row).
        tokens, positions = batch.tokens[:, :width], batch.positions[:, :width]
        groups = batch.groups[:, :width]
        groups = groups.masked_fill(groups >= self._last_group(batch)[:, None], INVALID_GROUP)
        segments = None if batch.segments is None else batch.segments[:, :width]
        target_positions = batch.positions.gather(1, batch.target_index)
        if c.streams == 1:
            is_query = self._is_query(batch)
            tokens, positions, groups, segments, predictor, row_targets = self._single_stream_rows(
                batch, is_query, tokens, positions, groups, segments, target_positions)
            slot = torch.argsort((~is_query).to(torch.int32), dim=1, stable=True)[:, :n_query]  # query rows, packed
            query_groups = torch.where(is_query.gather(1, slot), batch.target_groups.gather(1, slot), INVALID_GROUP)
            query_positions = target_positions.gather(1, slot) - PREDICTOR_SHIFT
            attend_positions = torch.where(row_targets != NO_TARGET, row_targets - PREDICTOR_SHIFT, positions)
        else:
            row_targets, query_groups, query_positions = None, batch.target_groups, target_positions
            attend_positions = positions
        x = self._content_rows(tokens, positions, segments, row_targets)
        if n_query:
            x = torch.cat([x, self._query_rows(batch_size, n_query, x.dtype)], dim=1)
        query_rope = self._rope(torch.cat([attend_positions, query_positions], 1) if n_query else attend_positions,
                                x.dtype)
        key_rope = query_rope if c.streams == 2 else self._rope(positions, x.dtype)
        rows = BatchRows(groups, query_groups if n_query else None, key_rope, c.attention_backend, query_rope)
        for i, block in enumerate(self.blocks[:-1]):
            x = self._block(block, x, rows, i, True)
        if c.streams == 1:
            # Last layer: every target's predictor row, under the strict rule at the target's group
            # (a content row of group g-1 sees exactly the groups below g), attending from one left
            # of its target whichever row it is.
            n = groups.shape[1]
            h, readout = x[:, :n], x.gather(1, predictor[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([h, readout], dim=1)
            rows = BatchRows(groups, batch.target_groups, key_rope, c.attention_backend,
                             self._rope(torch.cat([attend_positions, target_positions - PREDICTOR_SHIFT], 1), x.dtype))
        x = self._block(self.blocks[-1], x, rows, len(self.blocks) - 1, False)
        if not n_query and torch.is_grad_enabled():
            # No query row in this batch (single stream, e.g. causal orders): query_start still gets
            # a (zero) gradient, so that every rank of a data-parallel step reduces the same
            # parameters; a rank without one sent a gradient bucket of another size (gloo aborted).
            x = x + 0 * self.query_start.to(x.dtype)
        return self.norm(x)

    def _single_stream_rows(self, batch, is_query, tokens, positions, groups, segments, target_positions):
        """The content rows with the START row first (the BOS token at START_POSITION, group 0),
        and per target its predictor among the pass's rows: a content row (START is row 0) or
        its query row, which follow the content rows packed in target order. Returns (tokens,
        positions, groups, segments, predictor [B, Nt] row index, row_targets [B, rows]: the
        position each content row predicts, or NO_TARGET)."""
        batch_size, width = tokens.shape
        start = lambda x, value: torch.cat([x.new_full((batch_size, 1), value), x], 1)  # noqa: E731
        tokens, positions, groups = start(tokens, self.config.bos_id), start(positions, START_POSITION), start(groups, 0)
        segments = None if segments is None else start(segments, 0)
        by_row = (batch.predictor >= START_PREDICTOR) & batch.target_mask
        row = batch.predictor - START_PREDICTOR  # START_PREDICTOR -> row 0
        # Each content row predicts at most one target: scatter target positions onto the rows
        # (targets that no row predicts go to a spare column past the rows, dropped).
        row_targets = torch.full((batch_size, width + 2), NO_TARGET, dtype=positions.dtype, device=positions.device)
        row_targets = row_targets.scatter(1, torch.where(by_row, row, width + 1), target_positions)[:, :width + 1]
        query_rank = torch.cumsum(is_query.to(torch.int64), 1) - 1  # slot of each query target
        predictor = torch.where(is_query, width + 1 + query_rank, torch.where(by_row, row, 0))
        return tokens, positions, groups, segments, predictor, row_targets

    def decoding_weights(self) -> tuple[list[DecodingWeights], torch.Tensor]:
        """Every decoding matmul's weight as [in, out]: per block a DecodingWeights, and the head.
        A decoding step multiplies 1-64 rows by each weight, and on CPU GEMMs of so few rows
        against the [out, in] layout of nn.Linear ran 1.2-2.4x slower (docs/benchmarks.md,
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
            saved = (key, [DecodingWeights(*copies[i:i + 5]) for i in range(0, len(copies) - 1, 5)], copies[-1])
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
                       groups=torch.full((batch_size, capacity), INVALID_GROUP, device=device, dtype=torch.int32),
                       length=torch.zeros(batch_size, device=device, dtype=torch.long),
                       inv_freq=rope_inv_freq(c.head_dim, c.rope_base, c.rope_scaling, device))

    @torch.no_grad()
    def decode_step(self, cache: KVCache, tokens=None, positions=None, groups=None,
                    query_positions=None, query_groups=None, segments=None, target_positions=None,
                    check_groups: bool = True, weights=None, head: bool = True):
        """Append content rows to `cache`, then predict from them or from query rows.

        tokens, positions, groups [B, m]: new content rows (groups INVALID for a sample's unused
        trailing rows; valid groups must not be below any group already cached). In
        single-stream mode the START row is written like any other: token bos_id at
        START_POSITION in group 0. query_positions, query_groups [B, nq]: query rows to predict
        (INVALID for unused ones); their logits [B, nq, vocab] are returned, or None without
        query rows. target_positions [B, m] (streams=1 only): the position each new row
        predicts, or NO_TARGET; then the new rows' logits come first, [B, m + nq, vocab] (one row
        per step for a fixed order, as a GPT with a cache; speculative decoding reads drafted
        tokens' rows and drafts from query rows in one step). Equals `forward` on the batch
        that holds the cached rows as S and earlier target groups, with m + nq rows of work:
        the same blocks run (Block.forward over a DecodeStep).
        check_groups=False skips the check that the new groups keep the cache sorted (~4% of a
        step of a small model), for callers whose rows are sorted by construction (complete).
        weights: decoding_weights()'s result, fetched once by a caller that decodes many steps
        while the weights cannot change (complete; checking them costs ~0.1 ms a step); None:
        fetched here. head=False returns the rows' final (normalised) states instead of logits,
        for a caller that projects only some of them onto the vocabulary.
        """
        c = self.config
        readout = target_positions is not None
        has_queries = query_positions is not None and query_positions.shape[1] > 0
        if readout and c.streams != 1:
            raise ValueError(f"decode_step(target_positions=...) needs model.streams=1; this model has "
                             f"model.streams={c.streams}")
        if readout and tokens is None:
            raise ValueError("decode_step: target_positions predicts from new content rows; pass tokens")
        rows, row_positions, attend_positions, row_groups = [], [], [], []
        n_new, write_index = 0, None
        if tokens is not None and tokens.shape[1] > 0:
            groups = groups.to(torch.int32)
            n_new = tokens.shape[1]
            write_index = cache.append(groups, check_sorted=check_groups)
            write_index = write_index[:, None, :, None].expand(-1, c.n_kv_heads, -1, c.head_dim)
            rows.append(self._content_rows(tokens, positions, segments, target_positions))
            row_positions.append(positions)
            attend_positions.append(positions if not readout else
                                    torch.where(target_positions != NO_TARGET, target_positions - PREDICTOR_SHIFT,
                                                positions))
            row_groups.append(groups)
        if has_queries:
            rows.append(self._query_rows(query_positions.shape[0], query_positions.shape[1], self.query_start.dtype))
            attend_positions.append(query_positions - PREDICTOR_SHIFT if c.streams == 1 else query_positions)
            query_groups = query_groups.to(torch.int32)
            # strictly below g = at most g - 1, for integer groups (INVALID stays INVALID)
            row_groups.append(torch.where(query_groups == INVALID_GROUP, query_groups, query_groups - 1))
        if not rows:
            return None
        x = torch.cat(rows, 1) if len(rows) > 1 else rows[0]
        weights, head_weight = self.decoding_weights() if weights is None else weights
        query_rope = RotaryRows(torch.cat(attend_positions, 1), cache.inv_freq, x.dtype)
        key_rope = RotaryRows(row_positions[0], cache.inv_freq, x.dtype) if c.streams == 1 and n_new else query_rope
        step = DecodeStep(n_new, write_index, torch.cat(row_groups, 1), cache, key_rope, weights, query_rope)
        for i, block in enumerate(self.blocks):
            x = block(x, step, i, readout or i < len(self.blocks) - 1)
        if not x.shape[1]:
            return None
        return _rows_times(self.norm(x), head_weight) if head else self.norm(x)

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

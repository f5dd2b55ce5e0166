"""ModelConfig: the architecture and the stream mode of a BigLearner (docs/model.md).

The model owns its configuration: every key is declared here once and checked when the config
is made, with one-line UserErrors that name the key (`model.<key>`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from data_pipeline.errors import UserError

from biglearn_kernels import BACKENDS

from .rope import rope_inv_freq


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
    # 1: single stream, query rows only where needed (causal-LM cost; as good as two streams since
    # issue 26, docs/benchmarks.md); 2: two-stream attention (XLNet), a query row per target
    streams: int = 1
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
                raise UserError(f"model.{key} must be a positive integer; got {value!r}")
        if self.d_model % self.n_heads:
            raise UserError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise UserError(f"model head dim {self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.dropout must be in [0, 1); got {self.dropout!r}")
        if isinstance(self.streams, bool) or not isinstance(self.streams, int) or self.streams not in (1, 2):
            raise UserError(f"model.streams must be 1 or 2; got {self.streams!r}")
        if not isinstance(self.bos_id, int) or not 0 <= self.bos_id < self.vocab_size:
            raise UserError(f"model.bos_id must be a token id in [0, vocab_size={self.vocab_size}); got {self.bos_id!r}")
        if self.rope_scaling:
            rope_inv_freq(self.head_dim, self.rope_base, self.rope_scaling)  # UserError naming the missing key
        if self.attention_backend not in BACKENDS:
            raise UserError(f"model.attention_backend must be one of {BACKENDS}; got {self.attention_backend!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)



"""ModelConfig: the architecture and the stream mode of a BigLearner (docs/model.md).

The model owns its configuration: every key is declared here once and checked when the config
is made, with one-line UserErrors that name the key (`model.<key>`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from data_pipeline.errors import UserError
from data_pipeline.resources import require_memory

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
        if self.ffn_hidden is None and isinstance(self.d_model, int):
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
        # Every key's type first: a config also comes from files (an export's model_config.json, a
        # Hugging Face config.json), which no schema checked.
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{key} must be a positive integer; got {value!r}")
        for key in ("rope_base", "dropout", "norm_eps", "init_std"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"model.{key} must be a finite number; got {value!r}")
        for key in ("tie_embeddings", "activation_checkpointing"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"model.{key} must be true or false; got {getattr(self, key)!r}")
        for key in ("attention_backend", "init"):
            if not isinstance(getattr(self, key), str):
                raise UserError(f"model.{key} must be a string; got {getattr(self, key)!r}")
        if isinstance(self.n_segment_types, bool) or not isinstance(self.n_segment_types, int) or self.n_segment_types < 0:
            raise UserError(f"model.n_segment_types must be an integer >= 0; got {self.n_segment_types!r}")
        if not isinstance(self.rope_scaling, dict):
            raise UserError(f"model.rope_scaling must be a mapping (rope_type, factor, ...); got {self.rope_scaling!r}")
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
        if not self.rope_base > 0 or not self.norm_eps > 0:
            raise UserError(f"model.rope_base and model.norm_eps must be > 0; got {self.rope_base!r}, {self.norm_eps!r}")
        if self.rope_scaling:
            try:
                rope_inv_freq(self.head_dim, self.rope_base, self.rope_scaling)  # UserError naming the missing key
            except (TypeError, ValueError) as err:
                if isinstance(err, UserError):
                    raise
                raise UserError(f"model.rope_scaling has a value of the wrong kind ({err}); got "
                                f"{self.rope_scaling!r}") from None
        if self.attention_backend not in BACKENDS:
            raise UserError(f"model.attention_backend must be one of {BACKENDS}; got {self.attention_backend!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def parameter_count(self) -> int:
        """Parameters of BigLearner(self), counted from the config (the model is never built to
        count them; tests check it against a built model): embeddings, per block two norms, the
        attention projections (q, fused k/v, out) and the SwiGLU (fused gate/up, down), the final
        norm, the head unless tied, and the single-stream offset table."""
        d, hd = self.d_model, self.head_dim
        block = 2 * d + d * self.n_heads * hd + d * 2 * self.n_kv_heads * hd + self.n_heads * hd * d \
            + d * 2 * self.ffn_hidden + self.ffn_hidden * d
        count = self.vocab_size * d + self.n_segment_types * d + d + self.n_layers * block + d
        if not self.tie_embeddings:
            count += d * self.vocab_size
        if self.streams == 1:
            count += (2 * self.max_seq_len + 1) * d
        return count

    def size_keys(self) -> str:
        """The keys that set the model's size, for messages."""
        return (f"vocab_size={self.vocab_size}, d_model={self.d_model}, n_layers={self.n_layers}, "
                f"ffn_hidden={self.ffn_hidden}" + (f", max_seq_len={self.max_seq_len}" if self.streams == 1 else ""))

    def require_memory(self, where: str = "model", bytes_per_parameter: int = 4, available: int | None = None,
                       device: str = "memory") -> None:
        """UserError, before anything is allocated, when the model's parameters (times
        bytes_per_parameter: 4 for fp32 weights, more for training state) do not fit in the
        available memory; the message states the estimate and the keys that set it."""
        count = self.parameter_count()
        require_memory(count * bytes_per_parameter,
                       f"{where}: a model of {count / 1e6:,.1f}M parameters ({self.size_keys()})", available, device)

    def inference_bytes(self, rows: int, length: int, targets: int | None = None) -> int:
        """Memory one forward pass over `rows` samples of `length` positions needs besides the
        weights (a lower bound, fp32): each layer's keys/values kept for the rows (the decoding
        cache), the widest activations of one layer (hidden states, q/k/v, the SwiGLU's hidden
        layer) and the logits of `targets` rows per sample (default: every position)."""
        targets = length if targets is None else targets
        kv = self.n_layers * 2 * self.n_kv_heads * self.head_dim
        layer = 4 * self.d_model + 2 * self.n_kv_heads * self.head_dim + 3 * self.ffn_hidden
        return 4 * rows * (length * (kv + layer) + targets * self.vocab_size)

    def to_dict(self) -> dict:
        return asdict(self)



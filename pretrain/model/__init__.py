"""BigLearner, the model: tensors in, logits / per-target NLL out (docs/model.md).

    config       ModelConfig: architecture and stream mode, checked when made
    rope         rotary embeddings at original positions
    ops          RMSNorm, SwiGLU and the chunked linear cross-entropy as memory-lean autograd functions
    transformer  the blocks and BigLearner: one forward path, with an optional key/value cache
    kv_cache     the cache of content rows' keys/values for incremental decoding
    weights      the one weights loader (model_from_weights)
"""
from .config import ModelConfig
from .kv_cache import KVCache
from .transformer import NO_TARGET, START_POSITION, BigLearner
from .weights import model_from_weights

__all__ = ["BigLearner", "KVCache", "ModelConfig", "NO_TARGET", "START_POSITION", "model_from_weights"]

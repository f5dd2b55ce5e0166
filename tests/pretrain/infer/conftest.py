import numpy as np
import pytest
import torch

from pretrain.model import BigLearner, ModelConfig

VOCAB = 29


@pytest.fixture
def tiny_model():
    """A fresh random small model (GQA, 3 layers) in double precision, eval mode; overrides are ModelConfig fields."""
    def make(**overrides):
        torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
        config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                             attention_backend="torch", max_seq_len=64, **overrides)
        return BigLearner(config).double().eval()
    return make

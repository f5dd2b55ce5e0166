"""Schemas of the BigLearn-VAE experiment (torch-free; configs/vae_digits.yaml fills them).

`model` sizes BOTH compared models: the universal BigLearn-VAE stacks `n_layers` blocks; the
jointly trained VAE splits the same number of blocks into an encoder of `encoder_layers` and a
decoder of the rest, so both have exactly the same number of parameters ("Big Learning
Variational Auto-Encoders", Appendix A: the universal model is deepened to match).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from data_pipeline.errors import require

from ...objectives import BigLearnConfig


@dataclass
class VAEConfig:
    z_dim: int = 16
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 4  # universal model depth = jointly trained VAE encoder + decoder depth
    encoder_layers: int = 2  # the jointly trained VAE's encoder; its decoder gets n_layers - encoder_layers
    ffn_hidden: int | None = None  # None: the SwiGLU default of pretrain.model.ModelConfig
    dropout: float = 0.0
    # p(x_T | z, x_S) = N(mean, decoder_std^2 I). The paper's N(mu(z), I) on [0, 1] pixels makes a
    # perfect reconstruction worth ~2 nats per 8x8 image: the universal model then left z unused
    # (KL 0.01 nats, docs/capabilities.md); 0.1 makes z worth using for both models.
    decoder_std: float = 0.1
    learn_decoder_std: bool = False  # one learned variance for every pixel, starting at decoder_std
    attention_backend: str = "auto"

    def __post_init__(self):
        for key in ("z_dim", "d_model", "n_heads", "n_layers", "encoder_layers"):
            value = getattr(self, key)
            require(not isinstance(value, bool) and isinstance(value, int) and value >= 1, f"model.{key}",
                    "must be a positive integer", value)
        require(self.encoder_layers < self.n_layers, "model.encoder_layers",
                f"must be below model.n_layers={self.n_layers} (the jointly trained VAE's decoder needs at least "
                "one block)", self.encoder_layers)
        require(math.isfinite(self.decoder_std) and self.decoder_std > 0, "model.decoder_std",
                "must be a positive number", self.decoder_std)


@dataclass
class VAEDataConfig:
    path: str | None = None  # None: scikit-learn's 8x8 digits; else an .npz (pretrain.vae.patches.load_npz)
    patch_size: int = 2
    test_fraction: float = 0.3  # digits only: the fixed stratified split
    split_seed: int = 0

    def __post_init__(self):
        require(self.patch_size >= 1, "data.patch_size", "must be >= 1", self.patch_size)
        require(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)", self.test_fraction)


def check_ratio_betas(objective: BigLearnConfig) -> None:
    """UserError naming the first S- or T-ratio Beta parameter that is not a positive number (the
    experiments on patch tokens, which draw their splits from these alone)."""
    for key in ("alpha", "beta"):
        for side in ("source", "target"):
            value = getattr(objective, f"{side}_{key}")
            require(math.isfinite(value) and value > 0, f"objective.{side}_{key}", "must be a positive number", value)


@dataclass
class VAETrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    kl_weight: float = 0.01  # beta of eqs. (1), (6), (7); 0.01 as in Appendix A
    kl_warmup_steps: int = 0  # beta rises linearly from 0 over these steps (KL annealing, Bowman et al.)
    # > 0: train each model for this much process CPU time (steps becomes an upper bound; the warm-up
    # and cosine decay are sized to the steps the pace measured after 10 steps fits in), so both
    # compared models get equal CPU time rather than equal steps.
    cpu_minutes: float = 0.0
    seed: int = 0


@dataclass
class VAEEvalConfig:
    probe_ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4, 0.6, 0.8, 1.0])
    probe_draws: int = 4  # random x_S draws per TRAINING image for the probe's training codes
    elbo_samples: int = 4  # z draws per test image for the test JointELBO
    curve_points: int = 10  # test JointELBO (one z draw per image) this many times during training: the learning curves
    batch_size: int = 256


@dataclass
class VAEExperiment:
    model: VAEConfig = field(default_factory=VAEConfig)
    objective: BigLearnConfig = field(default_factory=BigLearnConfig)  # S- and T-ratio Betas (Algorithm 1)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    eval: VAEEvalConfig = field(default_factory=VAEEvalConfig)

    def __post_init__(self):
        """UserError naming the first bad key (<section>.<key>)."""
        t, e = self.train, self.eval
        check_ratio_betas(self.objective)
        for key in ("steps", "batch_size"):
            require(getattr(t, key) >= 1, f"train.{key}", "must be >= 1", getattr(t, key))
        for key in ("warmup_steps", "kl_warmup_steps", "weight_decay", "kl_weight", "cpu_minutes"):
            value = getattr(t, key)
            require(math.isfinite(value) and value >= 0, f"train.{key}", "must be a number >= 0", value)
        require(math.isfinite(t.lr) and t.lr > 0, "train.lr", "must be a positive number", t.lr)
        require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]", t.min_lr_ratio)
        for key in ("beta1", "beta2"):
            require(0 <= getattr(t, key) < 1, f"train.{key}", "must be in [0, 1)", getattr(t, key))
        require(bool(e.probe_ratios) and all(0 < r <= 1 for r in e.probe_ratios), "eval.probe_ratios",
                "must be ratios in (0, 1]", list(e.probe_ratios))
        for key in ("probe_draws", "elbo_samples", "batch_size", "curve_points"):
            require(getattr(e, key) >= 1, f"eval.{key}", "must be >= 1", getattr(e, key))

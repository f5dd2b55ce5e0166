"""Schemas of the BigLearn-GAN experiment (torch-free; configs/gan_digits.yaml fills them).

`model` sizes BOTH compared models: the BigLearn-GAN and the joint GAN are the same generator and
discriminator classes with the same sizes (so exactly the same parameter count); the joint GAN
only ever trains on S = {} and T = all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from data_pipeline.errors import require

from ...objectives import BigLearnConfig
from ..vae.config import VAEDataConfig, check_ratio_betas  # the same patch tokens of the same data as the BigLearn-VAE

ARMS = ("gan", "biglearn_gan")  # the joint GAN (S always empty) and the universal BigLearn-GAN


@dataclass
class GANObjectiveConfig(BigLearnConfig):
    """q(S, T) of the BigLearn-GAN and the weight of the App. D.2 "communication" term.

    Per sample: with probability joint_fraction the joint task (S = {}, T = all), otherwise the
    text model's sampler with the inherited Betas (S-ratio, then T-ratio of the rest). Eq. (8)
    holds for any q(S, T); the paper's (App. D.3) is joint_fraction 0 with Beta(0.5, 3), Beta(3, 0.5).
    communication_weight > 0 adds eq. (12) (objective.communication_loss), weighted, to both
    players' losses: each sample's (S, T) against ({}, S u T), the joint generation of the same patches.
    """
    joint_fraction: float = 0.0
    communication_weight: float = 0.0


@dataclass
class GANConfig:
    d_model: int = 64
    n_heads: int = 4
    generator_layers: int = 3
    discriminator_layers: int = 3
    z_dim: int = 32  # one noise vector per image, mapped to patch-wise noise embeddings (App. D.1)
    ffn_hidden: int | None = None  # None: the SwiGLU default of pretrain.model.ModelConfig
    attention_backend: str = "auto"
    # Std of both networks' weights (pretrain.model's rule: N(0, std) linears and embeddings, residual
    # projections scaled by depth). null: d_model ** -0.5, the fan-in (variance-preserving) scale.
    # pretrain.model's 0.02 is GPT-2's, about the fan-in scale at d_model 768 but 6x below it at 64:
    # there the discriminator sat at chance against chimeras for 600 steps (docs/capabilities.md).
    init_std: float | None = None

    def __post_init__(self):
        for key in ("d_model", "n_heads", "generator_layers", "discriminator_layers", "z_dim"):
            value = getattr(self, key)
            require(not isinstance(value, bool) and isinstance(value, int) and value >= 1, f"model.{key}",
                    "must be a positive integer", value)
        require(self.init_std is None or (not isinstance(self.init_std, bool) and isinstance(self.init_std, (int, float))
                                          and math.isfinite(self.init_std) and self.init_std > 0), "model.init_std",
                "must be a positive number or null (d_model ** -0.5)", self.init_std)

    def weight_std(self) -> float:
        """The std both networks are initialised with: init_std, or d_model ** -0.5 where it is null."""
        return self.d_model ** -0.5 if self.init_std is None else self.init_std


@dataclass
class GANTrainConfig:
    steps: int = 3000  # alternating (discriminator, generator) updates, the same for both arms
    batch_size: int = 64
    generator_lr: float = 5e-4  # constant (App. D.3)
    discriminator_lr: float = 5e-4
    beta1: float = 0.0
    beta2: float = 0.99
    weight_decay: float = 0.0  # AdamW's decoupled decay
    r1_weight: float = 10.0  # gamma of the R1 penalty (gamma / 2) ||grad_{x_T} f(x; S, T)||^2 on real data
    r1_every: int = 4  # lazy R1: every k-th discriminator step, weighted k (StyleGAN2, sec. 3.1); 1 = every step
    # The generator evaluated and returned is an exponential moving average of the trained one's
    # weights (as "Progressive Growing of GANs", Karras et al., 2018, and StyleGAN); 0: the last weights.
    ema_decay: float = 0.99
    seed: int = 0
    eval_every: int = 250  # steps between points of the learning curves (Frechet distance of joint samples)


@dataclass
class GANEvalConfig:
    completion_ratios: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    joint_samples: int = 2000  # generated images per model for the Frechet distance and class coverage
    curve_samples: int = 540  # generated images per point of the learning curves
    completion_images: int = 540  # test images completed at each S-ratio (class consistency); capped at the test set
    diversity_images: int = 100  # test images whose x_S is completed `diversity_draws` times each
    diversity_draws: int = 8
    classifier_hidden: int = 128  # width of the digits classifier's hidden layer: the Frechet features
    batch_size: int = 256


@dataclass
class GANExperiment:
    model: GANConfig = field(default_factory=GANConfig)
    objective: GANObjectiveConfig = field(default_factory=GANObjectiveConfig)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    train: GANTrainConfig = field(default_factory=GANTrainConfig)
    eval: GANEvalConfig = field(default_factory=GANEvalConfig)

    def __post_init__(self):
        """UserError naming the first bad key (<section>.<key>)."""
        t, e = self.train, self.eval
        o = self.objective
        check_ratio_betas(o)
        require(0 <= o.joint_fraction <= 1, "objective.joint_fraction", "must be a probability in [0, 1]",
                o.joint_fraction)
        require(math.isfinite(o.communication_weight) and o.communication_weight >= 0, "objective.communication_weight",
                "must be a number >= 0", o.communication_weight)
        for key in ("steps", "batch_size", "eval_every", "r1_every"):
            require(getattr(t, key) >= 1, f"train.{key}", "must be >= 1", getattr(t, key))
        for key in ("generator_lr", "discriminator_lr"):
            require(math.isfinite(getattr(t, key)) and getattr(t, key) > 0, f"train.{key}", "must be a positive number",
                    getattr(t, key))
        for key in ("weight_decay", "r1_weight"):
            require(math.isfinite(getattr(t, key)) and getattr(t, key) >= 0, f"train.{key}", "must be a number >= 0",
                    getattr(t, key))
        for key in ("beta1", "beta2", "ema_decay"):
            require(0 <= getattr(t, key) < 1, f"train.{key}", "must be in [0, 1)", getattr(t, key))
        require(bool(e.completion_ratios) and all(0 <= r <= 1 for r in e.completion_ratios), "eval.completion_ratios",
                "must be S-ratios in [0, 1]", list(e.completion_ratios))
        for key in ("joint_samples", "curve_samples", "completion_images", "classifier_hidden", "batch_size"):
            require(getattr(e, key) >= 1, f"eval.{key}", "must be >= 1", getattr(e, key))
        require(e.diversity_draws >= 2, "eval.diversity_draws", "must be >= 2 (a pairwise distance)", e.diversity_draws)
        require(e.diversity_images >= 1, "eval.diversity_images", "must be >= 1", e.diversity_images)

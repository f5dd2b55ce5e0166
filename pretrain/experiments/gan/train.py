"""Alternating training of a generator and a discriminator (Algorithm 1 of "Big Cooperative
Learning", App. D.3), and sampling from a trained generator.

Each step draws a batch of training images and one (S, T) per image (the BigLearn-GAN: the joint
task with probability objective.joint_fraction, else the text model's sampler; the joint GAN:
S = {}, T = all), then
    1. one discriminator update on -(8) + R1 (objective.discriminator_loss), fakes from a fresh z;
    2. one generator update on the non-saturating (8) (objective.generator_loss), another fresh z,
       the same (S, T) and x_S.
With objective.communication_weight > 0 (BigLearn-GAN only) both updates add that weight times
eq. (12) between each (S, T) and ({}, S u T), on joint samples of S u T from one more fresh z.
AdamW with constant learning rates for both; what is evaluated and returned is the moving average
of the generator's weights (train.ema_decay). The same seed gives both arms the same initial weights,
the same image batches (their own random stream, apart from the splits') and the same noise, so
they differ only in their (S, T).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..vae.objective import biglearn_specs, joint_specs
from . import objective
from .config import GANExperiment
from .model import Discriminator, Generator


@dataclass
class TrainingCurve:
    """Per evaluation point: step, process CPU seconds of training so far, the window's mean losses
    and whatever `evaluate(generator)` returned (e.g. the Frechet distance of joint samples)."""
    points: list[dict] = field(default_factory=list)


def splits(arm: str, n_patches: int, batch_size: int, rng: np.random.Generator, experiment: GANExperiment):
    specs = joint_specs(n_patches, batch_size)
    if arm == "biglearn_gan":  # per sample: the joint task with probability joint_fraction, else a drawn one
        o = experiment.objective
        drawn = biglearn_specs(n_patches, batch_size, rng, o)
        specs = [joint if u < o.joint_fraction else d for joint, d, u in zip(specs, drawn, rng.random(batch_size))]
    return objective.TaskSplit.of(specs, n_patches)


def fit(arm: str, train_x: torch.Tensor, experiment: GANExperiment,
        evaluate: Callable[[Generator], dict] | None = None, progress: bool = True):
    """(generator, discriminator, TrainingCurve) of `arm` ("gan" or "biglearn_gan") trained on
    patches train_x [N, L, D] in [0, 1]; `evaluate` runs every train.eval_every steps and at the end."""
    t, m = experiment.train, experiment.model
    torch.manual_seed(t.seed)
    image_rng, split_rng = (np.random.default_rng([t.seed, stream]) for stream in (0, 1))
    communication = experiment.objective.communication_weight if arm == "biglearn_gan" else 0.0
    n_images, n_patches, patch_dim = train_x.shape
    generator, discriminator = Generator(m, n_patches, patch_dim), Discriminator(m, n_patches, patch_dim)
    g_opt, d_opt = _adamw(generator, t.generator_lr, t), _adamw(discriminator, t.discriminator_lr, t)
    average = torch.optim.swa_utils.AveragedModel(
        generator, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay)) if t.ema_decay else None
    curve, window = TrainingCurve(), []
    steps = range(1, t.steps + 1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"train {arm}", unit="step", mininterval=2, file=sys.stderr)
    cpu_used = 0.0
    for step in steps:
        cpu_start = time.process_time()
        x = train_x[torch.from_numpy(image_rng.integers(n_images, size=t.batch_size))]
        split = splits(arm, n_patches, t.batch_size, split_rng, experiment)
        joint = objective.joint_over_union(split) if communication else None

        # 1. Discriminator: ascend (8) on (real, generated) pairs of the same (S, T) and x_S, R1 on the real ones.
        with torch.no_grad():
            fake = objective.generate(generator, x, split, torch.randn(t.batch_size, m.z_dim))
            joint_fake = objective.generate(generator, x, joint, torch.randn(t.batch_size, m.z_dim)) if communication else None
        lazy_r1 = t.r1_weight * t.r1_every if step % t.r1_every == 0 else 0.0
        d_loss, stats = objective.discriminator_loss(discriminator, x, fake, split, lazy_r1)
        if communication:
            stats["d_communication"] = objective.communication_loss(discriminator, joint_fake, fake, split, joint)
            d_loss = d_loss + communication * stats["d_communication"]
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()

        # 2. Generator: descend the non-saturating (8) through a frozen discriminator.
        discriminator.requires_grad_(False)
        fake = objective.generate(generator, x, split, torch.randn(t.batch_size, m.z_dim))
        g_loss = objective.generator_loss(discriminator, fake, split)
        if communication:
            joint_fake = objective.generate(generator, x, joint, torch.randn(t.batch_size, m.z_dim))
            g_loss = g_loss + communication * objective.communication_loss(discriminator, joint_fake, fake, split, joint,
                                                                           generator=True)
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        discriminator.requires_grad_(True)
        if average is not None:
            average.update_parameters(generator)

        cpu_used += time.process_time() - cpu_start
        if not (torch.isfinite(d_loss) and torch.isfinite(g_loss)):
            raise FloatingPointError(f"train {arm}: non-finite loss at step {step} (lower train.*_lr?)")
        window.append({"d_loss": stats["d_loss"].item(), "g_loss": g_loss.item(), "d_real": stats["d_real"].item(),
                       **({"r1": stats["r1"].item()} if lazy_r1 else {}),
                       **({"d_communication": stats["d_communication"].item()} if communication else {})})
        if progress:
            steps.set_postfix(d=f"{window[-1]['d_loss']:.3f}", g=f"{window[-1]['g_loss']:.3f}", refresh=False)
        if step % t.eval_every == 0 or step == t.steps:
            point = {"step": step, "cpu_seconds": cpu_used,
                     **{key: float(np.mean(values)) for key in ("d_loss", "g_loss", "d_real", "r1", "d_communication")
                        if (values := [w[key] for w in window if key in w])}}
            if evaluate is not None:
                point.update(evaluate(evaluated(generator, average)))
                generator.train()
            curve.points.append(point)
            window = []
    return evaluated(generator, average), discriminator.eval(), curve


def chimera_probe(train_x: torch.Tensor, experiment: GANExperiment, steps: int, ratio: float,
                  every: int = 50, progress: bool = True) -> list[dict]:
    """Can a fresh discriminator (the config's model, optimiser and R1) learn the check the
    BigLearn-GAN needs for completions: (x_S, x_T) of one image (real) against x_S of one training
    image with x_T pasted from another (fake, every patch realistic, only their fit wrong)? S holds
    round(ratio x L) random patches, T the rest. Returns {"step", "d_loss"} window means every
    `every` steps (log 4 = 1.386: chance)."""
    t = experiment.train
    torch.manual_seed(t.seed)
    rng = np.random.default_rng([t.seed, 2])
    n_images, n_patches, patch_dim = train_x.shape
    discriminator = Discriminator(experiment.model, n_patches, patch_dim)
    d_opt = _adamw(discriminator, t.discriminator_lr, t)
    points, window = [], []
    step_range = range(1, steps + 1)
    if progress:
        from tqdm import tqdm
        step_range = tqdm(step_range, desc="chimera probe", unit="step", mininterval=2, file=sys.stderr)
    for step in step_range:
        real, other = (train_x[torch.from_numpy(rng.integers(n_images, size=t.batch_size))] for _ in range(2))
        source = objective.source_masks(t.batch_size, n_patches, ratio, rng)
        chimera = torch.where(torch.from_numpy(source)[..., None], real, other)
        lazy_r1 = t.r1_weight * t.r1_every if step % t.r1_every == 0 else 0.0
        loss, stats = objective.discriminator_loss(discriminator, real, chimera, objective.source_splits(source), lazy_r1)
        d_opt.zero_grad(set_to_none=True)
        loss.backward()
        d_opt.step()
        window.append(stats["d_loss"].item())
        if step % every == 0 or step == steps:
            points.append({"step": step, "d_loss": float(np.mean(window))})
            window = []
    return points


def _adamw(module, lr: float, t) -> torch.optim.AdamW:
    """AdamW with a constant learning rate (App. D.3), the train section's betas and weight decay."""
    return torch.optim.AdamW(module.parameters(), lr=lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)


def evaluated(generator: Generator, average) -> Generator:
    """The generator to sample from: the weight average's copy if there is one, in eval mode."""
    return (generator if average is None else average.module).eval()


@torch.no_grad()
def sample_joint(generator: Generator, n: int, n_patches: int, patch_dim: int, batch_size: int,
                 seed: int) -> torch.Tensor:
    """n images [n, L, D] from the joint generation p_theta(x) (S = {}, T = all)."""
    torch_rng = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        split = objective.TaskSplit.of(joint_specs(n_patches, size), n_patches)
        z = torch.randn(size, generator.config.z_dim, generator=torch_rng)
        out.append(objective.generate(generator, torch.zeros(size, n_patches, patch_dim), split, z))
    return torch.cat(out)


@torch.no_grad()
def complete(generator: Generator, x: torch.Tensor, source: np.ndarray, z: torch.Tensor,
             batch_size: int) -> torch.Tensor:
    """x [n, L, D] with the patches outside the boolean masks source [n, L] drawn from
    p_theta(x_T | x_S) with noise z [n, z_dim]; the S patches are returned unchanged."""
    out = []
    for start in range(0, len(x), batch_size):
        chunk = slice(start, start + batch_size)
        out.append(objective.generate(generator, x[chunk], objective.source_splits(source[chunk]), z[chunk]))
    return torch.cat(out)

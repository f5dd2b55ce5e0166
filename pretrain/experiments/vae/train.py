"""Training of both VAEs through the project's one training step, and their evaluation.

The universal BigLearn-VAE maximises BigLearnELBO_U (eq. 7) over (S, T) draws; the jointly
trained VAE maximises JointELBO (eq. 1) on every step. Same optimiser, schedule and batch for
both, and the same budget: the same number of steps, or (train.cpu_minutes) the same CPU time.
Every update is the Trainer's step (LocalEngine.train_batch, gradients clipped to norm 1) on
objective.ELBOLoss: the negative ELBO per patch dimension (nats), which keeps that clipping
independent of the image size.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from ...train.engine import LocalEngine, WarmupCosine
from ...train.trainer import FIT_AFTER_STEPS, step_horizon
from . import objective
from .config import VAEExperiment
from .model import MODELS


def fit(kind: str, train_x: torch.Tensor, experiment: VAEExperiment, progress: bool = True, evaluate=None):
    """(model, curve): a fresh model of `kind` ("biglearn_vae" or "vae") trained on patches train_x
    [N, L, D] for train.steps, or for train.cpu_minutes of process CPU time (the training steps'
    own: evaluations are not counted). With `evaluate(model) -> dict`, curve holds
    {"step", "cpu_seconds", **evaluate(model)} at eval.curve_points evenly spaced points of the
    budget (CPU time, or steps) and at the end; else it is empty."""
    t = experiment.train
    torch.manual_seed(t.seed)
    rng = np.random.default_rng(t.seed)
    n_images, n_patches, patch_dim = train_x.shape
    model = MODELS[kind](experiment.model, patch_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    cosine = WarmupCosine(t.steps, t.warmup_steps, t.min_lr_ratio)
    engine = LocalEngine(objective.ELBOLoss(model), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine))
    budget_s, points = 60 * t.cpu_minutes, experiment.eval.curve_points
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, desc=f"train {kind}", unit="step", mininterval=2, file=sys.stderr)
    curve, step, cpu_seconds, first_step_s = [], 0, 0.0, 0.0
    while step < t.steps and not (budget_s and cpu_seconds >= budget_s):
        start = time.process_time()
        kl_weight = t.kl_weight * min(1.0, (step + 1) / t.kl_warmup_steps) if t.kl_warmup_steps else t.kl_weight
        x = train_x[torch.from_numpy(rng.integers(n_images, size=t.batch_size))]
        specs = objective.biglearn_specs(n_patches, t.batch_size, rng, experiment.objective) \
            if kind == "biglearn_vae" else objective.joint_specs(n_patches, t.batch_size)
        loss = engine.train_batch(objective.PatchBatch(x, objective.patch_batch(specs, n_patches), kl_weight))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train {kind}: non-finite loss {loss.item()} (lower train.lr?)")
        cpu_seconds += time.process_time() - start
        step += 1
        if step == 1:
            first_step_s = cpu_seconds  # one-off costs, left out of the pace as the Trainer does
        if budget_s and step == FIT_AFTER_STEPS:  # size the schedule to the steps the budget fits
            horizon = step_horizon(t.steps, t.cpu_minutes, step, cpu_seconds, step - 1, cpu_seconds - first_step_s)
            cosine.fit(horizon, t.steps, step)
            if bar is not None:
                bar.total = horizon
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        fraction = cpu_seconds / budget_s if budget_s else step / t.steps
        done = step == t.steps or (budget_s and cpu_seconds >= budget_s)
        if evaluate is not None and (done or fraction * points >= len(curve) + 1):
            curve.append({"step": step, "cpu_seconds": cpu_seconds, **evaluate(model.eval())})
            model.train()
    if bar is not None:
        bar.close()
    return model.eval(), curve


@torch.no_grad()
def test_joint_elbo(model, x: torch.Tensor, kl_weight: float, samples: int, batch_size: int, seed: int) -> dict:
    """Test JointELBO (S empty, T = all), nats per image, averaged over images and `samples`
    z draws each: {"elbo" (with kl_weight), "elbo_beta1" (the bound on log p(x)), "log_lik", "kl"}."""
    generator = torch.Generator().manual_seed(seed)
    n_images, n_patches = x.shape[:2]
    totals = {"elbo": 0.0, "log_lik": 0.0, "kl": 0.0}
    for _ in range(samples):
        for start in range(0, n_images, batch_size):
            chunk = x[start:start + batch_size]
            noise = torch.randn(len(chunk), model.config.z_dim, generator=generator)
            out = objective.elbo(model, chunk, objective.patch_batch(objective.joint_specs(n_patches, len(chunk)),
                                                                     n_patches), kl_weight, noise)
            for key in totals:
                totals[key] += out[key].sum().item()
    means = {key: value / (samples * n_images) for key, value in totals.items()}
    means["elbo_beta1"] = means["log_lik"] - means["kl"]
    return means


def observed_masks(n_images: int, n_patches: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean [n, L]: round(ratio * L) patches (at least one) observed uniformly at random."""
    n_observed = max(1, int(round(ratio * n_patches)))
    order = np.argsort(rng.random((n_images, n_patches)), axis=1)
    masks = np.zeros((n_images, n_patches), dtype=bool)
    np.put_along_axis(masks, order[:, :n_observed], True, axis=1)
    return masks


@torch.no_grad()
def codes(model, x: torch.Tensor, masks: np.ndarray, batch_size: int) -> np.ndarray:
    """Means of p(z | x_S) [n, z_dim] for observed masks [n, L]."""
    means = [objective.encode_observed(model, x[i:i + batch_size], masks[i:i + batch_size])[0]
             for i in range(0, len(x), batch_size)]
    return torch.cat(means).numpy()


def masked_pixels(x: torch.Tensor, masks: np.ndarray) -> np.ndarray:
    """The observed pixels (zero elsewhere) and the mask itself: the supervised reference
    features of the probe table, with exactly the information p(z | x_S) gets."""
    return np.concatenate([(x.numpy() * masks[..., None]).reshape(len(x), -1), masks], axis=1)


def linear_probe(features, train_x, train_y, test_x, test_y, ratio: float, draws: int, seed: int) -> float:
    """Test accuracy of a logistic regression on features(x, observed masks) -> [n, f], S-ratio
    `ratio` on both sides; each training image contributes `draws` random x_S. The BigLearn-VAE's
    features are the means of p(z | x_S): `lambda x, m: codes(model, x, m, batch_size)`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(seed)
    n_patches = train_x.shape[1]
    repeated = train_x.repeat(draws, 1, 1)
    train_features = features(repeated, observed_masks(len(repeated), n_patches, ratio, rng))
    test_features = features(test_x, observed_masks(len(test_x), n_patches, ratio, rng))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_features, np.tile(train_y, draws))
    return float(probe.score(test_features, test_y))

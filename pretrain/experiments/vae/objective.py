"""BigLearnELBO_U (eq. 7) and JointELBO (eq. 1) of "Big Learning Variational Auto-Encoders".

(S, T) pairs come from the project's samplers (pretrain.objectives: S-ratio ~ Beta and T-ratio
of the rest ~ Beta, as in the paper's Algorithm 1) and reach the model in the project's sorted
layout: `pretrain.layout.collate` run on PATCH INDICES, so each sorted row's token is the index of the
patch it holds. All targets share group 1: given z and x_S the decoder's patches are
conditionally independent (the VAE's factorised p(x_T | z, x_S)).

Per sample:  ELBO = E_{p(z | x_{S u T})} log p(x_T | z, x_S) - beta KL(p(z | x_{S u T}) || p(z | x_S)),
one reparameterised z per sample; with S empty and T = all it is eq. (1)'s JointELBO, where
p(z | x_S) is the prior (learned by the universal model, N(0, I) for the jointly trained VAE).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ...layout import INVALID_GROUP, SplitSpec, TaskBatch, collate, make_split
from ...objectives import TASKS, BigLearnConfig, ObjectiveConfig, ObjectiveSampler
from . import gaussian

JOINT_TASK = TASKS.index("biglearn")


def one_group(spec: SplitSpec) -> SplitSpec:
    """The same (S, T) with every target in group 1 (decoded jointly given z and x_S)."""
    return replace(spec, target_groups=np.ones(spec.n_target, dtype=np.int32))


def biglearn_specs(n_patches: int, batch_size: int, rng: np.random.Generator, objective: BigLearnConfig):
    sampler = ObjectiveSampler(ObjectiveConfig(name="biglearn", biglearn=objective))
    return [one_group(sampler(n_patches, rng)) for _ in range(batch_size)]


def split_specs(sources, targets, n_patches: int) -> list[SplitSpec]:
    """Specs for given index sets (S ascending, T in one group)."""
    return [make_split(n_patches, s, t, np.ones(len(t), dtype=np.int32), task_id=JOINT_TASK)
            for s, t in zip(sources, targets)]


def joint_specs(n_patches: int, batch_size: int) -> list[SplitSpec]:
    """S empty, T = every patch: the joint task of eq. (1)."""
    return split_specs([[]] * batch_size, [np.arange(n_patches)] * batch_size, n_patches)


def patch_batch(specs: list[SplitSpec], n_patches: int, device=None) -> TaskBatch:
    """The sorted layout of these splits; `tokens` holds the patch index of each row."""
    indices = np.broadcast_to(np.arange(n_patches), (len(specs), n_patches))
    return collate(indices, specs, pad_id=0).to_torch(device)


@dataclass
class PatchLayout:
    """Model inputs of one (S, T) batch of patch sequences."""
    rows: torch.Tensor              # [B, N, D] patch values in sorted order (anything on padding)
    positions: torch.Tensor         # [B, N] patch indices
    source_groups: torch.Tensor     # [B, N] 0 on S rows, INVALID elsewhere
    union_groups: torch.Tensor      # [B, N] 0 on S u T rows, INVALID elsewhere
    query_positions: torch.Tensor   # [B, Nt] patch index of each target
    query_groups: torch.Tensor      # [B, Nt] 1 for targets, INVALID for padding
    targets: torch.Tensor           # [B, Nt, D] the target patches' values
    target_mask: torch.Tensor       # [B, Nt] bool
    source_width: int               # S rows come first: decoding reads only this many columns

    def decode(self, model, z):
        """(mean, logvar) [B, Nt, D] of p(x_T | z, x_S) for this layout's targets."""
        w = self.source_width
        return model.decode(z, self.rows[:, :w], self.positions[:, :w], self.source_groups[:, :w],
                            self.query_positions, self.query_groups)


def layout(x: torch.Tensor, batch: TaskBatch) -> PatchLayout:
    """x [B, L, D] patch values in natural order; batch from `patch_batch`."""
    rows = x.gather(1, batch.tokens[..., None].expand(-1, -1, x.shape[-1]))
    invalid = torch.full_like(batch.groups, INVALID_GROUP)
    return PatchLayout(
        rows=rows, positions=batch.positions,
        source_groups=torch.where(batch.groups == 0, batch.groups, invalid),
        union_groups=torch.where(batch.groups != INVALID_GROUP, torch.zeros_like(batch.groups), invalid),
        query_positions=batch.positions.gather(1, batch.target_index),
        query_groups=torch.where(batch.target_mask, torch.ones_like(batch.target_groups), batch.target_groups),
        targets=rows.gather(1, batch.target_index[..., None].expand(-1, -1, x.shape[-1])),
        target_mask=batch.target_mask, source_width=int(batch.n_source.max()))


def elbo(model, x: torch.Tensor, batch: TaskBatch, kl_weight: float, noise: torch.Tensor | None = None) -> dict:
    """Per-sample {"elbo", "log_lik", "kl"} [B] (nats); `noise` [B, z_dim] fixes the z draw."""
    lay = layout(x, batch)
    (post_mean, post_logvar), (prior_mean, prior_logvar) = model.encode_pair(
        lay.rows, lay.positions, lay.union_groups, lay.source_groups)
    z = gaussian.sample(post_mean, post_logvar, noise)
    mean, logvar = lay.decode(model, z)
    per_target = gaussian.log_prob(lay.targets, mean, logvar).sum(-1)
    log_lik = torch.where(lay.target_mask, per_target, torch.zeros_like(per_target)).sum(1)
    kl = gaussian.kl(post_mean, post_logvar, prior_mean, prior_logvar).sum(-1)
    return {"elbo": log_lik - kl_weight * kl, "log_lik": log_lik, "kl": kl}


def encode_observed(model, x: torch.Tensor, observed: np.ndarray):
    """(mean, logvar) of p(z | x_O) for boolean masks observed [B, L] (at least one patch each)."""
    n_patches = x.shape[1]
    if not observed.any(1).all():
        raise ValueError("encode_observed: every sample needs at least one observed patch")
    # S u T is what the encoder sees: T = O with S empty reuses the posterior path of `elbo`.
    specs = split_specs([[]] * len(observed), [np.flatnonzero(o) for o in observed], n_patches)
    lay = layout(x, patch_batch(specs, n_patches, x.device))
    return model.encode(lay.rows, lay.positions, lay.union_groups)


def decode_into(model, x: torch.Tensor, source: np.ndarray, z: torch.Tensor) -> torch.Tensor:
    """x with every patch outside the boolean masks source [B, L] replaced by the mean of
    p(x_T | z, x_S), T = the rest; S patches are returned unchanged."""
    n_patches = x.shape[1]
    specs = split_specs([np.flatnonzero(s) for s in source], [np.flatnonzero(~s) for s in source], n_patches)
    batch = patch_batch(specs, n_patches, x.device)
    lay = layout(x, batch)
    mean, _ = lay.decode(model, z)
    out = x.clone()
    rows, cols = torch.nonzero(lay.target_mask, as_tuple=True)
    out[rows, lay.query_positions[rows, cols]] = mean[rows, cols]
    return out


@dataclass
class PatchBatch:
    """One training batch: patch values x [B, L, D] in natural order, their (S, T) splits in the
    sorted layout (`patch_batch`) and the KL weight of this step."""
    x: torch.Tensor
    splits: TaskBatch
    kl_weight: float


class ELBOLoss(torch.nn.Module):
    """forward(batch) -> (negative ELBO per patch dimension, per-sample terms): the loss module the
    Trainer's step takes (pretrain.train.engine.LocalEngine), around either VAE."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PatchBatch):
        out = elbo(self.model, batch.x, batch.splits, batch.kl_weight)
        return -out["elbo"].mean() / (batch.x.shape[1] * batch.x.shape[2]), out

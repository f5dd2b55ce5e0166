"""Eq. (8) of "Big Cooperative Learning" with the R1 penalty, over (S, T) batches of patch tokens.

For random (S, T) ~ q(S, T) (the text model's sampler, pretrain.objectives, S-ratio ~ Beta(0.5, 3)
and T-ratio of the rest ~ Beta(3, 0.5)) and x ~ q(x):

    min_theta max_phi  E[ log sigma(f_phi(x; S, T)) + E_{x_T ~ p_theta(x_T | x_S)} log sigma(-f_phi(x; S, T)) ]   (8)

The discriminator ascends (8) plus the R1 penalty of "Which Training Methods for GANs do actually
Converge?" (Mescheder et al., 2018) on real data, the generator descends the usual non-saturating
form of (8) (maximise log sigma(f) of its samples instead of minimising log sigma(-f): same fixed
point, useful gradients while D wins). With S = {} and T = all, (8) is the joint GAN.

"Communication" (App. D.2, eq. 12): two splits of the same patches, (S1, T1) and (S2, T2) with
S1 u T1 = S2 u T2, aim at the same q(x_{S u T}), so their model distributions are matched against
each other, with the discriminator of (8) reused as f(x; S2, T2) - f(x; S1, T1):

    min_theta max_phi  E[ E_{x ~ p_theta(x_T1 | x_S1) q(x_S1)} log sigma[f(x; S2, T2) - f(x; S1, T1)]
                        + E_{x ~ p_theta(x_T2 | x_S2) q(x_S2)} log sigma[f(x; S1, T1) - f(x; S2, T2)] ]   (12)

Here (S2, T2) is each sample's draw and (S1, T1) = ({}, S2 u T2), the joint generation of the
same patches; the generator again takes the non-saturating form (the two margins' signs swapped).

A TaskSplit holds one (S, T) per sample in the sorted layout (pretrain.experiments.vae.objective
builds it on patch indices: S rows, T rows in one group, the dropped rest).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...layout import TaskBatch
from ...model.ops import twice_differentiable
from ..vae.objective import PatchLayout, layout, patch_batch, split_specs


@dataclass
class TaskSplit:
    """(S, T) of each sample of a batch of patch sequences [B, L, D]."""
    batch: TaskBatch          # torch tensors, targets in group 1
    target_pixels: torch.Tensor  # [B, L] bool: T in natural patch order

    @classmethod
    def of(cls, specs, n_patches: int, device=None) -> "TaskSplit":
        batch = patch_batch(specs, n_patches, device)
        in_target = torch.zeros(len(specs), n_patches, dtype=torch.bool, device=batch.groups.device)
        rows, cols = torch.nonzero(batch.target_mask, as_tuple=True)
        in_target[rows, batch.positions.gather(1, batch.target_index)[rows, cols]] = True
        return cls(batch, in_target)

    def layout(self, x: torch.Tensor) -> PatchLayout:
        return layout(x, self.batch)

    def repeat(self, times: int) -> "TaskSplit":
        """The same splits for `times` copies of the batch stacked along the batch axis."""
        stacked = {f.name: torch.cat([getattr(self.batch, f.name)] * times) for f in fields(self.batch)
                   if torch.is_tensor(getattr(self.batch, f.name))}
        return TaskSplit(replace(self.batch, **stacked), torch.cat([self.target_pixels] * times))


def joint_over_union(split: TaskSplit) -> TaskSplit:
    """({}, S u T) of each sample of `split`: eq. (12)'s partner task, joint generation of the same patches."""
    b, n_patches = split.batch, split.target_pixels.shape[1]
    tokens, width = b.tokens.cpu().numpy(), (b.n_source + b.n_target).tolist()
    return TaskSplit.of(split_specs([[]] * len(width), [tokens[i, :w] for i, w in enumerate(width)], n_patches),
                        n_patches, b.groups.device)


def source_splits(source: np.ndarray, device=None) -> TaskSplit:
    """S = the boolean masks source [B, L], T = every other patch (at least one per sample)."""
    if source.all(1).any():
        raise ValueError("source_splits: every sample needs at least one target patch")
    return TaskSplit.of(split_specs([np.flatnonzero(s) for s in source], [np.flatnonzero(~s) for s in source],
                                    source.shape[1]), source.shape[1], device)


def source_masks(n: int, n_patches: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean [n, L]: round(ratio * L) patches in S, uniformly at random, at most L - 1."""
    n_source = min(n_patches - 1, int(round(ratio * n_patches)))
    order = np.argsort(rng.random((n, n_patches)), axis=1)
    masks = np.zeros((n, n_patches), dtype=bool)
    np.put_along_axis(masks, order[:, :n_source], True, axis=1)
    return masks


def generate(generator, x: torch.Tensor, split: TaskSplit, z: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] with its T patches replaced by x_T ~ G(x_T | x_S, z): the fake sample of (8).
    Differentiable in the generator's parameters; reads x only on S."""
    lay = split.layout(x)
    values = generator(lay, split.batch.groups, split.batch.target_index, z)
    rows, cols = torch.nonzero(split.batch.target_mask, as_tuple=True)
    return x.index_put((rows, lay.query_positions[rows, cols]), values[rows, cols])


def discriminate(discriminator, x: torch.Tensor, split: TaskSplit) -> torch.Tensor:
    """f(x; S, T) [B] of samples x [B, L, D] in natural patch order."""
    return discriminator(split.layout(x), split.batch.groups)


@contextmanager
def double_backward():
    """A forward whose gradient will be differentiated again: the block's plain autograd graph
    (pretrain.model.ops) and SDPA's math kernel (the fused CPU kernels are once-differentiable)."""
    with ExitStack() as stack:
        stack.enter_context(twice_differentiable())
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def r1_penalty(discriminator, x: torch.Tensor, split: TaskSplit):
    """(f(x; S, T) [B], ||grad_{x_T} f(x; S, T)||^2 [B]) on real x: R1's squared gradient norm
    with respect to the patches the generator writes (x_S is the condition; with S = {} it is
    the whole image, R1 proper). Differentiable in the discriminator's parameters."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), double_backward():  # a gradient by definition, also under no_grad
        logits = discriminate(discriminator, x, split)
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return logits, (grad.pow(2).sum(-1) * split.target_pixels).sum(-1)


def discriminator_loss(discriminator, real: torch.Tensor, fake: torch.Tensor, split: TaskSplit, r1_weight: float):
    """-(8) over phi plus (r1_weight / 2) E_real ||grad_{x_T} f||^2, and its terms for logging."""
    if r1_weight > 0:
        real_logits, penalty = r1_penalty(discriminator, real, split)
        fake_logits = discriminate(discriminator, fake.detach(), split)
    else:  # one pass over both halves
        both = torch.cat([real, fake.detach()])
        real_logits, fake_logits = discriminate(discriminator, both, split.repeat(2)).chunk(2)
        penalty = torch.zeros(len(real))
    # -log sigma(f) = softplus(-f) on real pairs, -log sigma(-f) = softplus(f) on generated ones.
    adversarial = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    loss = adversarial + 0.5 * r1_weight * penalty.mean()
    return loss, {"d_loss": adversarial.detach(), "r1": penalty.detach().mean(),
                  "d_real": torch.sigmoid(real_logits.detach()).mean()}


def communication_margins(discriminator, joint_fake: torch.Tensor, fake: torch.Tensor, split: TaskSplit,
                          joint: TaskSplit):
    """The two margins of (12), [B] each: f(x1; S, T) - f(x1; {}, U) on joint_fake x1 ~ p(x_U) and
    f(x2; {}, U) - f(x2; S, T) on fake x2 ~ p(x_T | x_S) q(x_S), for split = (S, T) and
    joint = joint_over_union(split) = ({}, U). The discriminator raises both, the generator lowers them."""
    both = torch.cat([joint_fake, fake])
    under_split = discriminate(discriminator, both, split.repeat(2))
    under_joint = discriminate(discriminator, both, joint.repeat(2))
    margins = under_split - under_joint
    return margins[:len(fake)], -margins[len(fake):]


def communication_loss(discriminator, joint_fake, fake, split, joint, generator: bool = False):
    """-(12), the discriminator's loss; with generator=True the generator's non-saturating form
    (each margin's sign swapped, as for (8))."""
    sign = -1.0 if generator else 1.0
    return sum(F.softplus(-sign * m).mean() for m in communication_margins(discriminator, joint_fake, fake, split, joint))


def generator_loss(discriminator, fake: torch.Tensor, split: TaskSplit):
    """Non-saturating form of (8) over theta: E -log sigma(f(x_S, G(x_S, z); S, T))."""
    return F.softplus(-discriminate(discriminator, fake, split)).mean()

"""Inference with a big-learned model: exact conditional scoring.

log p(x_T | x_S) for one prediction order is a single forward pass: every target gets its
own group, so target k sees S and the targets before it, which is the chain rule
sum_k log p(x_{t_k} | x_S, x_{t_<k}) (seed 000 eq. 6).
"""
from __future__ import annotations

import numpy as np
import torch

from .collate import collate
from .objectives import TASKS, SplitSpec


def split_spec(length: int, source_positions, target_positions, task: str = "biglearn") -> SplitSpec:
    """SplitSpec with S = source_positions and targets predicted one by one in the given order."""
    source = np.asarray(source_positions, dtype=np.int64).reshape(-1)
    targets = np.asarray(target_positions, dtype=np.int64).reshape(-1)
    if len(targets) == 0:
        raise ValueError("target_positions must not be empty")
    chosen = np.concatenate([source, targets])
    if chosen.min() < 0 or chosen.max() >= length:
        raise ValueError(f"positions must lie in [0, {length}); got min {chosen.min()}, max {chosen.max()}")
    if len(np.unique(chosen)) != len(chosen):
        raise ValueError("source_positions and target_positions must be distinct and disjoint")
    rest = np.setdiff1d(np.arange(length), chosen)
    order = np.concatenate([np.sort(source), targets, rest]).astype(np.int32)
    return SplitSpec(order=order, n_source=len(source), n_target=len(targets),
                     target_groups=np.arange(1, len(targets) + 1, dtype=np.int32), task_id=TASKS.index(task))


@torch.no_grad()
def score(model, tokens, source_positions, target_positions, order=None, *, pad_id: int = 0,
          return_steps: bool = False):
    """Exact log p(x_T | x_S) for each sample of a batch, for one prediction order.

    tokens: [B, L] ints (or one sequence [L]); source_positions / target_positions: one
    sequence of positions per sample (or a single one for [L] input). Targets are predicted in
    the order listed, unless `order` gives, per sample, the target positions in prediction order.
    Returns log-probabilities [B] (and the per-step terms [B, Nt] with return_steps=True).
    """
    tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    single = tokens.ndim == 1
    if single:
        tokens, source_positions, target_positions = tokens[None], [source_positions], [target_positions]
        order = None if order is None else [order]
    if order is not None:
        for b, (given, ordered) in enumerate(zip(target_positions, order)):
            if sorted(np.asarray(given).tolist()) != sorted(np.asarray(ordered).tolist()):
                raise ValueError(f"sample {b}: order must be a permutation of target_positions")
        target_positions = order
    specs = [split_spec(tokens.shape[1], s, t) for s, t in zip(source_positions, target_positions)]
    device = next(model.parameters()).device
    batch = collate(tokens, specs, pad_id).to_torch(device)
    was_training = model.training
    model.eval()
    try:
        logits = model(batch)
    finally:
        model.train(was_training)
    log_probs = logits.double().log_softmax(-1).gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
    steps = torch.where(batch.target_mask, log_probs, torch.zeros_like(log_probs))
    total = steps.sum(-1)
    if single:
        total, steps = total[0], steps[0]
    return (total, steps) if return_steps else total

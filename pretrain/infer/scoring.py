"""Exact scoring: log p(x_T | x_S) for one prediction order, and over several orders.

log p(x_T | x_S) for one prediction order is a single forward pass: every target gets its
own group, so target k sees S and the targets before it, which is the chain rule
sum_k log p(x_{t_k} | x_S, x_{t_<k}) ("Big Learning", the maximum-likelihood form of big learning).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from data_pipeline.errors import UserError

from ..layout import SplitSpec, collate, make_split
from ..objectives import TASKS


def split_spec(length: int, source_positions, target_positions, task: str = "biglearn") -> SplitSpec:
    """SplitSpec with S = source_positions and targets predicted one by one in the given order."""
    source = np.asarray(source_positions, dtype=np.int64).reshape(-1)
    targets = np.asarray(target_positions, dtype=np.int64).reshape(-1)
    if len(targets) == 0:
        raise UserError("target_positions must not be empty")
    chosen = np.concatenate([source, targets])
    if chosen.min() < 0 or chosen.max() >= length:
        raise UserError(f"positions must lie in [0, {length}); got min {chosen.min()}, max {chosen.max()}")
    if len(np.unique(chosen)) != len(chosen):
        raise UserError("source_positions and target_positions must be distinct and disjoint")
    return make_split(length, source, targets, task_id=TASKS.index(task))


def check_length(model, length: int) -> None:
    if length > model.config.max_seq_len:
        raise UserError(f"sequence of {length} tokens (text plus gaps) is longer than the model's maximum "
                         f"length max_seq_len={model.config.max_seq_len}")


def eval_forward(model, batch):
    was_training = model.training
    model.eval()
    try:
        return model(batch)
    finally:
        model.train(was_training)


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) of every target row [B, Nt]; padding rows (IGNORE_LABEL) read token 0 and
    must be masked by the caller with batch.target_mask."""
    return logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]


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
                raise UserError(f"sample {b}: order must be a permutation of target_positions")
        target_positions = order
    specs = [split_spec(tokens.shape[1], s, t) for s, t in zip(source_positions, target_positions)]
    device = next(model.parameters()).device
    batch = collate(tokens, specs, pad_id).to_torch(device)
    logits = eval_forward(model, batch)
    log_probs = label_log_probs(logits.double(), batch.labels)
    steps = torch.where(batch.target_mask, log_probs, torch.zeros_like(log_probs))
    total = steps.sum(-1)
    if single:
        total, steps = total[0], steps[0]
    return (total, steps) if return_steps else total


def score_orders(model, tokens, source_positions, target_positions, n_orders: int, seed: int | None = None,
                 *, pad_id: int = 0):
    """log p(x_T | x_S) of one sample under n_orders random prediction orders (one batched pass).

    Returns (per_order [n_orders] float64, log_mean_exp, orders). A perfectly learned model is
    order-consistent, so the spread across orders measures how far it is from that; the
    log-mean-exp is the estimate that averages the orders' probabilities.
    """
    if n_orders < 1:
        raise UserError(f"n_orders must be >= 1; got {n_orders}")
    rng = np.random.default_rng(seed)
    targets = np.asarray(target_positions).reshape(-1)
    orders = [rng.permutation(targets) for _ in range(n_orders)]
    tokens = np.asarray(tokens).reshape(1, -1).repeat(n_orders, axis=0)
    per_order = score(model, tokens, [source_positions] * n_orders, orders, pad_id=pad_id).numpy()
    log_mean_exp = float(np.logaddexp.reduce(per_order) - math.log(n_orders))
    return per_order, log_mean_exp, orders



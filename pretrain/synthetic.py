"""A synthetic source with exact conditionals, to check what a big learner learns.

A first-order Markov chain over `n_states` symbols: any marginal q(x_A) over an arbitrary set
of positions A is one forward pass with the unobserved positions summed out, so every
conditional q(x_T | x_S), for any (S, T) and any grouping of T, is exact. `fit` trains a
BigLearner on samples from the chain with a plain torch loop (no DeepSpeed: this is a
correctness experiment, not the trainer).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .collate import collate
from .infer import label_log_probs
from .model import BigLearner, ModelConfig
from .objectives import ObjectiveSampler, SplitSpec


@dataclass
class MarkovSource:
    initial: np.ndarray     # [V] q(x_0)
    transition: np.ndarray  # [V, V] q(x_t | x_{t-1}), rows sum to 1

    @classmethod
    def random(cls, n_states: int = 8, concentration: float = 0.3, seed: int = 0) -> "MarkovSource":
        """Dirichlet rows; a small concentration gives peaked, learnable transitions."""
        rng = np.random.default_rng(seed)
        return cls(rng.dirichlet(np.full(n_states, 1.0)), rng.dirichlet(np.full(n_states, concentration), size=n_states))

    @property
    def n_states(self) -> int:
        return len(self.initial)

    def sample(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        x = np.empty((n, length), dtype=np.int64)
        x[:, 0] = rng.choice(self.n_states, size=n, p=self.initial)
        cumulative = np.cumsum(self.transition, axis=1)
        for t in range(1, length):
            u = rng.random(n)[:, None]
            x[:, t] = np.minimum((u > cumulative[x[:, t - 1]]).sum(1), self.n_states - 1)
        return x

    def log_marginal(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """log q(x_A) per row, A = positions where `observed` [n, L] is True (forward algorithm)."""
        n, length = x.shape
        evidence = np.where(observed[:, :, None], np.eye(self.n_states)[x], 1.0)  # [n, L, V]
        alpha = self.initial[None] * evidence[:, 0]
        log_total = np.zeros(n)
        for t in range(length):
            if t:
                alpha = (alpha @ self.transition) * evidence[:, t]
            norm = alpha.sum(1)
            log_total += np.log(norm)
            alpha = alpha / norm[:, None]
        return log_total

    def target_log_probs(self, x: np.ndarray, specs: list[SplitSpec]) -> list[np.ndarray]:
        """Exact log q(x_t | x_S, x_{T in earlier groups}) for every target of every sample,
        in prediction order: the best any model of that (S, T, grouping) can do."""
        rows, before = [], []
        for b, spec in enumerate(specs):
            targets = spec.order[spec.n_source:spec.n_source + spec.n_target]
            for k, group in enumerate(spec.target_groups):
                visible = np.zeros(x.shape[1], dtype=bool)
                visible[spec.order[:spec.n_source]] = True
                visible[targets[spec.target_groups < group]] = True
                rows.append(b)
                before.append(visible)
        rows, before = np.array(rows), np.array(before)
        with_target = before.copy()
        target_positions = np.concatenate([s.order[s.n_source:s.n_source + s.n_target] for s in specs])
        with_target[np.arange(len(rows)), target_positions] = True
        flat = self.log_marginal(x[rows], with_target) - self.log_marginal(x[rows], before)
        return np.split(flat, np.cumsum([s.n_target for s in specs])[:-1])


def model_target_log_probs(model: BigLearner, x: np.ndarray, specs: list[SplitSpec], batch_size: int = 256):
    """The model's log p(x_t | ...) for the same targets, in the same order."""
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(specs), batch_size):
            batch = collate(x[start:start + batch_size], specs[start:start + batch_size], pad_id=0).to_torch(device)
            log_probs = label_log_probs(model(batch).float(), batch.labels)
            out += [row[:n].cpu().numpy() for row, n in zip(log_probs, batch.n_target.tolist())]
    return out


def fit(source: MarkovSource, sampler: ObjectiveSampler, *, length: int = 32, steps: int = 400,
        batch_size: int = 64, lr: float = 3e-3, seed: int = 0, model_config: ModelConfig | None = None,
        progress: bool = False) -> BigLearner:
    """Train a small BigLearner on fresh chain samples with AdamW + cosine decay."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = model_config or ModelConfig(vocab_size=source.n_states, d_model=64, n_layers=2, n_heads=4,
                                         ffn_hidden=128, attention_backend="torch")
    model = BigLearner(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    iterator = range(steps)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="fit markov", unit="step")
    model.train()
    for _ in iterator:
        x = source.sample(batch_size, length, rng)
        batch = collate(x, [sampler(length, rng) for _ in range(batch_size)], pad_id=0).to_torch()
        loss, _ = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress:
            iterator.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()

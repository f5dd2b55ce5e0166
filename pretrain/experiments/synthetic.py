"""Synthetic sources with exact conditionals, to check what a big learner learns.

Both sources are hidden Markov chains, and any marginal q(x_A) over an arbitrary set of
positions A is one forward pass over the hidden states with the unobserved tokens summed out;
so every conditional q(x_T | x_S), for any (S, T) and any grouping of T, is exact.

- `MarkovSource`: a first-order Markov chain over `n_states` symbols (hidden state = token).
- `HiddenMarkovSource`: `n_hidden` sticky hidden states emitting `n_symbols` tokens. A hidden
  state persists for about 1 / (1 - stay) tokens and is never observed, so the best prediction
  of a token uses evidence from far away on both sides: harder than a first-order chain.

`fit` trains a BigLearner on samples from a source on the Trainer's step, in process (a
LocalEngine, no DeepSpeed: this is a correctness experiment).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..infer import label_log_probs
from ..layout import SplitSpec, collate, make_split
from ..model import BigLearner, ModelConfig
from ..objectives import TASKS, ObjectiveSampler
from ..train.engine import LocalEngine
from ..train.task import PretrainTask
from ..train.trainer import Trainer, TrainerConfig


def _draw_rows(probs: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw from probs[rows[i]] for each i (inverse CDF)."""
    cumulative = np.cumsum(probs, axis=1)
    u = rng.random(len(rows))[:, None]
    return np.minimum((u > cumulative[rows]).sum(1), probs.shape[1] - 1)


class _ForwardSource:
    """Exact marginals and conditionals of a chain of hidden states observed through `evidence`.

    Subclasses define `initial` [H], `transition` [H, H], `vocab_size` and
    `evidence(x, observed)` -> [n, L, H]: q(x_t | hidden state) where observed, 1 elsewhere."""

    initial: np.ndarray
    transition: np.ndarray

    def _hidden_chain(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        h = np.empty((n, length), dtype=np.int64)
        h[:, 0] = rng.choice(len(self.initial), size=n, p=self.initial)
        for t in range(1, length):
            h[:, t] = _draw_rows(self.transition, h[:, t - 1], rng)
        return h

    def log_marginal(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """log q(x_A) per row, A = positions where `observed` [n, L] is True (forward algorithm)."""
        n, length = x.shape
        evidence = self.evidence(x, observed)  # [n, L, H]
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
        in prediction order: the best any model of that (S, T, grouping) can do (the model's
        loss predicts each target of group g from S and the groups before g, never jointly)."""
        rows, before = [], []
        for b, spec in enumerate(specs):
            targets = spec.order[spec.n_source:spec.n_source + spec.n_target]
            for group in spec.target_groups:
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


@dataclass
class MarkovSource(_ForwardSource):
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

    @property
    def vocab_size(self) -> int:
        return self.n_states

    def sample(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        return self._hidden_chain(n, length, rng)

    def evidence(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        return np.where(observed[:, :, None], np.eye(self.n_states)[x], 1.0)


@dataclass
class HiddenMarkovSource(_ForwardSource):
    initial: np.ndarray     # [H] q(h_0)
    transition: np.ndarray  # [H, H] q(h_t | h_{t-1})
    emission: np.ndarray    # [H, V] q(x_t | h_t)

    @classmethod
    def random(cls, n_hidden: int = 6, n_symbols: int = 16, stay: float = 0.97, concentration: float = 0.2,
               seed: int = 0) -> "HiddenMarkovSource":
        """Sticky transitions (stay with probability `stay`, else move to a Dirichlet(1) draw of
        the others) and Dirichlet(`concentration`) emissions, which overlap between states."""
        if not (n_hidden >= 2 and n_symbols >= 2 and 0 < stay < 1 and concentration > 0):
            raise ValueError(f"HiddenMarkovSource.random needs n_hidden >= 2, n_symbols >= 2, 0 < stay < 1 and "
                             f"concentration > 0; got {n_hidden}, {n_symbols}, {stay}, {concentration}")
        rng = np.random.default_rng(seed)
        moves = rng.dirichlet(np.ones(n_hidden - 1), size=n_hidden) * (1 - stay)
        transition = np.full((n_hidden, n_hidden), stay)
        transition[~np.eye(n_hidden, dtype=bool)] = moves.ravel()
        return cls(np.full(n_hidden, 1.0 / n_hidden), transition,
                   rng.dirichlet(np.full(n_symbols, concentration), size=n_hidden))

    @property
    def vocab_size(self) -> int:
        return self.emission.shape[1]

    def sample(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        hidden = self._hidden_chain(n, length, rng)
        return _draw_rows(self.emission, hidden.ravel(), rng).reshape(n, length)

    def evidence(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        return np.where(observed[:, :, None], self.emission.T[x], 1.0)


class SourceStream:
    """Endless batches of fresh samples from a synthetic source, each with its own (S, T) draws:
    the data stream of a Trainer (iterate; state_dict / load_state_dict; last_keys; stats)."""

    def __init__(self, source: MarkovSource | HiddenMarkovSource, sampler: ObjectiveSampler, *, length: int,
                 batch_size: int, seed: int = 0):
        self.source, self.sampler, self.length, self.batch_size = source, sampler, length, batch_size
        self.rng = np.random.default_rng(seed)
        self.batches = 0
        self.last_keys: list[int] = []
        self.stats = {"epoch": 0}

    def __iter__(self):
        while True:
            x = self.source.sample(self.batch_size, self.length, self.rng)
            specs = [self.sampler(self.length, self.rng) for _ in range(self.batch_size)]
            self.last_keys = [self.batches]
            self.batches += 1
            yield collate(x, specs, pad_id=0)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.batches = state["batches"]


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


def fit(source: MarkovSource | HiddenMarkovSource, sampler: ObjectiveSampler, *, length: int = 32, steps: int = 400,
        batch_size: int = 64, lr: float = 3e-3, seed: int = 0, model_config: ModelConfig | None = None,
        progress: bool = False) -> BigLearner:
    """Train a small BigLearner on fresh chain samples with AdamW + one-cycle cosine decay, on the
    Trainer's step (in process, no DeepSpeed: a LocalEngine)."""
    torch.manual_seed(seed)
    config = model_config or ModelConfig(vocab_size=source.vocab_size, d_model=64, n_layers=2, n_heads=4,
                                         ffn_hidden=128, attention_backend="torch")
    model = BigLearner(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    task = PretrainTask(config, length, peak=None, on_cpu=True, world_size=1)
    trainer = Trainer(LocalEngine(task.module(model), optimizer, schedule), SourceStream(
        source, sampler, length=length, batch_size=batch_size, seed=seed), task, TrainerConfig(max_steps=steps))
    iterator = range(steps)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="fit markov", unit="step")
    model.train()
    for step in iterator:
        trainer.train_step()
        if progress and (step + 1) % 10 == 0:
            iterator.set_postfix(loss=f"{trainer.log_window()['loss']:.3f}")
    return model.eval()


# --------------------------------------------------------------------------- masked diffusion

def mdm_nelbo(model: BigLearner, x: np.ndarray, rng: np.random.Generator, *, masks_per_length: int = 1,
              batch_size: int = 256) -> np.ndarray:
    """Per-sequence masked-diffusion NELBO in nats, an upper bound on the model's -log p(x):

        sum_{k=1}^{L} E_{M uniform among the k-subsets} [ (1/k) sum_{i in M} -log p(x_i | x_{not M}) ]

    This is the continuous-time bound of "Simple and Effective Masked Diffusion Language Models"
    (MDLM) and "Large Language Diffusion Models" (LLaDA), int_0^1 (1/t) E_{M ~ Bernoulli(t)^L}
    [sum_{i in M} -log p(x_i | x_{not M})] dt, with the integral over t done exactly: a mask of
    k tokens has weight int_0^1 (1/t) C(L,k) t^k (1-t)^(L-k) dt = 1/k. LLaDA evaluates likelihoods
    with this form because it has lower variance than drawing t. The only Monte Carlo left is the
    choice of `masks_per_length` random masks for each k."""
    n, length = x.shape
    rows, specs = [], []
    task = TASKS.index("mdm")
    for b in range(n):
        for k in range(1, length + 1):
            for _ in range(masks_per_length):
                is_masked = np.zeros(length, dtype=bool)
                is_masked[rng.choice(length, size=k, replace=False)] = True
                specs.append(make_split(length, np.flatnonzero(~is_masked), np.flatnonzero(is_masked),
                                        np.ones(k), task_id=task))
                rows.append(b)
    log_probs = model_target_log_probs(model, x[np.array(rows)], specs, batch_size)
    terms = np.array([-lp.sum() / len(lp) for lp in log_probs]).reshape(n, length * masks_per_length)
    return terms.sum(1) / masks_per_length


def position_entropy(samples: np.ndarray, vocab_size: int) -> np.ndarray:
    """Plug-in entropy (nats) of the tokens at each position across samples [n, L] -> [L]."""
    counts = np.stack([np.bincount(column, minlength=vocab_size) for column in samples.T]).astype(np.float64)
    p = counts / counts.sum(1, keepdims=True)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)


def sample_quality(source: MarkovSource | HiddenMarkovSource, samples: np.ndarray) -> dict:
    """Exact quality of generated sequences [n, L] under the true source: the mean -log q(x) per
    token (nats), the mean per-position entropy of the samples, and the source's exact mean
    per-position marginal entropy to read it against (collapsed samplers fall below it)."""
    n, length = samples.shape
    vocab = source.vocab_size
    # q(x_i = v) for every (i, v): one observed token per row.
    probe = np.tile(np.arange(vocab), length)[:, None].repeat(length, 1)
    observed = np.zeros_like(probe, dtype=bool)
    observed[np.arange(length * vocab), np.repeat(np.arange(length), vocab)] = True
    marginal = np.exp(source.log_marginal(probe, observed)).reshape(length, vocab)
    exact_entropy = -(marginal * np.log(np.where(marginal > 0, marginal, 1.0))).sum(1)
    nll = -source.log_marginal(samples, np.ones_like(samples, dtype=bool))
    return {"nll_per_token": float(nll.mean() / length),
            "position_entropy": float(position_entropy(samples, vocab).mean()),
            "source_position_entropy": float(exact_entropy.mean())}

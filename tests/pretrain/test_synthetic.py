"""Exact conditionals of the Markov source against enumeration, and the slow learning check."""
import itertools

import numpy as np
import pytest

from pretrain.objectives import ObjectiveConfig, ObjectiveSampler, eval_split
from pretrain.synthetic import MarkovSource, fit, model_target_log_probs


def brute_force_marginal(source, x, observed):
    total = 0.0
    length = len(x)
    for seq in itertools.product(range(source.n_states), repeat=length):
        if any(observed[t] and seq[t] != x[t] for t in range(length)):
            continue
        p = source.initial[seq[0]]
        for t in range(1, length):
            p *= source.transition[seq[t - 1], seq[t]]
        total += p
    return np.log(total)


def test_log_marginal_matches_enumeration():
    rng = np.random.default_rng()
    source = MarkovSource.random(3, 0.5, seed=int(rng.integers(1 << 30)))
    x = source.sample(6, 5, rng)
    observed = rng.random((6, 5)) < 0.5
    got = source.log_marginal(x, observed)
    for b in range(6):
        assert abs(got[b] - brute_force_marginal(source, x[b], observed[b])) < 1e-10


def test_target_log_probs_follow_the_grouping():
    """Per-target terms: singleton groups sum to log q(x_T | x_S); a shared group conditions
    each target on S only."""
    rng = np.random.default_rng()
    source = MarkovSource.random(4, 0.5, seed=int(rng.integers(1 << 30)))
    x = source.sample(1, 6, rng)
    spec = eval_split("joint", 6, rng)
    terms = source.target_log_probs(x, [spec])[0]
    assert abs(terms.sum() - source.log_marginal(x, np.ones((1, 6), bool))[0]) < 1e-10
    spec = ObjectiveSampler("mlm")(6, rng)  # one target, group 1
    source_mask = np.zeros((1, 6), bool)
    source_mask[0, spec.order[:spec.n_source]] = True
    both = source_mask.copy()
    both[0, spec.order[spec.n_source]] = True
    expected = source.log_marginal(x, both) - source.log_marginal(x, source_mask)
    assert abs(source.target_log_probs(x, [spec])[0][0] - expected[0]) < 1e-10


def test_samples_follow_the_chain():
    rng = np.random.default_rng()
    source = MarkovSource.random(3, 1.0, seed=3)
    x = source.sample(20000, 2, rng)
    counts = np.zeros((3, 3))
    np.add.at(counts, (x[:, 0], x[:, 1]), 1)
    np.testing.assert_allclose(counts / counts.sum(1, keepdims=True), source.transition, atol=0.03)


@pytest.mark.slow
def test_big_learner_reaches_the_exact_conditional_entropy():
    """After a few hundred CPU steps, NLL within 10% of exact for CLM, MLM-style and random (S, T)."""
    source = MarkovSource.random(8, 0.3, seed=1)
    sampler = ObjectiveSampler(ObjectiveConfig(name="mixture", mixture={"biglearn": 0.6, "clm": 0.2, "mlm": 0.2}))
    model = fit(source, sampler, length=32, steps=800, batch_size=64, lr=3e-3, seed=0)
    rng = np.random.default_rng(1)
    x = source.sample(512, 32, rng)
    for task in ("left_to_right", "mlm", "biglearn"):
        specs = [eval_split(task, 32, rng) for _ in range(512)]
        exact = -np.concatenate(source.target_log_probs(x, specs)).mean()
        learned = -np.concatenate(model_target_log_probs(model, x, specs)).mean()
        assert learned < 1.10 * exact, f"{task}: model {learned:.4f} vs exact {exact:.4f}"

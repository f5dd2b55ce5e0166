"""Exact conditionals of the Markov source against enumeration, and the slow learning check."""
import itertools

import numpy as np
import pytest

from pretrain.objectives import ObjectiveConfig, ObjectiveSampler, eval_split
from pretrain.experiments.synthetic import HiddenMarkovSource, MarkovSource, fit, model_target_log_probs


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


# --------------------------------------------------------------------------- hidden Markov model

def hmm_joint_table(source):
    """q(x) for every token sequence of length L, by summing over every hidden path."""
    n_hidden, vocab = source.emission.shape
    table = {}
    for xs in itertools.product(range(vocab), repeat=HMM_LENGTH):
        total = 0.0
        for hs in itertools.product(range(n_hidden), repeat=HMM_LENGTH):
            p = source.initial[hs[0]] * source.emission[hs[0], xs[0]]
            for t in range(1, HMM_LENGTH):
                p *= source.transition[hs[t - 1], hs[t]] * source.emission[hs[t], xs[t]]
            total += p
        table[xs] = total
    return table


def enumerated_log_prob(table, x, visible):
    """log q(x_visible) by summing the joint table over the sequences that agree on `visible`."""
    return np.log(sum(p for xs, p in table.items() if all(xs[t] == x[t] for t in visible)))


HMM_LENGTH = 5


def test_hmm_conditionals_match_enumeration():
    """Every per-target term log q(x_t | x_S, x_{T_<g}) of random splits, orders and groupings
    (the model's loss: each target of group g given S and groups < g) equals enumeration over
    all token sequences and hidden paths."""
    rng = np.random.default_rng()
    source = HiddenMarkovSource.random(n_hidden=3, n_symbols=3, stay=float(rng.uniform(0.5, 0.95)),
                                       seed=int(rng.integers(1 << 30)))
    table = hmm_joint_table(source)
    assert sum(table.values()) == pytest.approx(1.0, abs=1e-12)
    x = source.sample(8, HMM_LENGTH, rng)
    samplers = [ObjectiveSampler(name) for name in ("biglearn", "mlm", "span", "prefix_lm")]
    samplers.append(ObjectiveSampler(ObjectiveConfig(name="semi_ar")))  # several targets per group
    specs = [samplers[b % len(samplers)](HMM_LENGTH, rng) for b in range(len(x))]
    specs[0] = eval_split("joint", HMM_LENGTH, rng)
    for b, (spec, got) in enumerate(zip(specs, source.target_log_probs(x, specs))):
        source_positions = list(spec.order[:spec.n_source])
        targets = spec.order[spec.n_source:spec.n_source + spec.n_target]
        assert len(got) == spec.n_target
        for k, (t, group) in enumerate(zip(targets, spec.target_groups)):
            before = source_positions + list(targets[spec.target_groups < group])
            expected = enumerated_log_prob(table, x[b], before + [t]) - enumerated_log_prob(table, x[b], before)
            assert got[k] == pytest.approx(expected, abs=1e-10), (b, k)


def test_hmm_samples_follow_the_model():
    """Single-position and pair frequencies of samples match the enumerated marginals."""
    rng = np.random.default_rng()
    source = HiddenMarkovSource.random(n_hidden=2, n_symbols=3, stay=0.8, seed=int(rng.integers(1 << 30)))
    x = source.sample(40000, 2, rng)
    counts = np.zeros((3, 3))
    np.add.at(counts, (x[:, 0], x[:, 1]), 1)
    pairs = np.array([[source.log_marginal(np.array([[a, b]]), np.ones((1, 2), bool))[0] for b in range(3)]
                      for a in range(3)])
    np.testing.assert_allclose(counts / len(x), np.exp(pairs), atol=0.01)


def test_hmm_far_tokens_matter():
    """With the default (sticky) HMM the whole past predicts a token better than its neighbour
    alone: E[-log q(x_24 | x_<24)] (sampled) is below the exact H(x_24 | x_23) by > 0.1 nats."""
    source = HiddenMarkovSource.random(seed=int(np.random.default_rng().integers(1 << 30)))
    vocab, t = source.vocab_size, 24
    pairs = np.zeros((vocab * vocab, t + 1), dtype=np.int64)
    pairs[:, t - 1], pairs[:, t] = np.repeat(np.arange(vocab), vocab), np.tile(np.arange(vocab), vocab)
    both, previous = np.zeros((2, *pairs.shape), bool)
    both[:, [t - 1, t]] = previous[:, t - 1] = True
    joint = source.log_marginal(pairs, both)
    neighbour_entropy = -(np.exp(joint) * (joint - source.log_marginal(pairs, previous))).sum()
    x = source.sample(4000, t + 1, np.random.default_rng())
    past = np.ones(x.shape, bool)
    past[:, t] = False
    full_history = -(source.log_marginal(x, np.ones(x.shape, bool)) - source.log_marginal(x, past)).mean()
    assert full_history < neighbour_entropy - 0.1, (full_history, neighbour_entropy)


def test_hmm_bad_parameters():
    with pytest.raises(ValueError, match="stay"):
        HiddenMarkovSource.random(stay=1.0)

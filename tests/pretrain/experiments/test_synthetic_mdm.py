"""Masked-diffusion NELBO and exact sample quality on the synthetic ground truth."""
import itertools

import numpy as np
import pytest
import torch
from scipy import integrate

from pretrain.model import BigLearner, ModelConfig
from pretrain.objectives import ObjectiveSampler, SplitSpec
from pretrain.experiments.synthetic import (MarkovSource, fit, mdm_nelbo, model_target_log_probs, position_entropy,
                                sample_quality)


def test_nelbo_equals_the_integral_over_t_of_the_masked_loss():
    """Independent definition: int_0^1 (1/t) sum_M t^|M| (1-t)^(L-|M|) sum_{i in M} nll_i(M) dt over
    every mask M, by numerical quadrature."""
    rng = np.random.default_rng()
    torch.manual_seed(int(rng.integers(1 << 30)))
    length, vocab = 4, 5
    model = BigLearner(ModelConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32,
                                   attention_backend="torch")).double().eval()
    x = rng.integers(0, vocab, (2, length))
    masks = [m for k in range(1, length + 1) for m in itertools.combinations(range(length), k)]
    for b in range(len(x)):
        specs = [SplitSpec(np.array([p for p in range(length) if p not in m] + list(m), dtype=np.int32),
                           length - len(m), len(m), np.ones(len(m), dtype=np.int32), 0) for m in masks]
        nll = [-lp.sum() for lp in model_target_log_probs(model, x[[b] * len(masks)], specs)]
        integrand = lambda t: sum(t ** (len(m) - 1) * (1 - t) ** (length - len(m)) * v for m, v in zip(masks, nll))
        exact = integrate.fixed_quad(integrand, 0, 1, n=length)[0]  # Gauss-Legendre: exact for this polynomial
        estimate = mdm_nelbo(model, x[b:b + 1], rng, masks_per_length=300)[0]
        assert abs(estimate - exact) < 0.01 * exact


def test_sample_quality_of_the_source_itself_matches_its_exact_entropies():
    rng = np.random.default_rng()
    source = MarkovSource.random(n_states=4, seed=int(rng.integers(1000)))
    length = 3
    samples = source.sample(40000, length, rng)
    quality = sample_quality(source, samples)
    # Brute force over all V^L sequences: the entropy rate and the per-position marginals.
    everything = np.array(list(itertools.product(range(4), repeat=length)))
    log_q = source.log_marginal(everything, np.ones_like(everything, dtype=bool))
    q = np.exp(log_q)
    assert abs(q.sum() - 1) < 1e-9
    marginals = np.stack([np.bincount(everything[:, i], weights=q, minlength=4) for i in range(length)])
    exact_entropy = -(marginals * np.log(marginals)).sum(1).mean()
    assert abs(quality["source_position_entropy"] - exact_entropy) < 1e-9
    assert abs(quality["position_entropy"] - exact_entropy) < 0.02
    assert abs(quality["nll_per_token"] - float(-(q * log_q).sum()) / length) < 0.02


def test_position_entropy_of_constant_and_uniform_columns():
    samples = np.stack([np.zeros(8, dtype=np.int64), np.arange(8) % 4], axis=1)
    np.testing.assert_allclose(position_entropy(samples, 4), [0.0, np.log(4)])


@pytest.mark.slow
def test_nelbo_upper_bounds_the_exact_nll_and_approaches_it_with_training():
    rng = np.random.default_rng(0)
    source = MarkovSource.random(n_states=8, seed=3)
    length = 12
    x = source.sample(192, length, rng)
    exact = -source.log_marginal(x, np.ones_like(x, dtype=bool))
    gaps = []
    for steps in (60, 600):
        model = fit(source, ObjectiveSampler("mdm"), length=length, steps=steps, seed=1)
        difference = mdm_nelbo(model, x, rng, masks_per_length=2) - exact
        mean, se = difference.mean(), difference.std() / np.sqrt(len(difference))
        assert mean > 3 * se, f"after {steps} steps the NELBO is not above the exact NLL: gap {mean:.3f} ± {se:.3f}"
        gaps.append(mean)
    assert gaps[1] < 0.5 * gaps[0], f"the bound did not tighten with training: gaps {gaps}"

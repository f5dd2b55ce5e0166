"""BigLearn-GAN: what the generator and the discriminator see (by perturbing what they must not),
eq. (8) and the R1 penalty against direct and finite-difference computations, the metrics
against closed forms, and the config's one-line errors."""
import math

import numpy as np
import pytest
import torch

from pretrain.experiments.gan import metrics, objective, train
from pretrain.experiments.gan.config import GANConfig, GANExperiment
from pretrain.experiments.gan.model import Discriminator, Generator
from pretrain.experiments.vae.objective import biglearn_specs, split_specs
from pretrain.objectives import BigLearnConfig
from pretrain.train.composition import load

L, D = 16, 4
WIDE = BigLearnConfig(source_alpha=2, source_beta=2, target_alpha=2, target_beta=2)  # many S, T and dropped patches


def _models(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    config = GANConfig(d_model=32, n_heads=2, generator_layers=2, discriminator_layers=2, z_dim=6,
                       attention_backend="torch")
    generator, discriminator = Generator(config, L, D), Discriminator(config, L, D)
    with torch.no_grad():  # larger weights than the init, so every row's influence is visible
        for p in [*generator.parameters(), *discriminator.parameters()]:
            p.add_(0.2 * torch.randn_like(p))
    return generator.to(dtype).eval(), discriminator.to(dtype).eval()


def _roles(split: objective.TaskSplit):
    """Per sample: (S, T, dropped) patch indices, read back from the sorted layout."""
    b = split.batch
    out = []
    for i in range(len(b.groups)):
        order = b.positions[i].numpy()
        n_s, n_t = int(b.n_source[i]), int(b.n_target[i])
        source, target = order[:n_s], order[n_s:n_s + n_t]
        out.append((source, target, np.setdiff1d(np.arange(L), np.concatenate([source, target]))))
    return out


def _changed(x, where):
    y = x.clone()
    for b, idx in enumerate(where):
        y[b, idx] = torch.rand(len(idx), D) * 3 - 1
    return y


def test_generator_never_sees_x_T_and_reads_x_S_and_z():
    rng = np.random.default_rng()
    generator, _ = _models(int(rng.integers(1 << 30)))
    batch = 8
    split = objective.TaskSplit.of(biglearn_specs(L, batch, rng, WIDE), L)
    roles = _roles(split)
    x, z = torch.rand(batch, L, D), torch.randn(batch, 6)
    with torch.no_grad():
        base = objective.generate(generator, x, split, z)
        # Every value outside S (the targets' own, the other targets', the dropped patches') changed.
        blind = objective.generate(generator, _changed(x, [np.concatenate([t, r]) for _, t, r in roles]), split, z)
        with_s = [i for i, (s, _, _) in enumerate(roles) if len(s)]
        other_source = objective.generate(generator, _changed(x, [s[:1] for s, _, _ in roles]), split, z)
        other_z = objective.generate(generator, x, split, z + 1)
    targets = split.target_pixels
    torch.testing.assert_close(base[targets], blind[targets], rtol=0, atol=1e-6)
    torch.testing.assert_close(base[~targets], x[~targets], rtol=0, atol=0)  # only T is written
    assert with_s and all((base[i][targets[i]] - other_source[i][targets[i]]).abs().max() > 1e-4 for i in with_s)
    assert all((base[i][targets[i]] - other_z[i][targets[i]]).abs().max() > 1e-4 for i in range(batch))
    # Joint generation (S = {}): nothing of x is read at all.
    joint = objective.TaskSplit.of(split_specs([[]] * batch, [rng.permutation(L) for _ in range(batch)], L), L)
    with torch.no_grad():
        torch.testing.assert_close(objective.generate(generator, x, joint, z),
                                   objective.generate(generator, torch.rand(batch, L, D), joint, z), rtol=0, atol=1e-6)


def test_discriminator_sees_exactly_S_and_T_and_which_is_which():
    rng = np.random.default_rng()
    _, discriminator = _models(int(rng.integers(1 << 30)))
    batch = 8
    specs = biglearn_specs(L, batch, rng, WIDE)
    split = objective.TaskSplit.of(specs, L)
    roles = _roles(split)
    x = torch.rand(batch, L, D)
    with torch.no_grad():
        base = objective.discriminate(discriminator, x, split)
        dropped = objective.discriminate(discriminator, _changed(x, [r for _, _, r in roles]), split)
        target = objective.discriminate(discriminator, _changed(x, [t[:1] for _, t, _ in roles]), split)
        # The same S u T with the roles swapped where both are non-empty: the [M_s] / [M_t] types matter.
        swapped = [i for i, (s, t, _) in enumerate(roles) if len(s) and len(t)]
        swap = objective.TaskSplit.of(split_specs([roles[i][1] for i in swapped], [roles[i][0] for i in swapped], L), L)
        swapped_f = objective.discriminate(discriminator, x[swapped], swap)
    torch.testing.assert_close(base, dropped, rtol=0, atol=1e-6)
    assert (base - target).abs().min() > 1e-5
    assert swapped and (base[swapped] - swapped_f).abs().min() > 1e-5


def _finite_difference_penalty(discriminator, x, split, eps=1e-6):
    """||grad_{x_T} f||^2 per sample by central differences, coordinate by coordinate (float64)."""
    penalty = torch.zeros(len(x), dtype=x.dtype)
    with torch.no_grad():
        for patch in range(L):
            for dim in range(D):
                step = torch.zeros_like(x)
                step[:, patch, dim] = eps
                grad = (objective.discriminate(discriminator, x + step, split)
                        - objective.discriminate(discriminator, x - step, split)) / (2 * eps)
                penalty += grad ** 2 * split.target_pixels[:, patch]
    return penalty


def test_r1_penalty_and_its_parameter_gradient_against_finite_differences():
    rng = np.random.default_rng()
    _, discriminator = _models(int(rng.integers(1 << 30)), torch.float64)
    batch = 4
    split = objective.TaskSplit.of(biglearn_specs(L, batch, rng, WIDE), L)
    x = torch.rand(batch, L, D, dtype=torch.float64)
    logits, penalty = objective.r1_penalty(discriminator, x, split)
    torch.testing.assert_close(logits, objective.discriminate(discriminator, x, split).detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(penalty.detach(), _finite_difference_penalty(discriminator, x, split), rtol=1e-6, atol=1e-9)
    # d(penalty)/d(phi) through the double backward, against central differences of the penalty
    # (whose value is checked above) in a few random discriminator weights.
    penalty.sum().backward()
    params = [discriminator.patch_in.weight, discriminator.trunk.blocks[0].wq.weight,
              discriminator.trunk.blocks[-1].w_down.weight, discriminator.trunk.blocks[0].attn_norm.weight]
    for p in params:
        index = tuple(int(rng.integers(n)) for n in p.shape)
        with torch.no_grad():
            original = p[index].item()
            values = []
            for sign in (1, -1):
                p[index] = original + sign * 1e-5
                values.append(objective.r1_penalty(discriminator, x, split)[1].sum().item())
            p[index] = original
        assert math.isclose(p.grad[index].item(), (values[0] - values[1]) / 2e-5, rel_tol=1e-4, abs_tol=1e-8), p.shape


def test_losses_are_eq_8_with_r1():
    rng = np.random.default_rng()
    _, discriminator = _models(int(rng.integers(1 << 30)), torch.float64)
    batch, gamma = 5, float(rng.uniform(0.5, 20))
    split = objective.TaskSplit.of(biglearn_specs(L, batch, rng, WIDE), L)
    real, fake = torch.rand(batch, L, D, dtype=torch.float64), torch.rand(batch, L, D, dtype=torch.float64)
    f_real, f_fake = (objective.discriminate(discriminator, v, split).detach() for v in (real, fake))
    penalty = _finite_difference_penalty(discriminator, real, split)
    expected = -torch.log(torch.sigmoid(f_real)).mean() - torch.log(1 - torch.sigmoid(f_fake)).mean()
    loss, stats = objective.discriminator_loss(discriminator, real, fake, split, gamma)
    torch.testing.assert_close(loss.detach(), expected + gamma / 2 * penalty.mean(), rtol=1e-6, atol=1e-8)
    without_r1, _ = objective.discriminator_loss(discriminator, real, fake, split, 0.0)  # one stacked pass
    torch.testing.assert_close(without_r1.detach(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(objective.generator_loss(discriminator, fake, split).detach(),
                               -torch.log(torch.sigmoid(f_fake)).mean(), rtol=1e-10, atol=1e-10)


def test_communication_term_is_eq_12_against_one_sample_at_a_time():
    """Eq. (12) with (S1, T1) = ({}, S u T) and (S2, T2) = each sample's draw, from single-sample
    splits built from the roles read back from the layout (not from joint_over_union)."""
    rng = np.random.default_rng()
    _, discriminator = _models(int(rng.integers(1 << 30)), torch.float64)
    batch = 6
    split = objective.TaskSplit.of(biglearn_specs(L, batch, rng, WIDE), L)
    joint = objective.joint_over_union(split)
    joint_fake, fake = torch.rand(batch, L, D, dtype=torch.float64), torch.rand(batch, L, D, dtype=torch.float64)
    d_terms, g_terms = [], []
    for i, (source, target, _) in enumerate(_roles(split)):
        def f(x, s, t):
            one = objective.TaskSplit.of(split_specs([s], [t], L), L)
            return objective.discriminate(discriminator, x[i:i + 1], one).item()
        union = np.concatenate([source, target])
        first = f(joint_fake, source, target) - f(joint_fake, [], union)  # x1 ~ p(x_U): f(x1; S2, T2) - f(x1; S1, T1)
        second = f(fake, [], union) - f(fake, source, target)  # x2 ~ p(x_T | x_S): f(x2; S1, T1) - f(x2; S2, T2)
        d_terms.append(-math.log(1 / (1 + math.exp(-first))) - math.log(1 / (1 + math.exp(-second))))
        g_terms.append(-math.log(1 / (1 + math.exp(first))) - math.log(1 / (1 + math.exp(second))))
    for source, target, _ in _roles(joint):
        assert len(source) == 0
    assert [sorted(t) for _, t, _ in _roles(joint)] == [sorted(np.concatenate([s, t])) for s, t, _ in _roles(split)]
    with torch.no_grad():
        d_loss = objective.communication_loss(discriminator, joint_fake, fake, split, joint)
        g_loss = objective.communication_loss(discriminator, joint_fake, fake, split, joint, generator=True)
    assert d_loss.item() == pytest.approx(np.mean(d_terms), rel=1e-9)
    assert g_loss.item() == pytest.approx(np.mean(g_terms), rel=1e-9)


def test_joint_fraction_mixes_the_joint_task_into_the_biglearn_splits():
    rng = np.random.default_rng()
    n = 4000
    for fraction in (0.0, 0.3, 1.0):
        experiment = load_experiment([f"objective.joint_fraction={fraction}", "objective.source_alpha=0.5",
                                      "objective.source_beta=3"])  # the paper's S-ratio Beta
        roles = _roles(train.splits("biglearn_gan", L, n, rng, experiment))
        joint = np.array([len(s) == 0 and len(t) == L for s, t, _ in roles])
        # Drawn splits are the joint task on their own with probability P(S = {}) P(T = all | S = {}):
        # ~10% with the paper's Betas (docs/capabilities.md), estimated here from fraction 0.
        if fraction == 0.0:
            base = joint.mean()
            assert 0.05 < base < 0.2
        expected = fraction + (1 - fraction) * base
        assert abs(joint.mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9, fraction
    assert all(len(s) == 0 and len(t) == L for s, t, _ in _roles(train.splits("gan", L, 50, rng, experiment)))


def test_frechet_distance_against_closed_forms():
    rng = np.random.default_rng()
    k = int(rng.integers(2, 9))
    mean_a, mean_b = rng.normal(size=k), rng.normal(size=k)
    a, b = rng.normal(size=(k, k)), rng.normal(size=(k, k))
    cov_a, cov_b = a @ a.T + 0.1 * np.eye(k), b @ b.T + 0.1 * np.eye(k)
    # The Frechet distance as usually written, with scipy's general matrix square root of C_a C_b.
    from scipy.linalg import sqrtm
    w2 = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * np.trace(sqrtm(cov_a @ cov_b)).real
    assert math.isclose(metrics.frechet_from_moments(mean_a, cov_a, mean_b, cov_b), w2, rel_tol=1e-8, abs_tol=1e-8)
    # Diagonal covariances: sum of (m_a - m_b)^2 + (s_a - s_b)^2 per coordinate.
    s_a, s_b = rng.uniform(0.1, 2, size=k), rng.uniform(0.1, 2, size=k)
    assert math.isclose(metrics.frechet_from_moments(mean_a, np.diag(s_a ** 2), mean_b, np.diag(s_b ** 2)),
                        ((mean_a - mean_b) ** 2 + (s_a - s_b) ** 2).sum(), rel_tol=1e-8)
    # From samples: the moments of the samples, and 0 for a set against itself.
    features = rng.normal(size=(300, k)) @ a + mean_a
    other = rng.normal(size=(200, k)) @ b + mean_b
    assert math.isclose(metrics.frechet_distance(features, other),
                        metrics.frechet_from_moments(features.mean(0), np.cov(features.T), other.mean(0), np.cov(other.T)))
    assert abs(metrics.frechet_distance(features, features)) < 1e-6
    # Singular covariances (a feature that is 0 everywhere, a dead ReLU unit): still the closed form.
    dead = np.concatenate([features, np.zeros((300, 1))], 1)
    assert math.isclose(metrics.frechet_distance(dead, np.concatenate([other, np.zeros((200, 1))], 1)),
                        metrics.frechet_distance(features, other), rel_tol=1e-6)


def test_class_coverage_and_pairwise_distance_against_direct_definitions():
    rng = np.random.default_rng()
    assert metrics.class_coverage(np.repeat(np.arange(10), 7)) == pytest.approx((math.log(10), 0.1))
    assert metrics.class_coverage(np.full(20, 3)) == (0.0, 0.0) and f"{metrics.class_coverage(np.full(20, 3))[0]:.3f}" == "0.000"
    labels = rng.integers(0, 4, size=50)
    shares = np.bincount(labels, minlength=10) / 50
    assert metrics.class_coverage(labels) == pytest.approx((-sum(p * math.log(p) for p in shares if p), 0.0))
    samples = rng.random((6, 8, 8))
    pairs = [np.linalg.norm(samples[i] - samples[j]) for i in range(6) for j in range(i + 1, 6)]
    assert metrics.mean_pairwise_distance(samples) == pytest.approx(np.mean(pairs))


def test_nearest_on_source_against_a_loop():
    rng = np.random.default_rng()
    x, pool = rng.random((7, L, D)), rng.random((30, L, D))
    source = objective.source_masks(7, L, 0.4, rng)
    expected = [int(np.argmin([((x[i] - p) ** 2)[source[i]].sum() for p in pool])) for i in range(7)]
    assert metrics.nearest_on_source(x, source, pool).tolist() == expected
    assert (metrics.nearest_on_source(pool[:5], np.ones((5, L), dtype=bool), pool) == np.arange(5)).all()


def test_source_masks_and_splits():
    rng = np.random.default_rng()
    for ratio in (0.0, 0.3, 1.0):
        masks = objective.source_masks(50, L, ratio, rng)
        assert (masks.sum(1) == min(L - 1, round(ratio * L))).all()
        split = objective.source_splits(masks)
        torch.testing.assert_close(split.target_pixels, torch.from_numpy(~masks))
    with pytest.raises(ValueError, match="at least one target"):
        objective.source_splits(np.ones((2, L), dtype=bool))


def test_init_std_null_is_the_fan_in_scale_and_a_number_is_taken_as_is():
    torch.manual_seed(0)
    for init_std, std in ((None, 64 ** -0.5), (0.02, 0.02)):
        config = GANConfig(d_model=64, n_heads=4, init_std=init_std)
        for network in (Generator(config, L, D), Discriminator(config, L, D)):
            weights = torch.cat([block.wq.weight.flatten() for block in network.trunk.blocks])
            assert abs(weights.std().item() / std - 1) < 0.05, (type(network).__name__, weights.std().item(), std)


def load_experiment(overrides):
    return load(overrides, cls=GANExperiment, config_name="gan_digits")


@pytest.mark.parametrize("override, message", [
    ("train.r1_weight=-1", r"^train.r1_weight must be a number >= 0"),
    ("eval.completion_ratios=[0.5,1.5]", r"^eval.completion_ratios must be S-ratios in \[0, 1\]"),
    ("objective.source_alpha=0", r"^objective.source_alpha must be a positive number"),
    ("model.generator_layers=0", r"^model.generator_layers must be a positive integer"),
    ("objective.joint_fraction=1.5", r"^objective.joint_fraction must be a probability in \[0, 1\]"),
    ("objective.communication_weight=-0.5", r"^objective.communication_weight must be a number >= 0"),
    ("objective.communication_weight=nan", r"^objective.communication_weight must be a finite number"),
    ("model.init_std=0", r"^model.init_std must be a positive number or null"),
    ("model.init_std=-0.02", r"^model.init_std must be a positive number or null"),
    ("model.init_std=true", r"^config key model.init_std=True: expected float or None"),
])
def test_bad_configuration_is_a_one_line_error_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message) as err:
        load_experiment([override])
    assert "\n" not in str(err.value)


def test_the_entry_config_holds_the_documented_task_distribution():
    experiment = load_experiment([])
    o = experiment.objective
    assert (o.source_alpha, o.source_beta, o.target_alpha, o.target_beta) == (1.0, 1.0, 3.0, 0.5)
    assert (o.joint_fraction, o.communication_weight) == (0.5, 0.0)
    assert experiment.train.r1_weight >= 0 and experiment.eval.completion_ratios == [0.1, 0.3, 0.5, 0.7, 0.9]

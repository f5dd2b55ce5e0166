"""BigLearn-VAE: Gaussian algebra, the ELBO against an independent computation, visibility of
the encoding and decoding rows, patch tokens and their bad-input errors."""
import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from biglearn_kernels import INVALID_GROUP
from pretrain.train.composition import load
from pretrain.experiments.vae import gaussian, objective, patches
from pretrain.experiments.vae.config import VAEConfig, VAEExperiment
from pretrain.experiments.vae.model import BigLearnVAE, JointVAE

L, D = 16, 4


def _model(cls, seed, **overrides):
    torch.manual_seed(seed)
    model = cls(VAEConfig(d_model=32, n_heads=2, n_layers=3, encoder_layers=1, z_dim=6, attention_backend="torch",
                          **overrides), D).eval()
    with torch.no_grad():  # larger weights than the init, so every row's influence is visible
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def test_gaussian_log_prob_and_kl_match_torch_distributions():
    rng = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    x, mean_q, mean_p = (torch.randn(5, 7, generator=rng, dtype=torch.float64) for _ in range(3))
    logvar_q, logvar_p = (2 * torch.randn(5, 7, generator=rng, dtype=torch.float64) for _ in range(2))
    q, p = Normal(mean_q, torch.exp(0.5 * logvar_q)), Normal(mean_p, torch.exp(0.5 * logvar_p))
    torch.testing.assert_close(gaussian.log_prob(x, mean_q, logvar_q), q.log_prob(x))
    torch.testing.assert_close(gaussian.kl(mean_q, logvar_q, mean_p, logvar_p), kl_divergence(q, p))
    # Closed form against the standard normal: KL = (mu^2 + sigma^2 - 1 - log sigma^2) / 2.
    zeros = torch.zeros_like(mean_q)
    torch.testing.assert_close(gaussian.kl(mean_q, logvar_q, zeros, zeros),
                               0.5 * (mean_q ** 2 + logvar_q.exp() - 1 - logvar_q))
    noise = torch.randn(5, 7, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(gaussian.sample(mean_q, logvar_q, noise), mean_q + logvar_q.exp().sqrt() * noise)


@pytest.mark.parametrize("cls", [BigLearnVAE, JointVAE])
def test_elbo_with_empty_source_is_the_joint_elbo(cls):
    """BigLearnELBO with S empty, T = all (targets stored in a random order) equals eq. (1)'s
    JointELBO computed here directly: natural patch order, torch.distributions, same weights."""
    rng = np.random.default_rng()
    model = _model(cls, int(rng.integers(1 << 30)))
    batch, beta = 5, float(rng.uniform(0.01, 1))
    x = torch.rand(batch, L, D)
    noise = torch.randn(batch, model.config.z_dim)
    specs = objective.split_specs([[]] * batch, [rng.permutation(L) for _ in range(batch)], L)
    got = objective.elbo(model, x, objective.patch_batch(specs, L), beta, noise)

    with torch.no_grad():
        positions = torch.arange(L).expand(batch, L)
        everything = torch.zeros(batch, L, dtype=torch.int32)
        nothing = torch.full((batch, L), INVALID_GROUP, dtype=torch.int32)
        q_mean, q_logvar = model.encode(x, positions, everything)
        if cls is BigLearnVAE:  # the universal model's prior is p(z | x_S) with S empty
            p_mean, p_logvar = model.encode(x, positions, nothing)
        else:
            p_mean, p_logvar = torch.zeros_like(q_mean), torch.zeros_like(q_logvar)
        q = Normal(q_mean, torch.exp(0.5 * q_logvar))
        z = q.mean + q.stddev * noise
        x_mean, x_logvar = model.decode(z, x, positions, nothing, positions, torch.ones(batch, L, dtype=torch.int32))
        log_lik = Normal(x_mean, torch.exp(0.5 * x_logvar)).log_prob(x).sum((1, 2))
        kl = kl_divergence(q, Normal(p_mean, torch.exp(0.5 * p_logvar))).sum(-1)
    torch.testing.assert_close(got["log_lik"], log_lik, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["kl"], kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["elbo"], log_lik - beta * kl, rtol=1e-5, atol=1e-4)


def test_both_models_have_the_same_parameter_count():
    rng = np.random.default_rng()
    for _ in range(3):
        n_layers = int(rng.integers(2, 6))
        config = VAEConfig(d_model=16 * int(rng.integers(1, 5)), n_heads=2, n_layers=n_layers,
                           encoder_layers=int(rng.integers(1, n_layers)), z_dim=int(rng.integers(1, 20)))
        patch_dim = int(rng.integers(1, 13))
        assert BigLearnVAE(config, patch_dim).num_parameters() == JointVAE(config, patch_dim).num_parameters()


def _changed(x, where):
    """x with fresh values at patch indices `where` (per sample: list of index arrays)."""
    y = x.clone()
    for b, idx in enumerate(where):
        y[b, idx] = torch.rand(len(idx), D) * 3
    return y


def test_encoding_row_sees_only_the_observed_patches():
    rng = np.random.default_rng()
    model = _model(BigLearnVAE, int(rng.integers(1 << 30)))
    batch = 6
    x = torch.rand(batch, L, D)
    observed = rng.random((batch, L)) < rng.uniform(0.1, 0.9, size=(batch, 1))
    observed[np.arange(batch), rng.integers(L, size=batch)] = True
    with torch.no_grad():
        base = objective.encode_observed(model, x, observed)
        hidden = objective.encode_observed(model, _changed(x, [np.flatnonzero(~o) for o in observed]), observed)
        seen = objective.encode_observed(model, _changed(x, [np.flatnonzero(o)[:1] for o in observed]), observed)
    for a, b in zip(base, hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (base[0] - seen[0]).abs().amax(1).min() > 1e-4  # every sample reacts to its S patches

    # The training path: p(z | x_S) of the (S, T) batch ignores T, p(z | x_{S u T}) does not.
    specs = objective.biglearn_specs(L, batch, rng, objective.BigLearnConfig(source_alpha=2, source_beta=2))
    lay = objective.layout(x, objective.patch_batch(specs, L))
    targets = [s.order[s.n_source:s.n_source + s.n_target] for s in specs]
    lay_t = objective.layout(_changed(x, targets), objective.patch_batch(specs, L))
    with torch.no_grad():
        (post, _), (prior, _) = model.encode_pair(lay.rows, lay.positions, lay.union_groups, lay.source_groups)
        (post_t, _), (prior_t, _) = model.encode_pair(lay_t.rows, lay_t.positions, lay_t.union_groups,
                                                      lay_t.source_groups)
    torch.testing.assert_close(prior, prior_t, rtol=0, atol=1e-6)
    assert (post - post_t).abs().amax(1).min() > 1e-4


def test_decoding_never_sees_its_own_value_or_other_targets():
    rng = np.random.default_rng()
    model = _model(BigLearnVAE, int(rng.integers(1 << 30)))
    batch = 6
    x = torch.rand(batch, L, D)
    source = rng.random((batch, L)) < 0.4
    source[:, 0], source[:, 1] = True, False  # at least one S patch and one target each
    z = torch.randn(batch, model.config.z_dim)
    with torch.no_grad():
        base = objective.decode_into(model, x, source, z)
        other_targets = objective.decode_into(model, _changed(x, [np.flatnonzero(~s) for s in source]), source, z)
        other_source = objective.decode_into(model, _changed(x, [np.flatnonzero(s)[:1] for s in source]), source, z)
        other_z = objective.decode_into(model, x, source, z + 1)
    mask = torch.from_numpy(~source)
    torch.testing.assert_close(base[mask], other_targets[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(base[~mask], x[~mask], rtol=0, atol=0)  # S is returned unchanged
    assert (base[mask] - other_source[mask]).abs().max() > 1e-4
    assert (base[mask] - other_z[mask]).abs().max() > 1e-4


def test_patches_round_trip_in_row_major_order():
    rng = np.random.default_rng()
    images = rng.random((3, 6, 4, 2)).astype(np.float32)
    tokens = patches.patchify(images, 2)
    assert tokens.shape == (3, 6, 8)
    np.testing.assert_array_equal(tokens[:, 1], images[:, 0:2, 2:4].reshape(3, 8))  # second patch: top right
    np.testing.assert_array_equal(patches.unpatchify(tokens, (6, 4, 2), 2), images)
    train, train_y, test, test_y = patches.load_digits_split()
    assert train.shape[1:] == (8, 8) and 0 <= train.min() and train.max() <= 1 and len(test) == len(test_y) == 540
    assert patches.patchify(train, 2).shape == (len(train), 16, 4)


def test_bad_images_give_one_line_errors_naming_the_field():
    good = np.zeros((8, 8))
    with pytest.raises(ValueError, match=r"^images\[2\] has shape \(8, 9\), expected \(8, 8\)") as err:
        patches.patchify([good, good, np.zeros((8, 9))], 2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^patch_size=3 does not divide the 8x8 images of data.train_images$"):
        patches.patchify(np.zeros((2, 8, 8)), 3, "data.train_images")
    nan = np.zeros((4, 8, 8))
    nan[3, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"^data.test_images\[3\] has NaN or infinite pixels"):
        patches.patchify(nan, 2, "data.test_images")
    with pytest.raises(ValueError, match="model.encoder_layers must be below model.n_layers=3"):
        load_experiment(["model.n_layers=3", "model.encoder_layers=3"])
    with pytest.raises(ValueError, match=r"^train.kl_weight must be a number >= 0"):
        load_experiment(["train.kl_weight=-1"])


def load_experiment(overrides):
    return load(overrides, cls=VAEExperiment, config_name="vae_digits")


def test_the_experiment_config_composes_its_own_entry_config():
    """configs/vae_digits.yaml composes onto VAEExperiment: the text model's groups are not part of it."""
    experiment = load_experiment(["train.steps=7"])
    assert experiment.train.steps == 7 and experiment.model.decoder_std == 0.1 and experiment.data.patch_size == 2
    with pytest.raises(ValueError, match="trainer"):
        load_experiment(["trainer.max_steps=3"])


def test_a_cpu_time_budget_stops_training_and_sizes_the_schedule():
    """train.cpu_minutes: both models train for the same CPU time (steps is only an upper bound),
    the cosine decay ends near the budget, and the learning curve spans it."""
    from pretrain.experiments.vae import train
    experiment = load_experiment(["model.d_model=16", "model.n_heads=2", "model.n_layers=2", "model.encoder_layers=1",
                                  "model.z_dim=4", "train.batch_size=8", "train.steps=100000", "train.warmup_steps=2",
                                  "train.cpu_minutes=0.01", "eval.curve_points=3"])
    x = torch.rand(20, L, D)
    calls = []
    model, curve = train.fit("vae", x, experiment, progress=False,
                             evaluate=lambda m: calls.append(m.training) or {"elbo": 0.0})
    assert 0.6 <= curve[-1]["cpu_seconds"] < 0.6 + 5  # stops at the first step past 0.6 CPU seconds
    assert 10 < curve[-1]["step"] < 100000 and not calls[0]  # evaluated in eval mode
    assert len(curve) in (3, 4) and [p["step"] for p in curve] == sorted({p["step"] for p in curve})


def test_a_learned_decoder_variance_is_one_shared_parameter():
    for cls in (BigLearnVAE, JointVAE):
        fixed, learned = _model(cls, 0), _model(cls, 0, learn_decoder_std=True)
        assert learned.num_parameters() == fixed.num_parameters() + 1
        x, z = torch.rand(3, L, D), torch.randn(3, 6)
        positions = torch.arange(L).expand(3, L)
        nothing = torch.full((3, L), INVALID_GROUP, dtype=torch.int32)
        _, logvar = learned.decode(z, x, positions, nothing, positions, torch.ones(3, L, dtype=torch.int32))
        owner = learned.net if cls is BigLearnVAE else learned.decoder
        assert torch.equal(logvar, owner.decoder_logvar.expand_as(logvar)) and logvar.requires_grad
    assert BigLearnVAE(VAEConfig(learn_decoder_std=True), D).num_parameters() == \
        JointVAE(VAEConfig(learn_decoder_std=True), D).num_parameters()

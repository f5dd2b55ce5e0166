"""bench/gmm.py (the 25-GMM exploration simulation) against independent definitions: closed-form and
grid-integrated KLs, sampling, brute-force conditionals, hand-built coverage cases, EM's monotonicity,
and the script run exactly as a user types it."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
ARMS = ["joint", "biglearn", "biglearn_conditional", "joint_em", "biglearn_em"]


@pytest.fixture(scope="module")
def gmm():
    spec = importlib.util.spec_from_file_location("gmm_bench", ROOT / "bench" / "gmm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_gmm(k, generator, spread=2.0):
    """A GMM with k components, full covariances (Cholesky entries), float64."""
    mu = spread * torch.randn(k, 2, generator=generator, dtype=torch.float64)
    raw = 0.4 * torch.randn(k, 3, generator=generator, dtype=torch.float64)
    return mu, (raw[:, 0].exp(), raw[:, 1], raw[:, 2].exp())


def cov_of(chol):
    l11, l21, l22 = chol
    L = torch.zeros(*l11.shape, 2, 2, dtype=l11.dtype)
    L[..., 0, 0], L[..., 1, 0], L[..., 1, 1] = l11, l21, l22
    return L @ L.transpose(-1, -2)


def grid_logpdf(points, mu, cov):
    """Independent density: a uniform mixture of scipy multivariate normals."""
    dens = np.mean([stats.multivariate_normal(m, c).pdf(points) for m, c in zip(mu.numpy(), cov.numpy())], 0)
    return np.log(dens)


def test_reverse_kl_estimator_matches_the_closed_form_for_single_gaussians(gmm):
    g = torch.Generator().manual_seed(0)
    mu_p, chol_p = torch.tensor([[0.3, -0.5]], dtype=torch.float64), (torch.tensor([0.8]), torch.tensor([0.3]), torch.tensor([0.6]))
    chol_p = tuple(c.double() for c in chol_p)
    mu_q, chol_q = torch.tensor([[-0.2, 0.4]], dtype=torch.float64), tuple(torch.tensor([v], dtype=torch.float64) for v in (1.1, -0.2, 0.9))
    x = gmm.sample_gmm(mu_p, chol_p, 200000, g)
    values = gmm.gmm_logpdf(x, mu_p, chol_p) - gmm.gmm_logpdf(x, mu_q, chol_q)
    sp, sq = cov_of(chol_p)[0].numpy(), cov_of(chol_q)[0].numpy()
    d = (mu_q - mu_p)[0].numpy()
    closed = 0.5 * (np.trace(np.linalg.solve(sq, sp)) + d @ np.linalg.solve(sq, d) - 2
                    + np.log(np.linalg.det(sq) / np.linalg.det(sp)))
    se = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean()) - closed) < 4 * se + 1e-12, (float(values.mean()), closed, se)


def test_reparameterised_gradient_matches_the_closed_form_gradient(gmm):
    """d/dm KL[N(m, s^2 I) || N(0, I)] = m: the pathwise gradient through the samples is unbiased."""
    g = torch.Generator().manual_seed(1)
    mu = torch.tensor([[0.7, -1.2]], dtype=torch.float64, requires_grad=True)
    raw = torch.tensor([[math.log(0.5), 0.0, math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    chol = gmm.chol_from_raw(raw)
    x = gmm.sample_gmm(mu, chol, 100000, g)
    zero = (torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    (gmm.gmm_logpdf(x, mu, chol) - gmm.gmm_logpdf(x, torch.zeros(1, 2, dtype=torch.float64), zero)).mean().backward()
    assert torch.allclose(mu.grad, mu.detach(), atol=0.02)
    # d/d log s of KL = 2 (s^2 - 1) / 2 * ... per axis: s^2 - 1 = -0.75
    assert torch.allclose(raw.grad[0, [0, 2]], torch.tensor([-0.75, -0.75], dtype=torch.float64), atol=0.03)


def test_held_out_kls_match_grid_integration_against_the_25_gmm_target(gmm):
    """A 25-component model near the target grid: evaluate()'s Monte-Carlo reverse/forward KL and
    log-likelihood agree with numerical integration on a fine grid."""
    g = torch.Generator().manual_seed(2)
    mu = gmm.target_means() + 0.3 * torch.randn(25, 2, generator=g, dtype=torch.float64)
    raw = torch.log(torch.tensor([0.3, 1.0, 0.2], dtype=torch.float64)).repeat(25, 1)
    raw[:, 1] = 0.05 * torch.randn(25, generator=g, dtype=torch.float64)
    chol = gmm.chol_from_raw(raw)
    target_x = gmm.sample_gmm(gmm.target_means(), gmm.target_chol(), 100000, torch.Generator().manual_seed(3))
    metrics = gmm.evaluate(mu, chol, target_x, 100000, torch.Generator().manual_seed(4))
    lin = np.linspace(-7, 7, 561)
    h = lin[1] - lin[0]
    pts = np.stack(np.meshgrid(lin, lin, indexing="ij"), -1).reshape(-1, 2)
    log_p = grid_logpdf(pts, mu, cov_of(chol))
    log_q = grid_logpdf(pts, gmm.target_means(), gmm.TARGET_VAR * torch.eye(2, dtype=torch.float64).repeat(25, 1, 1))
    p, q = np.exp(log_p), np.exp(log_q)
    reverse, forward = (p * (log_p - log_q)).sum() * h * h, (q * (log_q - log_p)).sum() * h * h
    loglik = (q * log_p).sum() * h * h
    for name, exact in (("reverse_kl", reverse), ("forward_kl", forward), ("log_likelihood", loglik)):
        value, se = metrics[name]
        assert abs(value - exact) < 4 * se + 0.01, (name, value, exact, se)


def test_a_projected_gmm_is_the_gmm_of_projected_components(gmm):
    g = torch.Generator().manual_seed(5)
    mu, chol = random_gmm(5, g)
    a = torch.tensor([math.cos(0.8), math.sin(0.8)], dtype=torch.float64)
    y = (gmm.sample_gmm(mu, chol, 50000, g) @ a).numpy()
    m, v = gmm.project(mu, chol, a)
    mixture_cdf = lambda t, s: np.mean([stats.norm(mk, sk).cdf(t) for mk, sk in zip(m.numpy(), s)], 0)  # noqa: E731
    assert stats.kstest(y, lambda t: mixture_cdf(t, np.sqrt(v.numpy()))).pvalue > 0.01
    # control: the same means with the diagonal-only variance (a_1^2 S11 + a_2^2 S22) is rejected
    cov = cov_of(chol).numpy()
    wrong = np.sqrt(a[0].item() ** 2 * cov[:, 0, 0] + a[1].item() ** 2 * cov[:, 1, 1])
    assert stats.kstest(y, lambda t: mixture_cdf(t, wrong)).pvalue < 1e-4
    # and the 1-D log-density of the projection is the mixture of the projected normals
    t = torch.linspace(-6, 6, 7, dtype=torch.float64)
    expected = np.log(np.mean([stats.norm(mk, sk).pdf(t.numpy()) for mk, sk in zip(m.numpy(), np.sqrt(v.numpy()))], 0))
    assert np.allclose(gmm.gmm_logpdf1(t, m, v).numpy(), expected)


def test_conditional_density_matches_brute_force_integration(gmm):
    g = torch.Generator().manual_seed(6)
    mu, chol = random_gmm(4, g, spread=1.5)
    angle = 1.1
    a = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    b = torch.tensor([-math.sin(angle), math.cos(angle)], dtype=torch.float64)
    R = torch.stack((a, b))
    grid2 = torch.linspace(-15, 15, 6001, dtype=torch.float64)
    for y1 in (-2.0, 0.3, 1.7):
        ys = torch.stack((torch.full_like(grid2, y1), grid2), -1)
        joint = gmm.gmm_logpdf(ys @ R, mu, chol).exp()  # p_y(y) = p_x(R^T y), |det R| = 1
        marginal = torch.trapezoid(joint, grid2)
        for y2 in (-1.0, 0.0, 2.5):
            brute = gmm.gmm_logpdf(torch.tensor([[y1, y2]], dtype=torch.float64) @ R, mu, chol).exp() / marginal
            formula = gmm.gmm_conditional_logpdf(torch.tensor([y2], dtype=torch.float64),
                                                 torch.tensor([y1], dtype=torch.float64), mu, chol, a, b).exp()
            assert torch.allclose(formula, brute, rtol=1e-6), (y1, y2, formula, brute)
    # chain rule: log p(y2 | y1) + log p(y1) = log p(y): the conditional task is joint minus marginal
    x = gmm.sample_gmm(mu, chol, 50, g)
    y1, y2 = x @ a, x @ b
    lhs = gmm.gmm_conditional_logpdf(y2, y1, mu, chol, a, b) + gmm.gmm_logpdf1(y1, *gmm.project(mu, chol, a))
    assert torch.allclose(lhs, gmm.gmm_logpdf(x, mu, chol))


def test_data_sourced_conditional_loss_matches_quadrature(gmm):
    """--cond-source data: with y1 fixed, the branch-weighted estimate of KL[p(y2|y1) || q(y2|y1)]
    (analytic weights, one reparameterised y2 per component) matches 1-D quadrature."""
    g = torch.Generator().manual_seed(8)
    mu = gmm.target_means() + 0.5 * torch.randn(25, 2, generator=g, dtype=torch.float64)
    raw = torch.log(torch.tensor([0.4, 1.0, 0.3], dtype=torch.float64)).repeat(25, 1)
    raw[:, 1] = 0.1 * torch.randn(25, generator=g, dtype=torch.float64)
    chol = gmm.chol_from_raw(raw)
    a = torch.tensor([[math.cos(0.6), math.sin(0.6)]], dtype=torch.float64)
    b = torch.stack((-a[:, 1], a[:, 0]), -1)
    y1 = torch.full((1, 2000), 0.9, dtype=torch.float64)
    kinds, x = torch.tensor([gmm.CONDITIONAL]), torch.zeros(1, 4, 2, dtype=torch.float64)
    draws = torch.stack([gmm.task_loss(kinds, x, a, b, mu[None], tuple(c[None] for c in chol), torch.float64,
                                       (y1, torch.randn(1, 2000, 25, generator=g, dtype=torch.float64)))[0]
                         for _ in range(10)])
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    cond = lambda m, c: gmm.gmm_conditional_logpdf(grid, torch.full_like(grid, 0.9), m, c, a[0], b[0])  # noqa: E731
    log_p, log_q = cond(mu, chol), cond(gmm.target_means(), gmm.target_chol())
    exact = float(torch.trapezoid(log_p.exp() * (log_p - log_q), grid))
    assert abs(float(draws.mean()) - exact) < 4 * float(draws.std()) / math.sqrt(10) + 1e-3, (draws, exact)


def test_modes_covered_on_hand_built_cases(gmm):
    means = gmm.target_means()
    assert gmm.COVER_RADIUS == pytest.approx(3 * math.sqrt(0.05))
    assert gmm.modes_covered(means) == 25
    assert gmm.modes_covered(means[:1].repeat(25, 1)) == 1
    assert gmm.modes_covered(torch.full((25, 2), -5.0)) == 0  # the clumped start covers nothing
    just_in = means + torch.tensor([0.67, 0.0], dtype=torch.float64)
    just_out = means + torch.tensor([0.0, 0.68], dtype=torch.float64)
    assert gmm.modes_covered(just_in) == 25 and gmm.modes_covered(just_out) == 0
    diagonal = means[:10] + torch.tensor([0.47, 0.47], dtype=torch.float64)  # 0.665 away
    assert gmm.modes_covered(torch.cat((diagonal, torch.full((15, 2), 9.0)))) == 10
    assert gmm.modes_covered(torch.tensor([[1.0, 1.0]])) == 0  # between four modes: sqrt(2) from each


def test_em_iterations_do_not_decrease_their_likelihoods(gmm):
    """joint EM: the data log-likelihood; the projected-marginal iteration: the log-likelihood of the
    projected data under the projected mixture, while each component keeps p(y2 | y1, k)."""
    g = torch.Generator().manual_seed(7)
    X = gmm.sample_gmm(gmm.target_means(), gmm.target_chol(), 2000, g)[None]
    mu, chol = random_gmm(25, g)
    mu, cov = mu[None], cov_of(chol)[None]
    last = -math.inf
    for _ in range(5):
        mu, cov = gmm.em_joint(X, mu, cov)
        ll = float(gmm.gmm_logpdf(X, mu, gmm.chol_from_cov(cov)).mean())
        assert ll >= last - 1e-6
        last = ll
    a = torch.tensor([[math.cos(0.4), math.sin(0.4)]], dtype=torch.float64)
    b = torch.stack((-a[:, 1], a[:, 0]), -1)
    proj_ll = lambda m, c: float(gmm.gmm_logpdf1(X[0] @ a[0], *gmm.project(m[0], gmm.chol_from_cov(c[0]), a[0])).mean())  # noqa: E731
    new_mu, new_cov = gmm.em_marginal(X, mu, cov, a, b)
    assert proj_ll(new_mu, new_cov) >= proj_ll(mu, cov) - 1e-6
    assert (torch.linalg.eigvalsh(new_cov) > 0).all()

    def conditional(m, c):  # slope and residual variance of y2 on y1 per component
        R = torch.cat((a, b))
        cy = R @ c[0] @ R.T
        return cy[:, 0, 1] / cy[:, 0, 0], cy[:, 1, 1] - cy[:, 0, 1] ** 2 / cy[:, 0, 0], (m[0] @ b[0]) - cy[:, 0, 1] / cy[:, 0, 0] * (m[0] @ a[0])

    for old, new in zip(conditional(mu, cov), conditional(new_mu, new_cov)):
        assert torch.allclose(old, new, atol=1e-8)


def test_seeds_are_independent_of_their_batch_mates(gmm):
    args = gmm.parse_args(["--steps", "60", "--seeds", "888,5079"])

    class Bar:
        def update(self, n):
            pass

    (both, _), _ = gmm.train_gradient("biglearn", [888, 5079], args, Bar())
    (alone, _), _ = gmm.train_gradient("biglearn", [5079], args, Bar())
    assert torch.allclose(both[1], alone[0], atol=1e-5)


def test_landscapes_have_the_papers_optima_and_nonnegative_conditionals(gmm):
    grid, rows = gmm.landscapes_2gmm(n_mu=41)
    joint = rows["0 deg"]["joint"]
    at = lambda m1, m2: joint[np.argmin(abs(grid - m1)), np.argmin(abs(grid - m2))]  # noqa: E731
    assert at(-1, 1) == pytest.approx(0, abs=1e-6) and at(1, -1) == pytest.approx(0, abs=1e-6)
    assert at(1, 1) > 0.1 and at(0, 0) > at(1, 1)  # both on one mode: a local optimum above the global
    for panels in rows.values():
        for name, loss in panels.items():
            assert np.all(loss > -1e-9), name  # KLs, and conditional = joint - marginal >= 0
    assert np.allclose(rows["0 deg"]["conditional y2|y1"], 0) and np.allclose(rows["0 deg"]["marginal y2"], 0)


def test_quick_run_as_a_user_types_it(tmp_path):
    out = tmp_path / "gmm.json"
    done = subprocess.run([sys.executable, "bench/gmm.py", "--quick", "--json", str(out), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(out.read_text())
    for key in ("modes_covered", "reverse_kl", "forward_kl", "log_likelihood", "reverse_kl_se", "forward_kl_se"):
        assert list(metrics[key]) == ARMS, key
        for arm in ARMS:
            assert list(metrics[key][arm]) == ["888", "5079"], (key, arm)
            assert all(math.isfinite(v) for v in metrics[key][arm].values())
    assert all(0 <= v <= 25 and isinstance(v, int) for per in metrics["modes_covered"].values() for v in per.values())
    assert all(v >= 0 for per in metrics["reverse_kl_se"].values() for v in per.values())
    assert metrics["settings"]["quick"] is True and "goal" in metrics
    for name in ("gmm_density.png", "gmm_final.png", "gmm_landscapes.png"):
        assert (tmp_path / name).stat().st_size > 10000
    assert "| biglearn_conditional |" in done.stdout and "| arm |" in done.stdout


def test_bad_flag_is_one_line_and_exit_status_2(tmp_path):
    done = subprocess.run([sys.executable, "bench/gmm.py", "--joint-share", "1.5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["gmm.py: error: --joint-share must lie in [0, 1], got 1.5"]


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--cond-share", "-0.2"], "--cond-share must lie in [0, 1]"),
    (["--joint-from", "2"], "--joint-from must lie in [0, 1]"),
    (["--arms", "joint,gan"], "unknown arm 'gan'"),
    (["--steps", "0"], "--steps must be positive"),
    (["--em-steps", "-3"], "--em-steps must be positive"),
    (["--steps", "ten"], "invalid int value"),
    (["--seeds", "1,x"], "--seeds must be comma-separated integers"),
])
def test_bad_configurations_are_refused(gmm, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        gmm.parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gmm.py: error: ") and message in err, err


def test_seed_list_can_extend_the_authors_eleven(gmm):
    assert gmm.parse_args(["--seeds", "+1,2"]).seeds == [*gmm.AUTHOR_SEEDS, 1, 2]
    assert gmm.parse_args(["--seeds", "7"]).seeds == [7]


@pytest.mark.slow
def test_default_run_meets_the_exploration_goal(tmp_path):
    """Big learning covers >= 20 of 25 modes on >= 9 of the authors' 11 seeds; joint matching <= 5
    (joint and biglearn arms at the default settings, about 10 minutes on one idle core)."""
    out = tmp_path / "gmm.json"
    done = subprocess.run([sys.executable, "bench/gmm.py", "--arms", "joint,biglearn", "--no-figures",
                           "--eval-samples", "50000", "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    verdict = json.loads(out.read_text())["goal"]
    assert verdict["met"], verdict

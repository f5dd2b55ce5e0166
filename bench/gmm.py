"""Big learning as exploration: the 25-GMM reverse-KL simulation of "Big Cooperative Learning", measured.

Target q(x) and model p(x) are 25-component Gaussian mixtures in R^2 with equal, fixed weights.
q: means on the grid {-4,-2,0,2,4}^2, covariance 0.05 I. p: trainable means mu_k and Cholesky
factors L_k = [[exp(r1), 0], [c, exp(r2)]] (Sigma_k = L_k L_k^T), clumped initialisation: every mean
-5 + 0.1 N(0, I) (the paper's N(-5, 0.01)), every L_k = I (raw parameters 0). All arms of a seed start
from the same parameters.

Gradient arms (Adam, the same steps, learning rate and batch; the loss of a seed is a Monte-Carlo
average over reparameterised model samples: component index k ~ U{1..25} (fixed equal weights, so the
index carries no parameter and the estimator is unbiased), x = mu_k + L_k eps, eps ~ N(0, I)):
    joint                 KL[p(x) || q(x)] only
    biglearn              the paper's recipe (App. C): a task draws a random rotation y = A x (first
                          row a, angle ~ U[0, 2 pi)) and matches the 1-D marginal KL[p(y1) || q(y1)]
                          for --steps-per-task steps (projections of a GMM are the GMM of projected
                          components: mean a^T mu_k, variance a^T Sigma_k a); from --joint-from of the
                          run on, a task is the joint matching with probability --joint-share
    biglearn_conditional  as biglearn, but a non-joint task is, with probability --cond-share, the
                          conditional matching E_{y1 ~ p} KL[p(y2 | y1) || q(y2 | y1)] of the rotated
                          coordinates (y2 = b^T x, b = a rotated by 90 degrees), in closed form
                          (conditional_params) at y = A x, x ~ p. By the chain rule this expected KL is
                          KL[p(y) || q(y)] - KL[p(y1) || q(y1)] (joint minus marginal; tested), and it
                          needs no sampling from p(y2 | y1), whose weights depend on the parameters.
                          --cond-source data: y1 ~ q (the paper's eq. 6), p(y2 | y1) sampled branch by
                          branch (analytic weights, one reparameterised y2 per component)
EM arms (weights stay uniform; --em-data samples of q per seed; Sigma floored at 1e-6 I):
    joint_em              maximum-likelihood EM on those samples (E-step responsibilities, M-step
                          means and covariances)
    biglearn_em           BigLearn-EM in the spirit of "Big Learning Expectation Maximization"
                          (Cong and Li, AAAI 2024): the same task schedule as biglearn with
                          --em-steps-per-task EM iterations per task. A marginal iteration runs EM on
                          the projected data y1 = a^T x for the projected mixture (1-D M-step: new m_k,
                          v_k) and maps it back by keeping each component's conditional p(y2 | y1, k)
                          (slope s12/s11, residual variance): among Gaussians with the new y1-marginal
                          that is the one closest to the old component in KL[new || old], and it stays
                          positive definite. Joint tasks are plain EM iterations.

Metrics per arm and seed (held-out, fresh samples; standard errors in the JSON):
    modes_covered   number of target means mu*_j with some model mean mu_k at Euclidean distance
                    <= 3 sqrt(0.05) = 0.671 (3 standard deviations of a target component); 0..25
    reverse_kl      KL[p || q], mean of log p(x) - log q(x) over --eval-samples x ~ p
    forward_kl      KL[q || p], mean of log q(x) - log p(x) over --eval-samples x ~ q (one common set)
    log_likelihood  mean log p(x) over the same target samples (nats per sample)
Figures under --out: gmm_density.png (rows arms, columns iterations: model density contours over the
target means, first seed), gmm_final.png (final means of every arm and seed), gmm_landscapes.png (the
2-GMM loss landscapes of section 3.3: joint, rotated marginals and conditionals over (mu_1, mu_2)).

    python bench/gmm.py --json runs/gmm/gmm.json --out runs/gmm     # 5 arms x the authors' 11 seeds
    python bench/gmm.py --arms joint,biglearn --seeds +1,2          # the 11 seeds and seeds 1 and 2
    python bench/gmm.py --quick                                      # seconds; checks the script works
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from data_pipeline.files import atomic_write

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads OpenMP: one thread

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

ARMS = ("joint", "biglearn", "biglearn_conditional", "joint_em", "biglearn_em")
EM_ARMS = ("joint_em", "biglearn_em")
AUTHOR_SEEDS = (888, 5079, 6395, 3325, 2580, 5755, 2488, 4515, 6607, 2432, 6064)
K = 25
TARGET_VAR = 0.05
COVER_RADIUS = 3 * math.sqrt(TARGET_VAR)
SNAPSHOT_FRACTIONS = (0.0, 0.02, 0.08, 0.14, 0.6, 1.0)  # the paper's 200/800/1400/6000 of 10000 tasks
JOINT, MARGINAL, CONDITIONAL = 0, 1, 2
LOG2PI = math.log(2 * math.pi)
GOAL_COVER, GOAL_SEEDS, GOAL_JOINT_MAX = 20, 9, 5


def target_means(dtype=torch.float64) -> torch.Tensor:
    grid = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0], dtype=dtype)
    return torch.cartesian_prod(grid, grid)  # [25, 2]


def target_chol(dtype=torch.float64):
    s = torch.full((K,), math.sqrt(TARGET_VAR), dtype=dtype)
    return s, torch.zeros(K, dtype=dtype), s


def chol_from_raw(raw: torch.Tensor):
    """raw [..., K, 3] = (log l11, l21, log l22) -> the three entries of the lower-triangular L."""
    return raw[..., 0].exp(), raw[..., 1], raw[..., 2].exp()


def chol_from_cov(cov: torch.Tensor):
    l11 = cov[..., 0, 0].sqrt()
    l21 = cov[..., 1, 0] / l11
    return l11, l21, (cov[..., 1, 1] - l21 ** 2).clamp_min(1e-12).sqrt()


# ---- Gaussian-mixture densities (leading dimensions broadcast; equal weights 1/K) ------------------
def logsumexp(v, dim=-1, keepdim=False):
    """torch.logsumexp, with terms below e^-80 of the largest dropped: exp of a float below about -87
    takes a slow path on x86 CPUs (up to 100x), and e^-80 is far below float precision anyway."""
    m = v.detach().amax(dim, keepdim=True)
    out = (v - m).clamp_min(-80).exp().sum(dim, keepdim=True).log() + m
    return out if keepdim else out.squeeze(dim)


def softmax(v, dim=-1):
    return (v - logsumexp(v, dim, keepdim=True)).clamp_min(-80).exp()


def log_normal2(x, mu, chol):
    """log N(x_n; mu_k, L_k L_k^T) for x [..., N, 2], mu [..., K, 2] -> [..., N, K]."""
    l11, l21, l22 = (c[..., None, :] for c in chol)
    d = x[..., :, None, :] - mu[..., None, :, :]
    z1 = d[..., 0] / l11
    z2 = (d[..., 1] - l21 * z1) / l22
    return -LOG2PI - l11.log() - l22.log() - 0.5 * (z1 ** 2 + z2 ** 2)


def log_normal1(y, m, v):
    """log N(y_n; m_k, v_k) for y [..., N], m, v [..., K] -> [..., N, K]."""
    m, v = m[..., None, :], v[..., None, :]
    return -0.5 * (LOG2PI + v.log() + (y[..., :, None] - m) ** 2 / v)


def gmm_logpdf(x, mu, chol):
    return logsumexp(log_normal2(x, mu, chol), -1) - math.log(mu.shape[-2])


def gmm_logpdf1(y, m, v):
    return logsumexp(log_normal1(y, m, v), -1) - math.log(m.shape[-1])


def project(mu, chol, a):
    """The 1-D GMM of y = a^T x: means a^T mu_k, variances a^T Sigma_k a (a [..., 2], unit)."""
    l11, l21, l22 = chol
    a = a[..., None, :]
    u1 = l11 * a[..., 0] + l21 * a[..., 1]  # (L^T a)_1
    u2 = l22 * a[..., 1]
    return (mu * a).sum(-1), u1 ** 2 + u2 ** 2


def conditional_params(y1, mu, chol, a, b):
    """p(y2 | y1) of the GMM in rotated coordinates y1 = a^T x, y2 = b^T x (a, b orthonormal) is a GMM
    with log-weights ~ log N(y1; a^T mu_k, s11), means b^T mu_k + s12 / s11 (y1 - a^T mu_k) and
    variances s22 - s12^2 / s11 = det(Sigma_k) / s11 (s_ij: entries of R Sigma_k R^T). Each [..., N, K]."""
    l11, l21, l22 = chol
    a_, b_ = a[..., None, :], b[..., None, :]
    u = torch.stack((l11 * a_[..., 0] + l21 * a_[..., 1], l22 * a_[..., 1]), -1)  # L^T a
    w = torch.stack((l11 * b_[..., 0] + l21 * b_[..., 1], l22 * b_[..., 1]), -1)  # L^T b
    s11, s12 = (u * u).sum(-1), (u * w).sum(-1)
    m1, m2 = (mu * a_).sum(-1), (mu * b_).sum(-1)
    log_w = log_normal1(y1, m1, s11)
    cond_mean = m2[..., None, :] + (s12 / s11)[..., None, :] * (y1[..., :, None] - m1[..., None, :])
    return log_w - logsumexp(log_w, -1, keepdim=True), cond_mean, ((l11 * l22) ** 2 / s11)[..., None, :]


def gmm_conditional_logpdf(y2, y1, mu, chol, a, b):
    """log p(y2 | y1) of the GMM in rotated coordinates (see conditional_params)."""
    log_w, cond_mean, cond_var = conditional_params(y1, mu, chol, a, b)
    return logsumexp(log_w - 0.5 * (LOG2PI + cond_var.log() + (y2[..., :, None] - cond_mean) ** 2 / cond_var), -1)


def sample_gmm(mu, chol, n, generator):
    """n reparameterised samples per leading index: k ~ U{1..K}, x = mu_k + L_k eps."""
    lead = mu.shape[:-2]
    idx = torch.randint(mu.shape[-2], (*lead, n), generator=generator)
    eps = torch.randn((*lead, n, 2), generator=generator, dtype=mu.dtype)
    return reparameterise(mu, chol, idx, eps)


def reparameterise(mu, chol, idx, eps):
    pick = lambda t: torch.gather(t, -1, idx)  # noqa: E731
    l11, l21, l22 = (pick(c.expand(*idx.shape[:-1], c.shape[-1])) for c in chol)
    m = torch.gather(mu.expand(*idx.shape[:-1], *mu.shape[-2:]), -2, idx[..., None].expand(*idx.shape, 2))
    return torch.stack((m[..., 0] + l11 * eps[..., 0], m[..., 1] + l21 * eps[..., 0] + l22 * eps[..., 1]), -1)


def modes_covered(model_means, means=None, radius=COVER_RADIUS) -> int:
    """How many target means have a model mean within `radius` (Euclidean, inclusive)."""
    means = target_means() if means is None else means
    dist = torch.cdist(torch.as_tensor(means, dtype=torch.float64), torch.as_tensor(model_means, dtype=torch.float64))
    return int((dist.min(1).values <= radius).sum())


# ---- training -----------------------------------------------------------------------------------
def seed_generator(seed: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, stream]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def initial_params(seeds, dtype=torch.float64):
    """The clumped start: means -5 + 0.1 N(0, I) from the seed, L = I."""
    mu = torch.stack([-5 + 0.1 * torch.randn(K, 2, generator=seed_generator(s, 0), dtype=dtype) for s in seeds])
    return mu, torch.zeros(len(seeds), K, 3, dtype=dtype)


def task_kinds(arm, frac, gens, args):
    """One task per seed: JOINT, MARGINAL or CONDITIONAL, and its rotation (rows a and b)."""
    kinds, angles = [], []
    for g in gens:
        u_joint, u_cond, angle = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        if arm in ("joint", "joint_em") or (frac >= args.joint_from and u_joint < args.joint_share):
            kinds.append(JOINT)
        else:
            kinds.append(CONDITIONAL if arm == "biglearn_conditional" and u_cond < args.cond_share else MARGINAL)
        angles.append(2 * math.pi * angle)
    angles = torch.tensor(angles, dtype=torch.float64)
    a = torch.stack((angles.cos(), angles.sin()), -1)
    return torch.tensor(kinds), a, torch.stack((-a[:, 1], a[:, 0]), -1)


def snapshot_steps(total: int):
    return sorted({round(f * total) for f in SNAPSHOT_FRACTIONS})


def task_loss(kinds, x, a, b, mu, chol, dtype, data=None):
    """Per-seed Monte-Carlo loss of the drawn task on the reparameterised samples x [S, B, 2]. With
    data = (y1 [S, n] from q, eps [S, n, K]) the conditional task takes y1 ~ q instead of y1 ~ p:
    E_{p(y2|y1)} f = sum_k w_k(y1) E_{N(m_k(y1), v_k)} f, one reparameterised y2 per component k."""
    tmu, tchol = target_means(dtype), target_chol(dtype)
    loss = torch.zeros(x.shape[0], dtype=dtype)
    if (kinds == JOINT).any():
        loss = torch.where(kinds == JOINT, (gmm_logpdf(x, mu, chol) - gmm_logpdf(x, tmu, tchol)).mean(-1), loss)
    y1, y2 = (x * a[:, None]).sum(-1), (x * b[:, None]).sum(-1)
    if (kinds == MARGINAL).any():
        lm = gmm_logpdf1(y1, *project(mu, chol, a)) - gmm_logpdf1(y1, *project(tmu, tchol, a))
        loss = torch.where(kinds == MARGINAL, lm.mean(-1), loss)
    if (kinds == CONDITIONAL).any():
        weights = None
        if data is not None:
            y1, eps = data
            log_w, cond_mean, cond_var = conditional_params(y1, mu, chol, a, b)
            y2, weights = (cond_mean + cond_var.sqrt() * eps).flatten(1), log_w.exp()
            y1 = y1.repeat_interleave(K, -1)
        lc = gmm_conditional_logpdf(y2, y1, mu, chol, a, b) - gmm_conditional_logpdf(y2, y1, tmu, tchol, a, b)
        lc = lc.mean(-1) if weights is None else (weights * lc.view(weights.shape)).sum(-1).mean(-1)
        loss = torch.where(kinds == CONDITIONAL, lc, loss)
    return loss


def train_gradient(arm, seeds, args, bar):
    """All seeds at once (leading dimension): each seed has its own random streams, and Adam is
    elementwise, so a seed's run does not depend on which other seeds share the batch."""
    dtype = torch.float32
    mu0, raw0 = initial_params(seeds)
    mu, raw = mu0.to(dtype).requires_grad_(), raw0.to(dtype).requires_grad_()
    opt = (torch.optim.Adam if args.optimizer == "adam" else torch.optim.SGD)([mu, raw], lr=args.lr)
    gens = [seed_generator(s, 1 + ARMS.index(arm)) for s in seeds]
    snaps, wanted, step = {}, set(snapshot_steps(args.steps)), 0
    while step < args.steps:
        kinds, a, b = task_kinds(arm, step / args.steps, gens, args)
        a, b = a.to(dtype), b.to(dtype)
        n = min(args.steps_per_task, args.steps - step)
        idx = torch.stack([torch.randint(K, (n, args.batch), generator=g) for g in gens], 1)
        eps = torch.stack([torch.randn(n, args.batch, 2, generator=g) for g in gens], 1).to(dtype)
        if arm == "biglearn_conditional" and args.cond_source == "data":  # batch // K values of y1 ~ q
            xq = torch.stack([sample_gmm(target_means(), target_chol(), n * max(1, args.batch // K), g) for g in gens])
            y1q = (xq.view(len(seeds), n, -1, 2).transpose(0, 1).to(dtype) * a[:, None]).sum(-1)
            eps_q = torch.stack([torch.randn(n, y1q.shape[-1], K, generator=g) for g in gens], 1).to(dtype)
        for j in range(n):
            if step in wanted:
                snaps[step] = (mu.detach().double().clone(), chol_from_raw(raw.detach().double()))
            chol = chol_from_raw(raw)
            x = reparameterise(mu, chol, idx[j], eps[j])
            data = (y1q[j], eps_q[j]) if arm == "biglearn_conditional" and args.cond_source == "data" else None
            loss = task_loss(kinds, x, a, b, mu, chol, dtype, data)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            step += 1
        bar.update(n)
    final = (mu.detach().double(), chol_from_raw(raw.detach().double()))
    snaps[args.steps] = final
    return final, snaps


def em_joint(X, mu, cov):
    """One maximum-likelihood EM iteration (uniform weights kept) on X [S, N, 2]; a component with no
    responsibility left (total < 1e-8) keeps its parameters."""
    resp = softmax(log_normal2(X, mu, chol_from_cov(cov)), -1)  # [S, N, K]
    nk = resp.sum(1)[..., None]  # [S, K, 1]
    moments = resp.transpose(1, 2) @ torch.stack((X[..., 0], X[..., 1], X[..., 0] ** 2, X[..., 0] * X[..., 1],
                                                  X[..., 1] ** 2), -1) / nk.clamp_min(1e-12)
    new_mu = moments[..., :2]  # float64: E[x x^T] - mu mu^T loses nothing that matters here
    new_cov = torch.stack((moments[..., 2:4], moments[..., 3:5]), -2) - new_mu[..., :, None] * new_mu[..., None, :]
    alive = nk > 1e-8
    return torch.where(alive, new_mu, mu), torch.where(alive[..., None], new_cov + 1e-6 * torch.eye(2, dtype=X.dtype), cov)


def em_marginal(X, mu, cov, a, b):
    """BigLearn-EM's projected-marginal iteration: EM on y1 = a^T x for the projected mixture (new m_k,
    v_k), mapped back keeping each component's conditional p(y2 | y1, k) (y2 = b^T x)."""
    R = torch.stack((a, b), 1)  # [S, 2, 2], rows a and b
    my, cy = mu @ R.transpose(1, 2), R[:, None] @ cov @ R[:, None].transpose(-1, -2)
    y = (X * a[:, None]).sum(-1)  # [S, N]
    resp = softmax(log_normal1(y, my[..., 0], cy[..., 0, 0]), -1)
    nk = resp.sum(1)
    m = (resp * y[..., None]).sum(1) / nk.clamp_min(1e-12)
    v = (resp * y[..., None] ** 2).sum(1) / nk.clamp_min(1e-12) - m ** 2 + 1e-6
    alive = nk > 1e-8
    m, v = torch.where(alive, m, my[..., 0]), torch.where(alive, v, cy[..., 0, 0])
    slope = cy[..., 0, 1] / cy[..., 0, 0]  # regression of y2 on y1 within the component
    resid = cy[..., 1, 1] - slope * cy[..., 0, 1]  # its residual variance, det(Sigma) / s11
    my_new = torch.stack((m, my[..., 1] + slope * (m - my[..., 0])), -1)
    cy_new = torch.stack((torch.stack((v, slope * v), -1), torch.stack((slope * v, resid + slope ** 2 * v), -1)), -2)
    return my_new @ R, R[:, None].transpose(-1, -2) @ cy_new @ R[:, None]


def em_step(X, mu, cov, kinds, a, b):
    """One EM iteration per seed: the joint one where kinds == JOINT, else the projected-marginal one."""
    joint = kinds == JOINT
    if joint.all():
        return em_joint(X, mu, cov)
    if not joint.any():
        return em_marginal(X, mu, cov, a, b)
    (mu_j, cov_j), (mu_m, cov_m) = em_joint(X, mu, cov), em_marginal(X, mu, cov, a, b)
    return torch.where(joint[:, None, None], mu_j, mu_m), torch.where(joint[:, None, None, None], cov_j, cov_m)


def train_em(arm, seeds, args, bar):
    mu, raw = initial_params(seeds)
    l11, l21, l22 = chol_from_raw(raw)
    cov = torch.stack((torch.stack((l11 ** 2, l11 * l21), -1), torch.stack((l11 * l21, l21 ** 2 + l22 ** 2), -1)), -2)
    tmu, tchol = target_means(), target_chol()
    X = torch.stack([sample_gmm(tmu, tchol, args.em_data, seed_generator(s, 10)) for s in seeds])
    gens = [seed_generator(s, 1 + ARMS.index(arm)) for s in seeds]
    snaps, wanted, step = {}, set(snapshot_steps(args.em_steps)), 0
    while step < args.em_steps:
        kinds, a, b = task_kinds(arm, step / args.em_steps, gens, args)
        n = min(args.em_steps_per_task, args.em_steps - step)
        for _ in range(n):
            if step in wanted:
                snaps[step] = (mu.clone(), chol_from_cov(cov))
            mu, cov = em_step(X, mu, cov, kinds, a, b)
            step += 1
        bar.update(n)
    final = (mu, chol_from_cov(cov))
    snaps[args.em_steps] = final
    return final, snaps


# ---- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(mu, chol, target_x, n, generator, chunk=20000):
    """Held-out metrics of one seed's model: (value, standard error) per metric, plus coverage."""
    tmu, tchol = target_means(), target_chol()
    rev = []
    for start in range(0, n, chunk):
        x = sample_gmm(mu, chol, min(chunk, n - start), generator)
        rev.append(gmm_logpdf(x, mu, chol) - gmm_logpdf(x, tmu, tchol))
    rev = torch.cat(rev)
    logp = torch.cat([gmm_logpdf(x, mu, chol) for x in target_x.split(chunk)])
    fwd = torch.cat([gmm_logpdf(x, tmu, tchol) for x in target_x.split(chunk)]) - logp
    stat = lambda v: (float(v.mean()), float(v.std() / math.sqrt(len(v))))  # noqa: E731
    return {"reverse_kl": stat(rev), "forward_kl": stat(fwd), "log_likelihood": stat(logp),
            "modes_covered": modes_covered(mu)}


# ---- figures ------------------------------------------------------------------------------------
def landscapes_2gmm(n_mu=81, angles=(0, 15, 45, 60), var=0.1, n_avg=12):
    """Section 3.3's 2-GMM: q = N((-1,0), var I)/2 + N((1,0), var I)/2, p has means (mu1, 0), (mu2, 0).
    Every loss is exact 1-D quadrature: the joint KL equals the x1-marginal KL (x2 is N(0, var) under
    both), the rotated coordinate y1 = cos(t) x1 + sin(t) x2 has the 1-D GMM of means cos(t) mu_k, and
    E_{y_S ~ p} KL[p(y_T|y_S) || q(y_T|y_S)] = joint - marginal(y_S) (chain rule). Returns the mu grid
    and {row: {column: loss over (mu1, mu2)}}; the last row averages n_avg rotations."""
    grid = np.linspace(-2, 2, n_mu)
    y = np.linspace(-4, 4, 401)
    dy = y[1] - y[0]
    pdf = lambda m: np.exp(-(y - m) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)  # noqa: E731

    def kl1(c):  # KL[p(c x1) || q(c x1)] over the (mu1, mu2) grid
        if abs(c) < 1e-9:
            return np.zeros((n_mu, n_mu))
        each = pdf(c * grid[:, None])  # [n_mu, n_y]
        p = 0.5 * (each[:, None, :] + each[None, :, :])
        q = 0.5 * (pdf(-c) + pdf(c))
        return (p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))).sum(-1) * dy

    def row(m1, m2):
        return {"joint": joint, "marginal y1": m1, "marginal y2": m2,
                "conditional y2|y1": joint - m1, "conditional y1|y2": joint - m2}

    joint = kl1(1.0)
    rows = {f"{a} deg": row(kl1(math.cos(math.radians(a))), kl1(-math.sin(math.radians(a)))) for a in angles}
    avg = np.mean([kl1(math.cos(t)) for t in np.linspace(0, math.pi, n_avg, endpoint=False)], 0)
    rows[f"mean of {n_avg} angles"] = row(avg, avg)
    return grid, rows


def draw_figures(out: Path, arms, seeds, snaps_by_arm, finals, n_grid=160):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    tmu = target_means().numpy()
    lin = torch.linspace(-6, 6, n_grid, dtype=torch.float64)
    xx, yy = torch.meshgrid(lin, lin, indexing="xy")
    pts = torch.stack((xx.reshape(-1), yy.reshape(-1)), -1)
    cols = max(len(s) for s in snaps_by_arm.values())
    fig, axes = plt.subplots(len(arms), cols, figsize=(2.6 * cols, 2.6 * len(arms)), squeeze=False)
    for r, arm in enumerate(arms):
        total = max(snaps_by_arm[arm])
        for c, (step, (mu, chol)) in enumerate(sorted(snaps_by_arm[arm].items())):
            ax = axes[r, c]
            dens = gmm_logpdf(pts, mu[0], tuple(t[0] for t in chol)).exp().reshape(n_grid, n_grid).numpy()
            levels = dens.max() * np.geomspace(0.003, 0.8, 7)  # relative levels: faint components show
            ax.contour(xx.numpy(), yy.numpy(), dens, levels=levels, colors="green", linewidths=0.7)
            ax.scatter(tmu[:, 0], tmu[:, 1], marker="x", c="red", s=14, linewidths=1)
            ax.set(xlim=(-6, 6), ylim=(-6, 6), xticks=[], yticks=[], aspect="equal")
            unit = "EM it" if arm in EM_ARMS else "step"
            ax.set_title(f"{unit} {step} ({round(100 * step / total)}%)", fontsize=8)
            if c == 0:
                ax.set_ylabel(arm, fontsize=9)
        for c in range(len(snaps_by_arm[arm]), cols):
            axes[r, c].axis("off")
    fig.suptitle(f"model density (green contours) over the 25 target means (red x), seed {seeds[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "gmm_density.png", dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(len(arms), len(seeds), figsize=(1.7 * len(seeds) + 1, 1.8 * len(arms)), squeeze=False)
    for r, arm in enumerate(arms):
        for c, seed in enumerate(seeds):
            ax, mu = axes[r, c], finals[arm][0][c].numpy()
            ax.scatter(tmu[:, 0], tmu[:, 1], marker="x", c="red", s=10, linewidths=0.8)
            ax.scatter(mu[:, 0], mu[:, 1], c="green", s=6)
            ax.set(xlim=(-6, 6), ylim=(-6, 6), xticks=[], yticks=[], aspect="equal")
            ax.set_title(f"{seed}: {modes_covered(finals[arm][0][c])}/25", fontsize=7)
            if c == 0:
                ax.set_ylabel(arm, fontsize=7)
    fig.suptitle("final component means (green) and target means (red x); title: seed: modes covered", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "gmm_final.png", dpi=80)
    plt.close(fig)

    grid, rows = landscapes_2gmm()
    columns = list(next(iter(rows.values())))
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.6 * len(columns), 2.5 * len(rows)), squeeze=False)
    for r, (row, panels) in enumerate(rows.items()):
        for c, col in enumerate(columns):
            ax = axes[r, c]
            ax.pcolormesh(grid, grid, np.abs(panels[col]).T ** 0.5, cmap="coolwarm", shading="auto")
            ax.plot([-1, 1], [1, -1], "r*", ms=8)
            ax.set(aspect="equal", xticks=[-2, 0, 2], yticks=[-2, 0, 2])
            ax.tick_params(labelsize=7)
            ax.set_title(f"{col}" if r else f"{col}\n", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{row}\nmu_2", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("mu_1", fontsize=8)
    fig.suptitle("2-GMM reverse-KL landscapes (sqrt of the loss; red stars: global optima), sigma^2 = 0.1",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "gmm_landscapes.png", dpi=80)
    plt.close(fig)


# ---- command line -------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a bad configuration is one line on stderr and exit status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    p = OneLineParser(prog="gmm.py", description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=110))
    d = "(default: %(default)s)"
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)} {d}")
    p.add_argument("--seeds", default=",".join(map(str, AUTHOR_SEEDS)),
                   help=f"comma-separated seeds; a leading + appends to the authors' eleven {d}")
    p.add_argument("--steps", type=int, default=50000, help=f"optimiser steps of the gradient arms {d}")
    p.add_argument("--lr", type=float, default=0.01, help=f"learning rate {d}")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help=f"{d}")
    p.add_argument("--batch", type=int, default=100, help=f"model samples per step {d}")
    p.add_argument("--steps-per-task", type=int, default=20, help=f"steps on one drawn task (rotation) {d}")
    p.add_argument("--joint-from", type=float, default=0.5, help=f"fraction of the run before joint tasks enter {d}")
    p.add_argument("--joint-share", type=float, default=0.1, help=f"probability of a joint task after that {d}")
    p.add_argument("--cond-share", type=float, default=0.5,
                   help=f"biglearn_conditional: probability that a non-joint task is conditional {d}")
    p.add_argument("--cond-source", choices=("model", "data"), default="model",
                   help="biglearn_conditional: y1 ~ p (= joint minus marginal KL) or y1 ~ q (the paper's eq. 6) "
                        f"{d}")
    p.add_argument("--em-steps", type=int, default=2000, help=f"EM iterations of the EM arms {d}")
    p.add_argument("--em-steps-per-task", type=int, default=5, help=f"EM iterations on one drawn task {d}")
    p.add_argument("--em-data", type=int, default=5000, help=f"target samples EM trains on, per seed {d}")
    p.add_argument("--eval-samples", type=int, default=200000, help=f"fresh samples per held-out estimate {d}")
    p.add_argument("--out", type=Path, default=Path("runs/gmm"), help=f"figures go here {d}")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the metrics here as JSON")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="skip the PNGs")
    p.add_argument("--quick", action="store_true",
                   help="400 steps, 40 EM iterations, 2 seeds, 10000 eval samples (about 15 s): checks the script")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        p.error(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}" if unknown else "--arms is empty")
    args.arms = [a for a in ARMS if a in arms]
    text = args.seeds.strip()
    try:
        seeds = [int(s) for s in text.lstrip("+").split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    seeds = list(AUTHOR_SEEDS) + seeds if text.startswith("+") else seeds
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        p.error("--seeds must be distinct non-negative integers")
    args.seeds = seeds
    if args.quick:
        args.steps, args.em_steps, args.eval_samples, args.em_data = 400, 40, 10000, 2000
        args.seeds = args.seeds[:2]
    for name in ("steps", "batch", "steps_per_task", "em_steps", "em_steps_per_task", "em_data", "eval_samples"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr must be positive and finite, got {args.lr}")
    for name in ("joint_from", "joint_share", "cond_share"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    return args


def markdown(results, arms, seeds):
    lines = ["| arm | modes covered: mean [min, max] | seeds with >= 20 | reverse KL: mean [min, max] "
             "| forward KL: mean [min, max] | held-out log-lik: mean |", "|---|---|---|---|---|---|"]
    for arm in arms:
        v = {m: [results[arm][s][m] for s in seeds] for m in ("modes_covered", "reverse_kl", "forward_kl", "log_likelihood")}
        modes = v["modes_covered"]
        rng = lambda xs: f"{np.mean(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"  # noqa: E731
        lines.append(f"| {arm} | {np.mean(modes):.1f} [{min(modes)}, {max(modes)}] | {sum(m >= GOAL_COVER for m in modes)}"
                     f"/{len(seeds)} | {rng([r[0] for r in v['reverse_kl']])} | {rng([r[0] for r in v['forward_kl']])} "
                     f"| {np.mean([r[0] for r in v['log_likelihood']]):.3f} |")
    lines += ["", "| arm | " + " | ".join(map(str, seeds)) + " |", "|---|" + "---|" * len(seeds)]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(f"{results[arm][s]['modes_covered']} / {results[arm][s]['reverse_kl'][0]:.2f}"
                                              f" / {results[arm][s]['forward_kl'][0]:.2f}" for s in seeds) + " |")
    lines.append("\n(per-seed cells: modes covered / reverse KL / forward KL, nats)")
    return "\n".join(lines)


def goal(results, seeds):
    listed = [s for s in seeds if s in AUTHOR_SEEDS]
    out = {"rule": f"biglearn covers >= {GOAL_COVER} of 25 modes on >= {GOAL_SEEDS} of the authors' 11 seeds and "
                   f"joint covers <= {GOAL_JOINT_MAX} on each", "evaluated": len(listed) == len(AUTHOR_SEEDS)}
    for arm in ("biglearn", "biglearn_conditional", "biglearn_em"):
        if arm in results:
            out[f"{arm}_seeds_ge_{GOAL_COVER}"] = sum(results[arm][s]["modes_covered"] >= GOAL_COVER for s in listed)
    if "joint" in results:
        out["joint_max_modes"] = max(results["joint"][s]["modes_covered"] for s in listed) if listed else None
    if out["evaluated"] and "biglearn" in results and "joint" in results:
        out["met"] = out[f"biglearn_seeds_ge_{GOAL_COVER}"] >= GOAL_SEEDS and out["joint_max_modes"] <= GOAL_JOINT_MAX
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    start, load_start = time.time(), os.getloadavg()
    work = sum(args.em_steps if a in EM_ARMS else args.steps for a in args.arms)
    eval_gen = torch.Generator().manual_seed(12345)
    target_x = sample_gmm(target_means(), target_chol(), args.eval_samples, eval_gen)
    results, finals, snaps_by_arm, train_s = {}, {}, {}, {}
    with tqdm(total=work, desc="gmm", unit="step", mininterval=2, dynamic_ncols=True) as bar:
        for arm in args.arms:
            bar.set_description(arm)
            t0 = time.time()
            (mu, chol), snaps = (train_em if arm in EM_ARMS else train_gradient)(arm, args.seeds, args, bar)
            train_s[arm] = round(time.time() - t0, 1)
            finals[arm] = (mu, chol)
            snaps_by_arm[arm] = {step: (m[:1], tuple(c[:1] for c in ch)) for step, (m, ch) in snaps.items()}
            results[arm] = {s: evaluate(mu[i], tuple(c[i] for c in chol), target_x, args.eval_samples,
                                        seed_generator(s, 20)) for i, s in enumerate(args.seeds)}
    if args.figures:
        draw_figures(args.out, args.arms, args.seeds, snaps_by_arm, finals)
    wall, load_end = time.time() - start, os.getloadavg()
    table = markdown(results, args.arms, args.seeds)
    verdict = goal(results, args.seeds)
    print(table)
    print(f"\ngoal: {json.dumps(verdict)}")
    print(f"wall {wall:.0f} s (training per arm: {train_s}); load average {load_start[0]:.2f} at start, "
          f"{load_end[0]:.2f} at end")
    if args.json:
        per = lambda m, i: {a: {str(s): results[a][s][m][i] for s in args.seeds} for a in args.arms}  # noqa: E731
        payload = {"modes_covered": {a: {str(s): results[a][s]["modes_covered"] for s in args.seeds} for a in args.arms},
                   **{m: per(m, 0) for m in ("reverse_kl", "forward_kl", "log_likelihood")},
                   **{f"{m}_se": per(m, 1) for m in ("reverse_kl", "forward_kl", "log_likelihood")},
                   "goal": verdict, "cover_radius": COVER_RADIUS, "train_seconds": train_s,
                   "wall_seconds": round(wall, 1), "load_average": [load_start[0], load_end[0]],
                   "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "command": " ".join(["python", "bench/gmm.py", *(sys.argv[1:] if argv is None else argv)])}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()

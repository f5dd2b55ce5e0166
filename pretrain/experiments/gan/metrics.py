"""Sample-quality metrics of the GAN bench, all from one digits classifier.

The classifier (scikit-learn's MLP: 64 pixels -> `hidden` ReLU units -> 10 classes) is trained once
on the training split; its hidden activations are the feature space of the Frechet distance (as
the Inception features of "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", Heusel et al., 2017, at digits scale) and its labels give class coverage and the
class consistency of completions.
"""
from __future__ import annotations

import math

import numpy as np


class DigitsClassifier:
    def __init__(self, hidden: int, seed: int = 0):
        from sklearn.neural_network import MLPClassifier
        self.model = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=500, random_state=seed)

    def fit(self, images: np.ndarray, labels: np.ndarray) -> "DigitsClassifier":
        """images [N, ...] with pixels in [0, 1]."""
        self.model.fit(images.reshape(len(images), -1), labels)
        return self

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(images.reshape(len(images), -1))

    def features(self, images: np.ndarray) -> np.ndarray:
        """The hidden layer's ReLU activations [N, hidden] (MLPClassifier's own first layer)."""
        weights, bias = self.model.coefs_[0], self.model.intercepts_[0]
        return np.maximum(images.reshape(len(images), -1) @ weights + bias, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_from_moments(mean_a, cov_a, mean_b, cov_b) -> float:
    """||m_a - m_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)): the squared 2-Wasserstein distance of
    N(m_a, C_a) and N(m_b, C_b). tr (C_a C_b)^(1/2) is computed as tr (C_a^(1/2) C_b C_a^(1/2))^(1/2)
    (the same eigenvalues), from symmetric eigendecompositions: exact also for the singular
    covariances of features that are 0 on every sample (dead ReLU units)."""
    cov_a, cov_b = np.asarray(cov_a, dtype=np.float64), np.asarray(cov_b, dtype=np.float64)
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    diff = np.asarray(mean_a, dtype=np.float64) - np.asarray(mean_b, dtype=np.float64)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance of the Gaussians fitted to two feature sets [N, k] (sample covariances)."""
    moments = [(f.mean(0), np.cov(f, rowvar=False)) for f in (features_a.astype(np.float64), features_b.astype(np.float64))]
    return frechet_from_moments(*moments[0], *moments[1])


def class_coverage(labels: np.ndarray, n_classes: int = 10) -> tuple[float, float]:
    """(entropy in nats of the label histogram, smallest class share); log(10) = 2.303 is uniform."""
    shares = np.bincount(labels, minlength=n_classes) / len(labels)
    entropy = -sum(p * math.log(p) for p in shares if p > 0) + 0.0  # + 0.0: one class is 0.0, not -0.0
    return float(entropy), float(shares.min())


def mean_pairwise_distance(samples: np.ndarray) -> float:
    """Mean Euclidean distance over the K (K - 1) / 2 pairs of samples [K, ...]."""
    flat = samples.reshape(len(samples), -1).astype(np.float64)
    dist = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1))
    return float(dist[np.triu_indices(len(flat), 1)].mean())


def nearest_on_source(x: np.ndarray, source: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """For each x [n, L, D] the index into pool [N, L, D] of the image nearest to it on its own
    source patches (boolean source [n, L]; squared Euclidean distance over S only): the completion
    of a model that has memorised the training set, a reference for what x_S alone can tell."""
    pool = pool.astype(np.float64)
    pool_sq = (pool ** 2).sum(-1)[None]
    out = []
    for start in range(0, len(x), 64):  # [64, N, L] at a time
        chunk = x[start:start + 64].astype(np.float64)
        # ||x_l - p_l||^2 = ||x_l||^2 + ||p_l||^2 - 2 x_l . p_l, per patch l, summed over l in S.
        per_patch = (chunk ** 2).sum(-1)[:, None] + pool_sq - 2 * np.einsum("nld,mld->nml", chunk, pool)
        out.append((per_patch * source[start:start + 64, None]).sum(-1).argmin(1))
    return np.concatenate(out)

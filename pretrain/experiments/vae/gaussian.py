"""Diagonal Gaussians, the only distributions of the BigLearn-VAE (log-variance parameterisation).

Written out in closed form rather than through torch.distributions so that the ELBO is plain
tensor arithmetic over [..., dim] without building distribution objects per call; the tests
check both functions against torch.distributions.
"""
from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def log_prob(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x | mean, diag(exp(logvar))) per coordinate (sum over the last axis for a vector)."""
    return -0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))


def kl(mean_q: torch.Tensor, logvar_q: torch.Tensor, mean_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """KL( N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p)) ) per coordinate."""
    return 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mean_q - mean_p).pow(2)) * torch.exp(-logvar_p) - 1)


def sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Reparameterised draw mean + std * noise (noise ~ N(0, I) unless given)."""
    if noise is None:
        noise = torch.randn_like(mean)
    return mean + torch.exp(0.5 * logvar) * noise

"""Isotropic Gaussian mixtures: sampling and the exact score of ``q_sigma = q * N(0, sigma^2 I)``.

    q(x)       = sum_k w_k N(x; mu_k, s_k^2 I)
    q_sigma(x) = sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I)
    grad log q_sigma(x) = sum_k r_k(x) (mu_k - x) / (s_k^2 + sigma^2),   r_k = posterior weight of k
"""
from __future__ import annotations

import math

import torch

from .base import ScoreDistribution, check_n, check_points, check_sigma


class GaussianMixture(ScoreDistribution):
    """Mixture of isotropic Gaussians in R^d.

    Args:
        weights: (C,) non-negative, normalised internally.
        means: (C, d).
        stds: (C,) component standard deviations (> 0).
    """

    def __init__(self, weights, means, stds, *, dtype=torch.float64):
        self.weights = torch.as_tensor(weights, dtype=dtype)
        self.means = torch.as_tensor(means, dtype=dtype)
        self.stds = torch.as_tensor(stds, dtype=dtype).expand(self.weights.shape).clone()
        if self.means.dim() != 2 or self.means.shape[0] != self.weights.shape[0]:
            raise ValueError(f"means must have shape (C, d) with C = {self.weights.shape[0]}, got {tuple(self.means.shape)}")
        if (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        if (self.stds <= 0).any():
            raise ValueError("stds must be positive")
        self.weights = self.weights / self.weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, sigma: float = 0.0, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, d) samples of q_sigma."""
        n = check_n(n)
        sigma = check_sigma(sigma)
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        scale = torch.sqrt(self.stds[comp] ** 2 + sigma**2).unsqueeze(-1)
        z = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        return self.means[comp] + scale * z

    def _log_components(self, x: torch.Tensor, sigma: float):
        sigma = check_sigma(sigma)
        var = self.stds.to(x) ** 2 + sigma**2  # (C,)
        r2 = ((x.unsqueeze(-2) - self.means.to(x)) ** 2).sum(-1)  # (..., C)
        return torch.log(self.weights.to(x)) - 0.5 * r2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var), var

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """log q_sigma(x), shape (...)."""
        x = check_points(x, self.dim)
        logc, _ = self._log_components(x, sigma)
        return torch.logsumexp(logc, -1)

    def score(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """Exact grad log q_sigma(x), same shape as x (..., d)."""
        x = check_points(x, self.dim)
        logc, var = self._log_components(x, sigma)
        resp = torch.softmax(logc, -1)  # (..., C)
        diff = (self.means.to(x) - x.unsqueeze(-2)) / var.unsqueeze(-1)  # (..., C, d)
        return (resp.unsqueeze(-1) * diff).sum(-2)


def two_mode_mixture(d: int = 2, *, separation: float = 5.0, weights=(0.8, 0.2), dtype=torch.float64) -> GaussianMixture:
    """The classic NCSN toy: weights 0.8 / 0.2 at +-(separation, ..., separation), unit std."""
    mu = torch.full((d,), float(separation), dtype=dtype)
    return GaussianMixture(weights, torch.stack([mu, -mu]), torch.ones(2, dtype=dtype), dtype=dtype)


def eight_gaussians(radius: float = 4.0, std: float = 0.5, *, dtype=torch.float64) -> GaussianMixture:
    """8 equally weighted isotropic Gaussians (std ``std``) at angles 2 pi j / 8 on a circle of ``radius``."""
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}")
    ang = 2 * math.pi * torch.arange(8, dtype=dtype) / 8
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], -1)
    return GaussianMixture(torch.ones(8, dtype=dtype), means, torch.full((8,), float(std), dtype=dtype), dtype=dtype)

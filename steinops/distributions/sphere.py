"""Uniform distribution on a k-sphere embedded in R^D, and concentric rings (a mixture of circles).

Sphere S = {c + R U u : |u| = 1}, U (D, k+1) orthonormal. For x write y = U^T (x - c), rho = |y|,
r = (x - c) - U y and kappa = R rho / sigma^2. With theta the angle between u and y/rho (density
proportional to sin^{k-1} theta on [0, pi] for u uniform on S^k):

    log q_sigma(x) = -D/2 log(2 pi sigma^2) - (|r|^2 + (rho - R)^2) / (2 sigma^2) + log J_k(kappa) - log Z_k
    J_k(kappa) = int_0^pi exp(kappa (cos theta - 1)) sin^{k-1} theta d theta,   Z_k = int_0^pi sin^{k-1}
    grad log q_sigma(x) = -(x - c) / sigma^2 + (R / sigma^2) A_k(kappa) U y / rho,
    A_k(kappa) = d/dkappa log J_k + 1 = E[cos theta] under the tilted law
              (= I_{(k+1)/2}(kappa) / I_{(k-1)/2}(kappa)).

J_k and A_k are computed by Gauss-Legendre quadrature in theta over [0, theta_c], theta_c =
min(pi, (12 + 2 sqrt(k)) / sqrt(kappa)) -- the neglected tail is below exp(-60) relative -- in log
space, so it is stable for any kappa (sigma -> 0 near the sphere) and any k. For k = 1 it reproduces
pi * i0e(kappa) and A = i1e/i0e to ~1e-14.
"""
from __future__ import annotations

import math

import torch

from .base import LOG_2PI, ScoreDistribution, check_points, gauss_legendre, random_orthonormal


def _tilted_log_integral(kappa: torch.Tensor, k: int, n_nodes: int = 256):
    """log J_k(kappa) and A_k(kappa) (see module docstring), elementwise over kappa >= 0."""
    c = 12.0 + 2.0 * math.sqrt(k)
    kmin = (c / math.pi) ** 2
    big = kappa > kmin
    theta_c = torch.where(big, c / torch.sqrt(kappa.clamp_min(kmin)), torch.full_like(kappa, math.pi))
    u, w = gauss_legendre(n_nodes, 0.0, 1.0, dtype=kappa.dtype)
    theta = theta_c.unsqueeze(-1) * u  # (..., n)
    half = torch.sin(0.5 * theta)
    logf = -2.0 * kappa.unsqueeze(-1) * half**2 + torch.log(w) + torch.log(theta_c).unsqueeze(-1)
    if k != 1:
        logf = logf + (k - 1) * torch.log(torch.sin(theta))
    logJ = torch.logsumexp(logf, -1)
    A = (torch.softmax(logf, -1) * torch.cos(theta)).sum(-1)
    return logJ, A


def _log_sphere_norm(k: int) -> float:
    """log int_0^pi sin^{k-1} theta d theta."""
    return 0.5 * math.log(math.pi) + math.lgamma(k / 2) - math.lgamma((k + 1) / 2)


class UniformSphere(ScoreDistribution):
    """Uniform law on the k-sphere of radius R centred at c in the (k+1)-dim subspace spanned by U.

    Args:
        D: ambient dimension; k: sphere dimension (1 <= k <= D - 1; k = 1 is a circle).
        radius: R > 0.  basis: (D, k+1) orthonormal (default: Haar-random from ``seed``; with
        D = k + 1 and no basis, the identity).  center: (D,) (default 0).
    """

    singular = True

    def __init__(self, D: int = 3, k: int = 2, *, radius: float = 1.0, basis=None, center=None, seed: int = 0,
                 n_nodes: int = 256, dtype=torch.float64):
        for name, v in (("D", D), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if k + 1 > D:
            raise ValueError(f"k must be <= D - 1, got k={k}, D={D}")
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
        self.dtype = dtype
        self.k, self.radius, self.n_nodes = k, float(radius), int(n_nodes)
        if basis is None:
            if D == k + 1:
                basis = torch.eye(D, dtype=dtype)
            else:
                basis = random_orthonormal(D, k + 1, torch.Generator().manual_seed(seed), dtype)
        U = torch.as_tensor(basis, dtype=dtype)
        if U.shape != (D, k + 1):
            raise ValueError(f"basis must have shape ({D}, {k + 1}), got {tuple(U.shape)}")
        if not torch.allclose(U.T @ U, torch.eye(k + 1, dtype=dtype), atol=1e-8):
            raise ValueError("basis must have orthonormal columns")
        self.basis = U
        self.center = torch.zeros(D, dtype=dtype) if center is None else torch.as_tensor(center, dtype=dtype)
        if self.center.shape != (D,):
            raise ValueError(f"center must have shape ({D},), got {tuple(self.center.shape)}")

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def intrinsic_dim(self) -> int:
        return self.k

    def _sample_clean(self, n, generator):
        g = torch.randn(n, self.k + 1, dtype=self.dtype, generator=generator)
        g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        return self.center + self.radius * g @ self.basis.T

    def _split(self, x):
        U = self.basis.to(x)
        xc = x - self.center.to(x)
        y = xc @ U
        return U, xc, y, xc - y @ U.T

    def log_prob(self, x, sigma):
        """log q_sigma(x) (sigma > 0 required)."""
        x = check_points(x, self.dim)
        sigma = self._sigma(sigma)
        _, _, y, r = self._split(x)
        rho = y.norm(dim=-1)
        R, s2 = self.radius, sigma**2
        logJ, _ = _tilted_log_integral(R * rho / s2, self.k, self.n_nodes)
        return (
            -0.5 * self.dim * (LOG_2PI + math.log(s2))
            - 0.5 * ((r**2).sum(-1) + (rho - R) ** 2) / s2
            + logJ
            - _log_sphere_norm(self.k)
        )

    def score(self, x, sigma):
        """grad log q_sigma(x) = -(x - c)/sigma^2 + (R/sigma^2) A_k(kappa) U y/|y| (sigma > 0 required)."""
        x = check_points(x, self.dim)
        sigma = self._sigma(sigma)
        U, xc, y, _ = self._split(x)
        rho = y.norm(dim=-1, keepdim=True)
        R, s2 = self.radius, sigma**2
        _, A = _tilted_log_integral(R * rho.squeeze(-1) / s2, self.k, self.n_nodes)
        yhat = y / rho.clamp_min(torch.finfo(x.dtype).tiny)
        return (-xc + R * A.unsqueeze(-1) * (yhat @ U.T)) / s2

    # --- geometry -------------------------------------------------------------------------------
    def _direction(self, x):
        U, _, y, _ = self._split(x)
        rho = y.norm(dim=-1, keepdim=True)
        return (y / rho.clamp_min(torch.finfo(x.dtype).tiny)) @ U.T  # (..., D), 0 where y = 0

    def project(self, x):
        """Nearest point of the sphere (for x with U^T(x - c) = 0 every sphere point is nearest; returns c)."""
        x = check_points(x, self.dim)
        return self.center.to(x) + self.radius * self._direction(x)

    def distance(self, x):
        x = check_points(x, self.dim)
        _, _, y, r = self._split(x)
        return torch.sqrt((r**2).sum(-1) + (y.norm(dim=-1) - self.radius) ** 2)

    def tangent_projection(self, x):
        """(..., D, D) projector onto the tangent space of the sphere at the nearest point to x:
        U U^T - n n^T with n the radial unit vector (undefined at U^T(x - c) = 0: returns U U^T)."""
        x = check_points(x, self.dim)
        n = self._direction(x)
        U = self.basis.to(x)
        return U @ U.T - n.unsqueeze(-1) * n.unsqueeze(-2)

    def normal_projection(self, x):
        """(..., D, D) projector onto the normal space, I - tangent_projection(x)."""
        x = check_points(x, self.dim)
        return torch.eye(self.dim, dtype=x.dtype) - self.tangent_projection(x)

    def project_tangent(self, x, v):
        """Tangent part of vectors v (..., D) at points x (..., D), without forming D x D matrices."""
        x = check_points(x, self.dim)
        v = check_points(v, self.dim)
        n = self._direction(x)
        U = self.basis.to(v)
        vt = (v @ U) @ U.T
        return vt - (vt * n).sum(-1, keepdim=True) * n

    def project_normal(self, x, v):
        return v - self.project_tangent(x, v)


class MixtureOf(ScoreDistribution):
    """Finite mixture sum_j w_j p_j of distributions sharing ``dim``: log-probs combine by logsumexp,
    scores by posterior (softmax) weights. Singular if any component is."""

    def __init__(self, components, weights=None, *, dtype=torch.float64):
        self.components = list(components)
        if not self.components:
            raise ValueError("components must be non-empty")
        d = self.components[0].dim
        if any(c.dim != d for c in self.components):
            raise ValueError("components must all have the same dim")
        w = torch.ones(len(self.components), dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
        if w.shape != (len(self.components),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be non-negative, one per component, with a positive sum")
        self.weights = w / w.sum()
        self.singular = any(c.singular for c in self.components)
        self.dtype = dtype

    @property
    def dim(self) -> int:
        return self.components[0].dim

    def _sample_clean(self, n, generator):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        out = torch.empty(n, self.dim, dtype=self.dtype)
        for j, c in enumerate(self.components):
            idx = (comp == j).nonzero().squeeze(-1)
            if idx.numel():
                out[idx] = c.sample(idx.numel(), 0.0, generator=generator).to(self.dtype)
        return out

    def _logc(self, x, sigma):
        return torch.stack([c.log_prob(x, sigma) for c in self.components], -1) + torch.log(self.weights.to(x))

    def log_prob(self, x, sigma):
        x = check_points(x, self.dim)
        sigma = self._sigma(sigma)
        return torch.logsumexp(self._logc(x, sigma), -1)

    def score(self, x, sigma):
        x = check_points(x, self.dim)
        sigma = self._sigma(sigma)
        resp = torch.softmax(self._logc(x, sigma), -1)
        scores = torch.stack([c.score(x, sigma) for c in self.components], -2)  # (..., J, d)
        return (resp.unsqueeze(-1) * scores).sum(-2)


def concentric_rings(radii=(1.0, 2.0, 3.0), weights=None, *, dtype=torch.float64) -> MixtureOf:
    """Uniform laws on concentric circles in R^2 centred at 0; default weights proportional to the radius
    (i.e. uniform over total arc length). The noisy score uses the angle quadrature of ``UniformSphere``."""
    radii = [float(r) for r in radii]
    if not radii or any(not (math.isfinite(r) and r > 0) for r in radii):
        raise ValueError(f"radii must be a non-empty sequence of numbers > 0, got {radii!r}")
    comps = [UniformSphere(2, 1, radius=r, dtype=dtype) for r in radii]
    return MixtureOf(comps, radii if weights is None else weights, dtype=dtype)

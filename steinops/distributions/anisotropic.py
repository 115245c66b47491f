"""Gaussian mixtures with full (anisotropic) covariances, and Gaussian mixtures on a linear subspace.

Full covariance (``FullCovGaussianMixture``), with A_k = Sigma_k + sigma^2 I = L_k L_k^T:

    log q_sigma(x) = logsumexp_k [log w_k - |L_k^{-1}(x - mu_k)|^2 / 2 - log det L_k - d/2 log 2 pi]
    grad log q_sigma(x) = sum_k r_k(x) A_k^{-1} (mu_k - x),   r_k = softmax_k of the bracket above.

The Cholesky factors are computed once per (sigma, dtype) and cached (batched over components).

Subspace mixture (``SubspaceGaussianMixture``): x = c + U y with U (D, k) orthonormal and y ~ a full
covariance mixture in R^k, i.e. the degenerate mixture with covariances U S_k U^T in R^D. For sigma > 0,
with y = U^T (x - c) and r = (x - c) - U y (the normal residual, shared by every component):

    log q_sigma(x) = log p^{(k)}_sigma(y) - |r|^2 / (2 sigma^2) - (D - k)/2 log(2 pi sigma^2)
    grad log q_sigma(x) = U grad log p^{(k)}_sigma(y) - r / sigma^2.
"""
from __future__ import annotations

import math

import torch

from .base import LOG_2PI, ScoreDistribution, check_points, check_sigma, chunked, random_orthonormal


class FullCovGaussianMixture(ScoreDistribution):
    """Mixture of Gaussians N(mu_k, Sigma_k) in R^d with full covariances.

    Args:
        weights: (C,) non-negative, normalised internally.
        means: (C, d).
        covs: (C, d, d) symmetric positive definite (or one (d, d) shared by all components).
    """

    def __init__(self, weights, means, covs, *, dtype=torch.float64):
        self.dtype = dtype
        self.weights = torch.as_tensor(weights, dtype=dtype)
        self.means = torch.as_tensor(means, dtype=dtype)
        covs = torch.as_tensor(covs, dtype=dtype)
        if self.weights.dim() != 1 or self.weights.numel() == 0:
            raise ValueError(f"weights must have shape (C,), got {tuple(self.weights.shape)}")
        C = self.weights.shape[0]
        if self.means.dim() != 2 or self.means.shape[0] != C:
            raise ValueError(f"means must have shape (C, d) with C = {C}, got {tuple(self.means.shape)}")
        d = self.means.shape[1]
        if covs.dim() == 2:
            covs = covs.expand(C, d, d)
        if covs.shape != (C, d, d):
            raise ValueError(f"covs must have shape ({C}, {d}, {d}) or ({d}, {d}), got {tuple(covs.shape)}")
        if not torch.allclose(covs, covs.mT, rtol=1e-10, atol=1e-12 * float(covs.abs().max())):
            raise ValueError("covs must be symmetric")
        if (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        self.covs = 0.5 * (covs + covs.mT)
        self.weights = self.weights / self.weights.sum()
        self._cache: dict = {}
        L, info = torch.linalg.cholesky_ex(self.covs)
        if (info != 0).any():
            raise ValueError("covs must be positive definite (Cholesky failed)")
        self._cache[(0.0, dtype)] = (L, 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _chol(self, sigma: float, dtype):
        key = (sigma, dtype)
        if key not in self._cache:
            if len(self._cache) > 16:
                self._cache = {k: v for k, v in self._cache.items() if k[0] == 0.0}
            A = self.covs + sigma**2 * torch.eye(self.dim, dtype=self.covs.dtype)
            L = torch.linalg.cholesky(A).to(dtype)
            self._cache[key] = (L, 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1))
        return self._cache[key]

    def _sample_clean(self, n, generator):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        L, _ = self._chol(0.0, self.dtype)
        z = torch.randn(n, self.dim, dtype=self.dtype, generator=generator)
        out = self.means[comp].clone()
        for k in range(self.weights.numel()):
            idx = (comp == k).nonzero().squeeze(-1)
            if idx.numel():
                out[idx] += z[idx] @ L[k].T
        return out

    def sample(self, n, sigma=0.0, *, generator=None):
        """(n, d) samples of q_sigma = sum_k w_k N(mu_k, Sigma_k + sigma^2 I)."""
        return super().sample(n, sigma, generator=generator)

    def _parts(self, xf: torch.Tensor, sigma: float, want_score: bool):
        L, logdet = self._chol(sigma, xf.dtype)
        mu = self.means.to(xf)
        diff = (xf.unsqueeze(0) - mu.unsqueeze(1)).transpose(1, 2)  # (C, d, N)
        z = torch.linalg.solve_triangular(L, diff, upper=False)  # (C, d, N)
        logc = (
            torch.log(self.weights.to(xf)).unsqueeze(1)
            - 0.5 * (z**2).sum(1)
            - 0.5 * logdet.unsqueeze(1)
            - 0.5 * self.dim * LOG_2PI
        )  # (C, N)
        lp = torch.logsumexp(logc, 0)
        if not want_score:
            return lp
        sol = torch.linalg.solve_triangular(L.mT, z, upper=True)  # A^{-1}(x - mu): (C, d, N)
        resp = torch.softmax(logc, 0)  # (C, N)
        s = -(resp.unsqueeze(1) * sol).sum(0).T  # (N, d)
        return lp, s

    def log_prob(self, x, sigma=0.0):
        """log q_sigma(x), shape (...)."""
        x = check_points(x, self.dim)
        sigma = check_sigma(sigma)
        xf = x.reshape(-1, self.dim)
        lp = chunked(lambda c: self._parts(c, sigma, False), xf, self.dim * self.weights.numel())
        return lp.reshape(x.shape[:-1])

    def score(self, x, sigma=0.0):
        """Exact grad log q_sigma(x), shape (..., d)."""
        x = check_points(x, self.dim)
        sigma = check_sigma(sigma)
        xf = x.reshape(-1, self.dim)
        _, s = chunked(lambda c: self._parts(c, sigma, True), xf, 3 * self.dim * self.weights.numel())
        return s.reshape(x.shape)

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def covariance(self, sigma: float = 0.0) -> torch.Tensor:
        """Covariance of q_sigma."""
        m = self.mean()
        dm = self.means - m
        cov = (self.weights[:, None, None] * (self.covs + dm[:, :, None] * dm[:, None, :])).sum(0)
        return cov + check_sigma(sigma) ** 2 * torch.eye(self.dim, dtype=cov.dtype)


def _random_covs(C, d, eig_range, generator, dtype):
    lo, hi = eig_range
    if not 0 < lo <= hi:
        raise ValueError(f"eig_range must satisfy 0 < lo <= hi, got {eig_range!r}")
    covs = []
    for _ in range(C):
        Q = random_orthonormal(d, d, generator, dtype)
        ev = lo + (hi - lo) * torch.rand(d, dtype=dtype, generator=generator)
        covs.append((Q * ev) @ Q.T)
    return torch.stack(covs)


def random_gmm(
    d: int = 2,
    n_components: int = 4,
    *,
    mean_scale: float = 3.0,
    eig_range=(0.25, 2.0),
    seed: int = 0,
    dtype=torch.float64,
) -> FullCovGaussianMixture:
    """A random anisotropic mixture: means ~ N(0, mean_scale^2 I), covariances Q diag(eig) Q^T with Haar Q
    and eigenvalues uniform in ``eig_range``, Dirichlet(1)-like weights. Deterministic given ``seed``."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
    g = torch.Generator().manual_seed(seed)
    w = -torch.log(torch.rand(n_components, dtype=dtype, generator=g)) + 0.1
    means = mean_scale * torch.randn(n_components, d, dtype=dtype, generator=g)
    covs = _random_covs(n_components, d, eig_range, g, dtype)
    return FullCovGaussianMixture(w, means, covs, dtype=dtype)


class SubspaceGaussianMixture(ScoreDistribution):
    """Gaussian mixture supported on the affine k-dim subspace {c + U y} of R^D (singular for sigma = 0).

    Args:
        basis: (D, k) with orthonormal columns U.
        weights, means, covs: the mixture of y in R^k (means (C, k), covs (C, k, k) positive definite).
        offset: (D,) point c of the subspace (default 0: a linear subspace).
    """

    singular = True

    def __init__(self, basis, weights, means, covs, offset=None, *, dtype=torch.float64):
        self.dtype = dtype
        U = torch.as_tensor(basis, dtype=dtype)
        if U.dim() != 2 or U.shape[1] > U.shape[0] or U.shape[1] < 1:
            raise ValueError(f"basis must have shape (D, k) with 1 <= k <= D, got {tuple(U.shape)}")
        if not torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=dtype), atol=1e-8):
            raise ValueError("basis must have orthonormal columns")
        self.basis = U
        self.inner = FullCovGaussianMixture(weights, means, covs, dtype=dtype)
        if self.inner.dim != U.shape[1]:
            raise ValueError(f"means must have shape (C, k) with k = {U.shape[1]}, got {tuple(self.inner.means.shape)}")
        D = U.shape[0]
        self.offset = torch.zeros(D, dtype=dtype) if offset is None else torch.as_tensor(offset, dtype=dtype)
        if self.offset.shape != (D,):
            raise ValueError(f"offset must have shape ({D},), got {tuple(self.offset.shape)}")

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def intrinsic_dim(self) -> int:
        return self.basis.shape[1]

    def _sample_clean(self, n, generator):
        y = self.inner.sample(n, 0.0, generator=generator)
        return self.offset + y @ self.basis.T

    def _split(self, x):
        U = self.basis.to(x)
        xc = x - self.offset.to(x)
        y = xc @ U
        return U, y, xc - y @ U.T

    def log_prob(self, x, sigma):
        """log q_sigma(x) (sigma > 0 required: the clean law has no Lebesgue density in R^D)."""
        x = check_points(x, self.dim)
        sigma = self._sigma(sigma)
        _, y, r = self._split(x)
        k = self.intrinsic_dim
        return (
            self.inner.log_prob(y, sigma)
            - 0.5 * (r**2).sum(-1) / sigma**2
            - 0.5 * (self.dim - k) * (LOG_2PI + 2 * math.log(sigma))
        )

    def score(self, x, sigma):
        """Exact grad log q_sigma(x) = U s_k(U^T(x - c)) - P_N (x - c) / sigma^2 (sigma > 0)."""
        x = check_points(x, self.dim)
        sigma = self._sigma(sigma)
        U, y, r = self._split(x)
        return self.inner.score(y, sigma) @ U.T - r / sigma**2

    # --- geometry -------------------------------------------------------------------------------
    def project(self, x):
        """Nearest point of the subspace, (..., D)."""
        x = check_points(x, self.dim)
        U, y, _ = self._split(x)
        return self.offset.to(x) + y @ U.T

    def distance(self, x):
        x = check_points(x, self.dim)
        return self._split(x)[2].norm(dim=-1)

    def tangent_projection(self, x=None):
        """Orthogonal projector U U^T onto the tangent space; shape (..., D, D) (a broadcast view) or (D, D)."""
        U = self.basis
        P = U @ U.T
        if x is None:
            return P
        x = check_points(x, self.dim)
        return P.to(x).expand(*x.shape[:-1], self.dim, self.dim)

    def normal_projection(self, x=None):
        """Orthogonal projector I - U U^T onto the normal space; shape (..., D, D) or (D, D)."""
        U = self.basis
        P = torch.eye(self.dim, dtype=U.dtype) - U @ U.T
        if x is None:
            return P
        x = check_points(x, self.dim)
        return P.to(x).expand(*x.shape[:-1], self.dim, self.dim)

    def project_tangent(self, x, v):
        """Tangent part of vectors v (..., D) attached at points x (..., D)."""
        check_points(x, self.dim)
        v = check_points(v, self.dim)
        U = self.basis.to(v)
        return (v @ U) @ U.T

    def project_normal(self, x, v):
        """Normal part of vectors v (..., D) attached at points x (..., D)."""
        return v - self.project_tangent(x, v)


def random_subspace_gmm(
    D: int = 10,
    k: int = 2,
    n_components: int = 3,
    *,
    mean_scale: float = 3.0,
    eig_range=(0.25, 1.0),
    seed: int = 0,
    dtype=torch.float64,
) -> SubspaceGaussianMixture:
    """A random anisotropic mixture in R^k placed on a Haar-random k-dim linear subspace of R^D."""
    for name, v in (("D", D), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if k > D:
        raise ValueError(f"k must be <= D, got k={k}, D={D}")
    inner = random_gmm(k, n_components, mean_scale=mean_scale, eig_range=eig_range, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 7919)
    U = random_orthonormal(D, k, g, dtype)
    return SubspaceGaussianMixture(U, inner.weights, inner.means, inner.covs, dtype=dtype)

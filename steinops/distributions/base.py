"""Common protocol, argument checks and quadrature helpers for the exact-score test distributions.

Every distribution ``p`` here is a law ``q`` on R^d together with its Gaussian smoothings
``q_sigma = q * N(0, sigma^2 I)``:

    p.dim                                   -> d
    p.sample(n, sigma=0.0, *, generator)    -> (n, d) float64 samples of q_sigma
    p.score(x, sigma)                       -> (..., d) exact grad log q_sigma(x) (up to quadrature error)
    p.log_prob(x, sigma)                    -> (...,)  log q_sigma(x)

Singular or discontinuous clean laws (curves, rings, spheres, subspaces, the checkerboard) have no
finite score at sigma = 0: ``score`` (and ``log_prob`` where the clean law has no Lebesgue density)
raise ``ValueError`` naming ``sigma`` there; ``singular = True`` marks them.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

LOG_2PI = math.log(2 * math.pi)


def check_sigma(sigma, *, positive: bool = False, who: str = "") -> float:
    """Return ``sigma`` as a float; ValueError (naming ``sigma``) unless finite and >= 0 (> 0 if ``positive``)."""
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() != 1:
            raise ValueError(f"sigma must be a scalar, got a tensor of shape {tuple(sigma.shape)}")
        sigma = sigma.item()
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"sigma must be a real number, got {sigma!r}") from None
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    if positive and s == 0:
        raise ValueError(
            f"sigma must be > 0 for {who or 'this distribution'}: its clean density is singular or "
            "discontinuous, so the sigma = 0 score (and log-density) is undefined/infinite"
        )
    return s


def check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return int(n)


def check_points(x, dim: int) -> torch.Tensor:
    """x as a floating tensor of shape (..., dim); ValueError naming ``x`` otherwise."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float64)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (..., {dim}), got {tuple(x.shape)}")
    return x


class ScoreDistribution:
    """Base class: subclasses implement ``_sample_clean(n, generator)``, ``score`` and ``log_prob``."""

    singular: bool = False  # True: sigma must be > 0 for score (and log_prob)
    dtype: torch.dtype = torch.float64

    @property
    def dim(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _sigma(self, sigma, *, for_density: bool = True) -> float:
        return check_sigma(sigma, positive=self.singular and for_density, who=type(self).__name__)

    def _sample_clean(self, n: int, generator) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def sample(self, n: int, sigma: float = 0.0, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, d) samples of q_sigma (clean samples of q for sigma = 0)."""
        n = check_n(n)
        sigma = check_sigma(sigma)
        x = self._sample_clean(n, generator)
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, dtype=x.dtype, generator=generator)
        return x

    def score(self, x: torch.Tensor, sigma: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, sigma: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"


@lru_cache(maxsize=32)
def _leggauss_np(n: int):
    return np.polynomial.legendre.leggauss(n)


def gauss_legendre(n: int, a: float = -1.0, b: float = 1.0, *, dtype=torch.float64):
    """n-point Gauss-Legendre nodes and weights on [a, b]."""
    t, w = _leggauss_np(int(n))
    t = torch.as_tensor(t, dtype=dtype)
    w = torch.as_tensor(w, dtype=dtype)
    return 0.5 * (b - a) * t + 0.5 * (b + a), 0.5 * (b - a) * w


def composite_gauss_legendre(a: float, b: float, panels: int, order: int = 8, *, dtype=torch.float64):
    """Composite rule: ``panels`` equal panels of ``order``-point Gauss-Legendre on [a, b]."""
    t, w = gauss_legendre(order, 0.0, 1.0, dtype=dtype)
    h = (b - a) / panels
    left = a + h * torch.arange(panels, dtype=dtype)
    return (left[:, None] + h * t).reshape(-1), (h * w).expand(panels, order).reshape(-1)


def random_orthonormal(D: int, k: int, generator=None, dtype=torch.float64) -> torch.Tensor:
    """(D, k) matrix with orthonormal columns, Haar-distributed."""
    g = torch.randn(D, k, dtype=dtype, generator=generator)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones((), dtype=dtype))


def chunked(fn, x: torch.Tensor, per_point_cost: int, budget: int = 2**23):
    """Apply ``fn`` to a flat (N, d) ``x`` in row chunks so that chunk * per_point_cost <= budget."""
    step = max(1, budget // max(1, per_point_cost))
    if x.shape[0] <= step:
        return fn(x)
    outs = [fn(x[i : i + step]) for i in range(0, x.shape[0], step)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(o, 0) for o in zip(*outs))
    return torch.cat(outs, 0)

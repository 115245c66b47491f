"""Noise levels of a noise-conditional score model: the geometric schedule with the NCSNv2 rules, and
the variance-exploding SDE it discretises.

NCSNv2 (Song & Ermon 2020) rules, for data in R^D:
  * sigma_max  = the largest pairwise distance of the training data (technique 1);
  * the ratio gamma = sigma_{i-1} / sigma_i solves
        Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) = 0.5     (technique 2),
    which has a root only for D large enough (D >= about 10); below that any ratio keeps neighbouring
    levels overlapping and we fall back to ``DEFAULT_LEVELS`` levels;
  * Langevin step size eps (x <- x + a_i s + sqrt(2 a_i) z, a_i = eps sigma_i^2 / sigma_L^2) such that
        (1 - eps/sigma_L^2)^(2T) (gamma^2 - 2 eps / (sigma_L^2 - sigma_L^2 (1 - eps/sigma_L^2)^2))
          + 2 eps / (sigma_L^2 - sigma_L^2 (1 - eps/sigma_L^2)^2) = 1                        (technique 4).
"""
from __future__ import annotations

import math

import torch
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import norm

DEFAULT_LEVELS = 10  # low dimension: technique 2 has no root


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def max_pairwise_distance(data: torch.Tensor, max_points: int = 4096, generator: torch.Generator | None = None) -> float:
    """Largest pairwise Euclidean distance of ``data`` (N, D) (on a random subset of ``max_points`` rows)."""
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.shape[0] < 2:
        raise ValueError(f"data must be a tensor of shape (N >= 2, D), got {getattr(data, 'shape', type(data))}")
    if data.shape[0] > max_points:
        data = data[torch.randperm(data.shape[0], generator=generator)[:max_points]]
    x = data.double()
    return max(float(torch.cdist(x[i:i + 512], x).max()) for i in range(0, x.shape[0], 512))


def ncsnv2_ratio(dim: int) -> float | None:
    """gamma = sigma_{i-1}/sigma_i of NCSNv2 technique 2 for data dimension ``dim`` (None: no root, low D)."""
    a = math.sqrt(2 * dim)
    f = lambda g: norm.cdf(a * (g - 1) + 3 * g) - norm.cdf(a * (g - 1) - 3 * g) - 0.5
    hi = 1.0 + 1.0 / math.sqrt(dim) * 20
    if f(1.0 + 1e-12) <= 0 or f(hi) >= 0:
        return None
    return brentq(f, 1.0 + 1e-12, hi)


def ncsnv2_step_size(gamma: float, sigma_min: float, n_steps_each: int) -> float:
    """Langevin step size eps of NCSNv2 technique 4 (for a_i = eps sigma_i^2 / sigma_min^2)."""
    if isinstance(n_steps_each, bool) or not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise ValueError(f"n_steps_each must be a positive integer, got {n_steps_each!r}")
    s2 = sigma_min**2

    def excess(log_ratio):  # the technique-4 expression minus 1, as a function of log(eps / sigma_min^2)
        u = math.exp(log_ratio)
        r = 1 - u
        c = 2 * u / (1 - r**2)
        return r ** (2 * n_steps_each) * (gamma**2 - c) + c - 1.0

    res = minimize_scalar(excess, bounds=(math.log(1e-10), math.log(0.999)), method="bounded",
                          options={"xatol": 1e-6})
    return s2 * math.exp(res.x)


class NoiseSchedule:
    """Geometric noise levels sigma_1 > ... > sigma_L (``sigmas``, float64 tensor (L,)).

    Args:
        sigma_max, sigma_min: the largest and smallest level, sigma_max > sigma_min > 0.
        n_levels: L >= 2.
    """

    def __init__(self, sigma_max: float, sigma_min: float, n_levels: int):
        sigma_max, sigma_min = _check_positive("sigma_max", sigma_max), _check_positive("sigma_min", sigma_min)
        if sigma_min >= sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min} >= sigma_max={sigma_max}")
        if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2:
            raise ValueError(f"n_levels must be an integer >= 2, got {n_levels!r}")
        self.sigma_max, self.sigma_min, self.n_levels = sigma_max, sigma_min, n_levels
        self.sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n_levels, dtype=torch.float64))

    @property
    def ratio(self) -> float:
        """gamma = sigma_{i-1} / sigma_i."""
        return (self.sigma_max / self.sigma_min) ** (1.0 / (self.n_levels - 1))

    def __len__(self):
        return self.n_levels

    def __repr__(self):
        return f"NoiseSchedule(sigma_max={self.sigma_max:.4g}, sigma_min={self.sigma_min:.4g}, n_levels={self.n_levels})"

    @classmethod
    def ncsnv2(cls, data: torch.Tensor, sigma_min: float = 0.01, n_levels: int | None = None,
               sigma_max: float | None = None) -> "NoiseSchedule":
        """The NCSNv2 schedule for ``data`` (N, D): sigma_max = largest pairwise distance (unless given),
        L from technique 2 (``DEFAULT_LEVELS`` where it has no root) unless ``n_levels`` is given."""
        if sigma_max is None:
            sigma_max = max_pairwise_distance(data.reshape(data.shape[0], -1))
        if n_levels is None:
            gamma = ncsnv2_ratio(data[0].numel())
            n_levels = DEFAULT_LEVELS if gamma is None else max(2, math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma)) + 1)
        return cls(sigma_max, sigma_min, n_levels)

    def langevin_step_size(self, n_steps_each: int) -> float:
        """eps for annealed Langevin with ``n_steps_each`` steps per level (NCSNv2 technique 4)."""
        return ncsnv2_step_size(self.ratio, self.sigma_min, n_steps_each)

    def sde(self) -> "VESDE":
        return VESDE(self.sigma_max, self.sigma_min)


class VESDE:
    """Variance-exploding SDE dx = g(t) dw on t in [0, 1] with sigma(t) = sigma_min (sigma_max/sigma_min)^t:
    g(t)^2 = d sigma(t)^2 / dt = 2 sigma(t)^2 log(sigma_max / sigma_min). The marginal at t is the data
    convolved with N(0, (sigma(t)^2 - sigma_min^2) I) ~ q_sigma(t); the prior is N(0, sigma_max^2 I)."""

    def __init__(self, sigma_max: float, sigma_min: float):
        sigma_max, sigma_min = _check_positive("sigma_max", sigma_max), _check_positive("sigma_min", sigma_min)
        if sigma_min >= sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min} >= sigma_max={sigma_max}")
        self.sigma_max, self.sigma_min = sigma_max, sigma_min
        self.log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t):
        """sigma(t) for t in [0, 1] (float or tensor)."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def g2(self, t):
        """Squared diffusion coefficient g(t)^2."""
        return 2 * self.sigma(t) ** 2 * self.log_ratio

    def prior_sample(self, n: int, dim: int, *, generator=None, dtype=torch.float32) -> torch.Tensor:
        """(n, dim) samples of the prior N(0, sigma_max^2 I)."""
        return self.sigma_max * torch.randn(n, dim, generator=generator, dtype=dtype)

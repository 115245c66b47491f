"""2-D toys with discontinuous or singular clean laws: the checkerboard and curves (two moons, spiral).

Checkerboard: uniform on S filled axis-aligned squares [a, b] (cells (i, j) of an n x n board with
i + j even). A uniform box convolved with N(0, sigma^2 I) factorises into erf differences, so

    q_sigma(x) = (1/S) sum_s prod_i [Phi((b_si - x_i)/sigma) - Phi((a_si - x_i)/sigma)] / (b_si - a_si)
    d/dx_i log(Phi(hi) - Phi(lo)) = (phi(lo) - phi(hi)) / (sigma (Phi(hi) - Phi(lo)))

evaluated in log space with ``log_ndtr`` and the reflection Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi), so
it is exact (to rounding) for every sigma > 0. At sigma = 0, ``log_prob`` is the piecewise-constant
clean log-density (-inf off the board) and ``score`` raises ValueError.

Curves: a union of parametrised pieces c_j(t), t in [t0_j, t1_j], each with mass w_j, uniform in t.
    q_sigma(x) = sum_j w_j / (t1_j - t0_j) int N(x; c_j(t), sigma^2 I) dt,
    grad log q_sigma(x) = E[c(t) - x | x] / sigma^2,
with composite 8-point Gauss-Legendre quadrature whose panels are at most sigma / (4 * max speed)
long (so the Gaussian along the curve is resolved; error well below 1e-10 relative). Cost grows
like 1/sigma: keep sigma >~ 1e-3 for large batches.
"""
from __future__ import annotations

import math

import torch

from .base import LOG_2PI, ScoreDistribution, check_points, chunked, composite_gauss_legendre

_HALF_LOG_2PI = 0.5 * LOG_2PI


def _log1mexp(t: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(t)) for t <= 0, stable."""
    return torch.where(t > -math.log(2.0), torch.log(-torch.expm1(t)), torch.log1p(-torch.exp(t)))


def log_ndtr_diff(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails."""
    flip = (lo + hi) > 0
    lo2 = torch.where(flip, -hi, lo)
    hi2 = torch.where(flip, -lo, hi)
    a = torch.special.log_ndtr(hi2)
    b = torch.special.log_ndtr(lo2)
    return a + _log1mexp((b - a).clamp_max(0.0))


class Checkerboard(ScoreDistribution):
    """Uniform law on the filled squares of an ``n_cells`` x ``n_cells`` board of side ``cell_size`` centred at
    the origin; cell (i, j) is filled when i + j is even (the FFJORD checkerboard for the defaults)."""

    singular = True  # discontinuous density: score undefined at sigma = 0

    def __init__(self, n_cells: int = 4, cell_size: float = 2.0, *, dtype=torch.float64):
        if isinstance(n_cells, bool) or not isinstance(n_cells, int) or n_cells < 1:
            raise ValueError(f"n_cells must be a positive integer, got {n_cells!r}")
        if not (isinstance(cell_size, (int, float)) and math.isfinite(cell_size) and cell_size > 0):
            raise ValueError(f"cell_size must be a finite number > 0, got {cell_size!r}")
        self.dtype = dtype
        self.n_cells, self.cell_size = n_cells, float(cell_size)
        origin = -0.5 * n_cells * self.cell_size
        cells = [(i, j) for i in range(n_cells) for j in range(n_cells) if (i + j) % 2 == 0]
        ij = torch.tensor(cells, dtype=dtype)
        self.lo = origin + self.cell_size * ij  # (S, 2)
        self.hi = self.lo + self.cell_size

    @property
    def dim(self) -> int:
        return 2

    def _sample_clean(self, n, generator):
        sq = torch.randint(self.lo.shape[0], (n,), generator=generator)
        u = torch.rand(n, 2, dtype=self.dtype, generator=generator)
        return self.lo[sq] + self.cell_size * u

    def _parts(self, x, sigma):
        lo = (self.lo.to(x) - x.unsqueeze(-2)) / sigma  # (..., S, 2)
        hi = (self.hi.to(x) - x.unsqueeze(-2)) / sigma
        ld = log_ndtr_diff(lo, hi)  # (..., S, 2)
        logc = ld.sum(-1) - 2 * math.log(self.cell_size) - math.log(self.lo.shape[0])
        return lo, hi, ld, logc

    def log_prob(self, x, sigma):
        """log q_sigma(x); at sigma = 0 the clean piecewise-constant log-density (-inf off the squares)."""
        x = check_points(x, self.dim)
        sigma = self._sigma(sigma, for_density=False)
        if sigma == 0:
            inside = ((x.unsqueeze(-2) >= self.lo.to(x)) & (x.unsqueeze(-2) <= self.hi.to(x))).all(-1).any(-1)
            val = -2 * math.log(self.cell_size) - math.log(self.lo.shape[0])
            return torch.where(inside, torch.full_like(x[..., 0], val), torch.full_like(x[..., 0], -math.inf))
        return torch.logsumexp(self._parts(x, sigma)[3], -1)

    def score(self, x, sigma):
        """Exact grad log q_sigma(x) by the per-square erf formula (sigma > 0 required)."""
        x = check_points(x, self.dim)
        sigma = self._sigma(sigma)
        lo, hi, ld, logc = self._parts(x, sigma)
        g = (torch.exp(-0.5 * lo**2 - _HALF_LOG_2PI - ld) - torch.exp(-0.5 * hi**2 - _HALF_LOG_2PI - ld)) / sigma
        resp = torch.softmax(logc, -1)
        return (resp.unsqueeze(-1) * g).sum(-2)


class CurveDistribution(ScoreDistribution):
    """Union of parametrised planar (or R^d) curve pieces, uniform in the parameter on each piece.

    Args:
        pieces: list of (fn, t0, t1, weight, max_speed) with fn mapping a (m,) tensor of parameters to
            (m, d) points; max_speed bounds |fn'(t)| (sets the quadrature resolution).
    """

    singular = True

    def __init__(self, pieces, *, dtype=torch.float64):
        if not pieces:
            raise ValueError("pieces must be non-empty")
        self.pieces = [(fn, float(t0), float(t1), float(w), float(v)) for fn, t0, t1, w, v in pieces]
        if any(not t1 > t0 or w < 0 or v <= 0 for _, t0, t1, w, v in self.pieces):
            raise ValueError("pieces need t1 > t0, weight >= 0 and max_speed > 0")
        w = torch.tensor([p[3] for p in self.pieces], dtype=dtype)
        if w.sum() <= 0:
            raise ValueError("piece weights must have a positive sum")
        self.weights = w / w.sum()
        self.dtype = dtype
        self._dim = int(self.pieces[0][0](torch.zeros(1, dtype=dtype)).shape[-1])
        self._nodes_cache: dict = {}

    @property
    def dim(self) -> int:
        return self._dim

    def _sample_clean(self, n, generator):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        u = torch.rand(n, dtype=self.dtype, generator=generator)
        out = torch.empty(n, self.dim, dtype=self.dtype)
        for j, (fn, t0, t1, _, _) in enumerate(self.pieces):
            idx = (comp == j).nonzero().squeeze(-1)
            if idx.numel():
                out[idx] = fn(t0 + (t1 - t0) * u[idx]).to(self.dtype)
        return out

    def quadrature(self, sigma: float):
        """Points (M, d) and log weights (M,) (summing to 1 in exp) of the clean-law quadrature at ``sigma``."""
        if sigma not in self._nodes_cache:
            if len(self._nodes_cache) > 8:
                self._nodes_cache.clear()
            pts, logw = [], []
            for j, (fn, t0, t1, _, speed) in enumerate(self.pieces):
                panels = max(16, math.ceil((t1 - t0) * speed * 4.0 / sigma))
                t, w = composite_gauss_legendre(t0, t1, panels, 8, dtype=self.dtype)
                pts.append(fn(t).to(self.dtype))
                logw.append(torch.log(w / (t1 - t0)) + torch.log(self.weights[j]))
            self._nodes_cache[sigma] = (torch.cat(pts), torch.cat(logw))
        return self._nodes_cache[sigma]

    def _eval(self, xf, sigma, want_score):
        pts, logw = self.quadrature(sigma)
        pts, logw = pts.to(xf), logw.to(xf)

        def f(xc):
            d2 = (xc * xc).sum(-1, keepdim=True) - 2 * xc @ pts.T + (pts * pts).sum(-1)
            logc = logw - 0.5 * d2.clamp_min(0) / sigma**2
            lp = torch.logsumexp(logc, -1) - 0.5 * self.dim * (LOG_2PI + 2 * math.log(sigma))
            if not want_score:
                return lp
            post_mean = torch.softmax(logc, -1) @ pts
            return lp, (post_mean - xc) / sigma**2

        return chunked(f, xf, pts.shape[0] * 3)

    def log_prob(self, x, sigma):
        """log q_sigma(x) by quadrature (sigma > 0 required)."""
        x = check_points(x, self.dim)
        sigma = self._sigma(sigma)
        return self._eval(x.reshape(-1, self.dim), sigma, False).reshape(x.shape[:-1])

    def score(self, x, sigma):
        """grad log q_sigma(x) = (E[c(t) | x] - x) / sigma^2 by quadrature (sigma > 0 required)."""
        x = check_points(x, self.dim)
        sigma = self._sigma(sigma)
        return self._eval(x.reshape(-1, self.dim), sigma, True)[1].reshape(x.shape)


def two_moons(scale: float = 1.0, *, dtype=torch.float64) -> CurveDistribution:
    """sklearn's two moons (noise-free), scaled by ``scale``: the upper arc (cos t, sin t) and the lower arc
    (1 - cos t, 1/2 - sin t), t in [0, pi], equal mass, uniform in arc length."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    s = float(scale)
    up = lambda t: s * torch.stack([torch.cos(t), torch.sin(t)], -1)  # noqa: E731
    low = lambda t: s * torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], -1)  # noqa: E731
    return CurveDistribution([(up, 0.0, math.pi, 1.0, s), (low, 0.0, math.pi, 1.0, s)], dtype=dtype)


def spiral(turns: float = 1.5, scale: float = 1.0, *, dtype=torch.float64) -> CurveDistribution:
    """Archimedean spiral r = scale * t / (2 pi), t in [pi/2, pi/2 + 2 pi turns], uniform in the angle t
    (not in arc length)."""
    if not (isinstance(turns, (int, float)) and math.isfinite(turns) and turns > 0):
        raise ValueError(f"turns must be a finite number > 0, got {turns!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    s, t0 = float(scale), math.pi / 2
    t1 = t0 + 2 * math.pi * float(turns)
    fn = lambda t: (s * t / (2 * math.pi)).unsqueeze(-1) * torch.stack([torch.cos(t), torch.sin(t)], -1)  # noqa: E731
    speed = s / (2 * math.pi) * math.sqrt(1 + t1**2)
    return CurveDistribution([(fn, t0, t1, 1.0, speed)], dtype=dtype)

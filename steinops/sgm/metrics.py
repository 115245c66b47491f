"""Sample-quality metrics for score-based generative models on toys with exact scores.

Two-sample distances between generated samples x (N, d) and reference samples y (M, d):

    mmd               unbiased MMD^2 with the RBF kernel k = exp(-|x - y|^2 / (2 h^2)),
                      h = median pairwise distance of the pooled sample (no extra factor):
                          sum_{i!=j} k(x_i, x_j) / (N(N-1)) + sum_{i!=j} k(y_i, y_j) / (M(M-1))
                          - 2 sum_{i,j} k(x_i, y_j) / (N M)
                      (one fused ``steinops.kernel_matvec``: O((N + M) d) memory, never N x M)
    energy_distance   2 E|X - Y| - E|X - X'| - E|Y - Y'| (U-statistics within each sample), by chunked cdist
    sliced_wasserstein  ( mean over random unit directions theta of W_p^p(theta.X, theta.Y) )^(1/p), 1-D W_p
                      exact between the two empirical laws (quantile functions on the merged grid i/N, j/M)

Against the target itself:

    mode_weights / mode_weight_error   fraction of samples assigned (max posterior) to each mixture component
    ksd_to_exact      V-statistic KSD^2 of the samples with the EXACT score of q_sigma (``steinops.ksd``)
    relative_fisher_error / fisher_error_per_level   sum |g - s|^2 / sum |s|^2 of a score model vs the exact score

Everything is computed in float64 (samples of any floating dtype are upcast); every function returns
Python floats (``mode_weights`` a tensor) and raises TypeError / ValueError naming the bad argument.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import Tensor

from ..bandwidth import median_distance
from ..distributions import FullCovGaussianMixture, GaussianMixture
from ..ops import kernel_matvec, ksd

__all__ = [
    "energy_distance", "fisher_error_per_level", "ksd_to_exact", "mmd", "mode_weight_error", "mode_weights",
    "relative_fisher_error", "sample_metrics", "sliced_wasserstein",
]

_CHUNK_ELEMENTS = 2**22  # pair distances per cdist block (32 MiB in float64)


# ---- argument checks ---------------------------------------------------------------------------------------

def _samples(name: str, x, min_rows: int = 2) -> Tensor:
    """``x`` as a finite float64 (N, d) tensor with N >= min_rows."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, d), got {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples (rows), got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has no features: shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.detach().to(torch.float64)


def _pair(x, y, min_rows: int = 2) -> tuple[Tensor, Tensor]:
    x = _samples("x", x, min_rows)
    y = _samples("y", y, min_rows)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension d: x {tuple(x.shape)}, y {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on one device: x on {x.device}, y on {y.device}")
    return x, y


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


# ---- two-sample distances ----------------------------------------------------------------------------------

def mmd(x: Tensor, y: Tensor, *, bandwidth="median") -> float:
    """Unbiased squared maximum mean discrepancy with the RBF kernel ``exp(-|x - y|^2 / (2 h^2))``.

    Args:
        x: (N, d) samples, N >= 2.   y: (M, d) samples, M >= 2.
        bandwidth: h > 0, or "median": the median pairwise distance of the pooled sample
            (``steinops.bandwidth.median_distance``: an evenly strided subset of at most 1024 points).

    Returns:
        MMD^2_u = sum_{i!=j} k(x_i,x_j)/(N(N-1)) + sum_{i!=j} k(y_i,y_j)/(M(M-1)) - 2 mean_{ij} k(x_i,y_j);
        unbiased, so it can be slightly negative when x and y come from one law.
    """
    x, y = _pair(x, y)
    N, M = x.shape[0], y.shape[0]
    z = torch.cat([x, y])
    z = z - z.mean(0)  # translation invariant; keeps the fused |a - b|^2 accurate
    if isinstance(bandwidth, str):
        if bandwidth.lower() != "median":
            raise ValueError(f"bandwidth must be a positive number or 'median', got {bandwidth!r}")
        h = float(median_distance(z))
    else:
        if isinstance(bandwidth, Tensor) and bandwidth.numel() == 1:
            bandwidth = bandwidth.item()
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real) \
                or not math.isfinite(bandwidth) or bandwidth <= 0:
            raise ValueError(f"bandwidth must be a positive number or 'median', got {bandwidth!r}")
        h = float(bandwidth)
    # one fused product K(z, z) @ [1_x | 1_y]: rows of x give (K_xx 1, K_xy 1), rows of y give K_yy 1
    ind = torch.zeros(N + M, 2, dtype=z.dtype, device=z.device)
    ind[:N, 0] = 1
    ind[N:, 1] = 1
    S = kernel_matvec(z, z, ind, kernel="rbf", bandwidth=h)
    kxx = S[:N, 0].sum() - N  # remove the diagonal k(x, x) = 1
    kyy = S[N:, 1].sum() - M
    kxy = S[:N, 1].sum()
    return float(kxx / (N * (N - 1)) + kyy / (M * (M - 1)) - 2 * kxy / (N * M))


def _pair_distance_sum(a: Tensor, b: Tensor) -> Tensor:
    """sum_{i,j} |a_i - b_j| in float64, in row blocks so at most ``_CHUNK_ELEMENTS`` distances are held."""
    step = max(1, _CHUNK_ELEMENTS // b.shape[0])
    total = a.new_zeros(())
    for i in range(0, a.shape[0], step):
        # direct differences (no |a|^2 + |b|^2 - 2ab): exact zeros on the diagonal, no cancellation
        total = total + torch.cdist(a[i:i + step], b, compute_mode="donot_use_mm_for_euclid_dist").sum()
    return total


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (the squared form, no square root).

    Args:
        x: (N, d), N >= 2.   y: (M, d), M >= 2.

    Returns:
        2 mean_{ij} |x_i - y_j| - sum_{i!=j} |x_i - x_j| / (N(N-1)) - sum_{i!=j} |y_i - y_j| / (M(M-1))
        (U-statistics within each sample, so it is unbiased and near 0, possibly negative, for one law).
        ``scipy.stats.energy_distance`` is instead sqrt of the V-statistic version.
    """
    x, y = _pair(x, y)
    N, M = x.shape[0], y.shape[0]
    c = torch.cat([x, y]).mean(0)
    x, y = x - c, y - c
    exy = _pair_distance_sum(x, y) / (N * M)
    exx = _pair_distance_sum(x, x) / (N * (N - 1))
    eyy = _pair_distance_sum(y, y) / (M * (M - 1))
    return float(2 * exy - exx - eyy)


def _wasserstein_1d_pp(px: Tensor, py: Tensor, p: float) -> Tensor:
    """W_p^p between the empirical laws of the columns: px (N, L), py (M, L) -> (L,).

    W_p^p = int_0^1 |F_x^{-1}(u) - F_y^{-1}(u)|^p du; both quantile functions are step functions with
    breaks at i/N and j/M, so the integral is an exact finite sum over the merged grid.
    """
    N, M = px.shape[0], py.shape[0]
    sx = px.sort(0).values
    sy = py.sort(0).values
    if N == M:
        return (sx - sy).abs().pow(p).mean(0)
    # breaks in integer units of 1/(N M): {i M} U {j N}; on (a, b] x's quantile is sx[a // M], y's is sy[a // N]
    dev = px.device
    brk = torch.cat([torch.arange(0, N + 1, device=dev) * M, torch.arange(1, M, device=dev) * N]).unique(sorted=True)
    a, width = brk[:-1], (brk[1:] - brk[:-1]).to(px.dtype) / (N * M)
    diff = sx[a // M] - sy[a // N]  # (K, L)
    return (diff.abs().pow(p) * width.unsqueeze(1)).sum(0)


def sliced_wasserstein(x: Tensor, y: Tensor, *, n_projections: int = 256, p: float = 2,
                       generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein distance ``( mean_theta W_p^p(theta.X, theta.Y) )^(1/p)``.

    Args:
        x: (N, d), N >= 1.   y: (M, d), M >= 1 (N != M allowed: exact 1-D W_p between the empirical
            laws, by their quantile functions on the merged grid {i/N} U {j/M}).
        n_projections: number L of directions theta, uniform on the unit sphere (normalised Gaussians
            drawn with ``generator`` on the generator's device; in d = 1 they are +-1, so the result is
            the exact 1-D W_p).
        p: order, >= 1.

    Returns:
        The distance (not its p-th power). For Gaussians N(m1, S1), N(m2, S2) each direction contributes
        W_2^2 = (theta.(m1 - m2))^2 + (sqrt(theta^T S1 theta) - sqrt(theta^T S2 theta))^2.
    """
    x, y = _pair(x, y, min_rows=1)
    L = _positive_int("n_projections", n_projections)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p < 1:
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    _check_generator(generator)
    d = x.shape[1]
    gdev = generator.device if generator is not None else x.device
    theta = torch.randn(L, d, dtype=torch.float64, device=gdev, generator=generator).to(x.device)
    theta = theta / theta.norm(dim=1, keepdim=True)
    c = torch.cat([x, y]).mean(0)
    wpp = _wasserstein_1d_pp((x - c) @ theta.T, (y - c) @ theta.T, float(p))
    return float(wpp.mean() ** (1.0 / p))


# ---- against the target ------------------------------------------------------------------------------------

def _check_mixture(mixture):
    if not isinstance(mixture, (GaussianMixture, FullCovGaussianMixture)):
        raise TypeError(f"mixture must be a GaussianMixture or FullCovGaussianMixture, got {type(mixture).__name__}")


def mode_weights(samples: Tensor, mixture) -> Tensor:
    """Fraction of ``samples`` (N, d) assigned to each component of the CLEAN mixture, (C,) float64.

    Sample n goes to argmax_k [log w_k + log N(x_n; mu_k, Sigma_k)] (the maximum posterior component).
    """
    _check_mixture(mixture)
    x = _samples("samples", samples, min_rows=1)
    if x.shape[1] != mixture.dim:
        raise ValueError(f"samples must have shape (N, {mixture.dim}) for this mixture, got {tuple(x.shape)}")
    x = x.cpu()
    w = mixture.weights.to(torch.float64)
    mu = mixture.means.to(torch.float64)
    with torch.no_grad():
        if isinstance(mixture, GaussianMixture):
            var = mixture.stds.to(torch.float64) ** 2  # (C,)
            r2 = torch.cdist(x, mu, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (N, C)
            logc = torch.log(w) - 0.5 * r2 / var - 0.5 * x.shape[1] * torch.log(var)
        else:
            mvn = torch.distributions.MultivariateNormal(mu, covariance_matrix=mixture.covs.to(torch.float64))
            logc = torch.log(w) + mvn.log_prob(x.unsqueeze(1))  # (N, C)
    counts = torch.bincount(logc.argmax(1), minlength=w.shape[0]).to(torch.float64)
    return counts / x.shape[0]


def mode_weight_error(samples: Tensor, mixture) -> float:
    """max_k |w_hat_k - w_k| with w_hat = :func:`mode_weights` (0 = the modes hold the right mass)."""
    w_hat = mode_weights(samples, mixture)
    return float((w_hat - mixture.weights.to(torch.float64)).abs().max())


def ksd_to_exact(samples: Tensor, dist, sigma: float = 0.0, *, kernel="imq", bandwidth="median") -> float:
    """V-statistic KSD^2 of ``samples`` (N, d) against the exact score of q_sigma = dist * N(0, sigma^2 I).

    Args:
        samples: (N, d), N >= 1.
        dist: a ``steinops.distributions`` law (``dist.score(x, sigma)``).
        sigma: noise level >= 0; must be > 0 for singular laws (``dist.singular``: the clean score is undefined).
        kernel: "imq" ``(1 + r^2/h^2)^(-1/2)`` (default: its KSD detects non-convergence) or "rbf".
        bandwidth: h > 0 or a rule of ``steinops.bandwidth`` ("median" = 2 x median pairwise distance there).

    Returns:
        mean_{i,j} u_p(x_i, x_j) >= 0 (``steinops.ksd(..., u_statistic=False)``, O(N d) memory).
        Like every score-based discrepancy it is nearly blind to the mixing weights of well-separated
        modes (the score hardly depends on them); :func:`mode_weight_error` measures those.
    """
    x = _samples("samples", samples, min_rows=1)
    if not hasattr(dist, "score") or not hasattr(dist, "dim"):
        raise TypeError(f"dist must be a steinops distribution with .score and .dim, got {type(dist).__name__}")
    if isinstance(sigma, Tensor) and sigma.numel() == 1:
        sigma = sigma.item()
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if getattr(dist, "singular", False) and sigma == 0:
        raise ValueError(f"sigma must be > 0 for the singular law {type(dist).__name__}: its clean score is undefined")
    if x.shape[1] != dist.dim:
        raise ValueError(f"samples must have shape (N, {dist.dim}) for this distribution, got {tuple(x.shape)}")
    with torch.no_grad():
        s = dist.score(x.cpu(), float(sigma)).to(device=x.device, dtype=torch.float64)
        if not bool(torch.isfinite(s).all()):
            raise ValueError("samples: the exact score is not finite at some samples (outside the support?)")
        return float(ksd(x, s, kernel=kernel, bandwidth=bandwidth, u_statistic=False))


def relative_fisher_error(estimate: Tensor, exact: Tensor) -> float:
    """Relative Fisher error ``sum |g - s|^2 / sum |s|^2`` of score estimates g against exact scores s.

    Args:
        estimate: (N, ...) estimated scores g.   exact: the exact scores s, same shape, not all zero.
    """
    for name, t in (("estimate", estimate), ("exact", exact)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() < 2 or t.numel() == 0:
            raise ValueError(f"{name} must have shape (N, d) (or (N, ...)), got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    if estimate.shape != exact.shape:
        raise ValueError(f"estimate and exact must have one shape: {tuple(estimate.shape)} vs {tuple(exact.shape)}")
    if estimate.device != exact.device:
        raise ValueError(f"estimate and exact must be on one device: {estimate.device} vs {exact.device}")
    g = estimate.detach().to(torch.float64)
    s = exact.detach().to(torch.float64)
    den = (s * s).sum()
    if not den > 0:
        raise ValueError("exact is identically zero, so the relative error is undefined")
    return float(((g - s) ** 2).sum() / den)


def _sigma_list(sigmas) -> list[float]:
    if isinstance(sigmas, Tensor):
        if sigmas.dim() > 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
        sigmas = sigmas.detach().reshape(-1).tolist()
    elif isinstance(sigmas, numbers.Real):
        sigmas = [sigmas]
    try:
        out = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise ValueError(f"sigmas must be a sequence or 1-D tensor of numbers, got {sigmas!r}") from None
    if not out:
        raise ValueError("sigmas is empty")
    if not all(math.isfinite(s) and s >= 0 for s in out):
        raise ValueError(f"sigmas must be finite and >= 0, got {out}")
    return out


def fisher_error_per_level(score_fn: Callable[[Tensor, Tensor], Tensor], dist, sigmas, n: int, *,
                           generator: torch.Generator | None = None, device=None) -> list[float]:
    """Relative Fisher error of ``score_fn`` against the exact score at n fresh samples of q_sigma, per level.

    Args:
        score_fn: ``f(x (n, d), sigma (n,)) -> (n, d)`` (see ``steinops.sgm.samplers``).
        dist: a ``steinops.distributions`` law.   sigmas: (L,) noise levels (> 0 for singular laws).
        n: samples per level.   generator: draws the samples.
        device: where x and sigma are put before calling ``score_fn`` (default: the CPU, float64).

    Returns:
        [sum |f(x, sigma_l) - s_l(x)|^2 / sum |s_l(x)|^2 for each level l]; a level whose ``score_fn`` output
        is not finite reports ``inf`` (a diverged model shows in the log instead of stopping a run).
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    n = _positive_int("n", n)
    levels = _sigma_list(sigmas)
    _check_generator(generator)
    if getattr(dist, "singular", False) and min(levels) == 0:
        raise ValueError(f"sigmas must all be > 0 for the singular law {type(dist).__name__}")
    out = []
    for sig in levels:
        x = dist.sample(n, sig, generator=generator).to(torch.float64)
        exact = dist.score(x, sig).to(torch.float64)
        xin = x if device is None else x.to(device)
        g = score_fn(xin, torch.full((n,), sig, dtype=xin.dtype, device=xin.device))
        if not isinstance(g, Tensor) or tuple(g.shape) != tuple(x.shape):
            raise ValueError(f"score_fn must return a tensor of shape {tuple(x.shape)}, got "
                             f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}")
        g = g.detach().to(device="cpu", dtype=torch.float64)
        out.append(relative_fisher_error(g, exact) if bool(torch.isfinite(g).all()) else math.inf)
    return out


def sample_metrics(samples: Tensor, dist, *, reference: Tensor | None = None, n_reference: int | None = None,
                   generator: torch.Generator | None = None, n_projections: int = 256,
                   ksd_sigma: float | None = None) -> dict[str, float]:
    """All sample metrics of ``samples`` (N, d) against ``dist``, as a flat dict of floats.

    Args:
        samples: (N, d) generated samples, N >= 2, finite.
        dist: the target law (a ``steinops.distributions`` object).
        reference: (M, d) reference samples of dist; default: ``dist.sample(n_reference, generator=generator)``.
        n_reference: size of the fresh reference sample (default N).
        generator: draws the reference samples and the sliced-Wasserstein directions.
        n_projections: directions for ``sliced_w2``.
        ksd_sigma: noise level of the exact score in the KSD; default 0 for regular laws. For singular laws
            (``dist.singular``) the clean score is undefined: pass ksd_sigma > 0, else "ksd" is left out.

    Returns:
        {"mmd", "energy", "sliced_w2", "ksd", and "mode_weight_error" for (FullCov)GaussianMixture targets}.
    """
    x = _samples("samples", samples)
    if x.shape[1] != dist.dim:
        raise ValueError(f"samples must have shape (N, {dist.dim}) for this distribution, got {tuple(x.shape)}")
    _check_generator(generator)
    if reference is None:
        m = x.shape[0] if n_reference is None else _positive_int("n_reference", n_reference)
        if m < 2:
            raise ValueError(f"n_reference must be >= 2, got {m}")
        reference = dist.sample(m, 0.0, generator=generator)
    y = _samples("reference", reference).to(x.device)
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"reference must have shape (M, {x.shape[1]}), got {tuple(y.shape)}")
    out = {
        "mmd": mmd(x, y),
        "energy": energy_distance(x, y),
        "sliced_w2": sliced_wasserstein(x, y, n_projections=n_projections, p=2, generator=generator),
    }
    if ksd_sigma is None:
        ksd_sigma = None if getattr(dist, "singular", False) else 0.0
    if ksd_sigma is not None:
        out["ksd"] = ksd_to_exact(x, dist, ksd_sigma)
    if isinstance(dist, (GaussianMixture, FullCovGaussianMixture)):
        out["mode_weight_error"] = mode_weight_error(x, dist)
    return out

"""Bandwidth heuristics: a kernel bandwidth per sample set, from the samples alone.

    "median"   h = c * median_{i<j} |x_i - x_j|      (c = MEDIAN_FACTOR, chosen by measurement; see
                                                    ``steinops.estimators.stein`` for the study)
    "svgd"     h = median_{i<j} |x_i - x_j| / sqrt(2 log(M + 1))   (the literature's common rule,
                                                    kept for comparison: >10x worse for the SGE)
    "knn"      h = c_k * median_i |x_i - x_(k)(i)|, k = ceil(sqrt(M))  (the median over points of the distance
                                                    to the k-th nearest other point: the local spacing,
                                                    so clustered data are not smoothed across clusters;
                                                    c_k = KNN_FACTOR)

Heuristic bandwidths are treated as constants (computed without gradient). At most
``max_points`` points (an evenly strided subset) enter the median, so the cost stays
O(max_points^2 d) for any M.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .ops.backends import compiled_extension

MEDIAN_FACTOR = 2.0
KNN_FACTOR = 3.0
RULES = ("median", "svgd", "knn")


def _compiled_cpu(x: torch.Tensor) -> bool:
    """Whether the compiled per-set median applies: CPU float sets in low dimension (it forms differences
    directly; for large d cdist's matrix-product form is faster)."""
    return (x.device.type == "cpu" and x.shape[-1] <= 16 and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and compiled_extension() is not None)


def _sets(x: torch.Tensor, max_points: int) -> torch.Tensor:
    """x (..., M, d) with M >= 2 checked, thinned to an evenly strided subset of at most max_points."""
    M = x.shape[-2]
    if M < 2:
        raise ValueError(f"x needs at least 2 points to estimate a bandwidth, got {M}")
    return x[..., :: math.ceil(M / max_points), :] if M > max_points else x


def _distances(x: torch.Tensor) -> torch.Tensor:
    """All pairwise distances (..., M, M) of each set, centred in float64: direct differences for small d
    (exact), the Gram form for large d (centred float64, so accurate enough)."""
    xs = x.to(torch.float64)
    xs = xs - xs.mean(-2, keepdim=True)
    mode = "donot_use_mm_for_euclid_dist" if xs.shape[-1] <= 4 else "use_mm_for_euclid_dist"
    return torch.cdist(xs, xs, compute_mode=mode)


@torch.no_grad()
def median_distance(x: torch.Tensor, max_points: int = 1024) -> torch.Tensor:
    """Median pairwise distance ``median_{i<j} |x_i - x_j|`` of each sample set; (..., M, d) -> (...).

    Falls back to the mean pairwise distance (with a warning) where more than half the pairs
    coincide, and raises ``ValueError`` where all points coincide.
    """
    x = _sets(x, max_points)
    M = x.shape[-2]
    if _compiled_cpu(x):  # one op: the pairs of each set in float64, a selection per set (one set per thread)
        med, mean = torch.ops.steinops_C.pairwise_median(x.reshape(-1, M, x.shape[-1]).contiguous())
        med, mean = med.reshape(x.shape[:-2]), mean.reshape(x.shape[:-2])
    else:
        dist = _distances(x).flatten(-2)  # (..., M*M): M zeros on the diagonal + each pair twice
        # the lower median of the M(M-1)/2 pairs is the (M + n_pairs)-th smallest entry of the full matrix
        k = M + M * (M - 1) // 2 - 1
        if dist.device.type == "cpu":  # numpy's introselect is ~10x faster than torch's CPU kthvalue/median
            flat = dist.reshape(-1, M * M).numpy()
            med = torch.from_numpy(np.partition(flat, k, axis=-1)[:, k].copy()).reshape(dist.shape[:-1])
        else:
            med = dist.kthvalue(k + 1, -1).values
        mean = dist.sum(-1) / (M * (M - 1))
    bad = med <= 0
    if bool(bad.any()):
        if bool((mean[bad] <= 0).any()):
            raise ValueError("x: all samples of a set coincide, so no bandwidth can be estimated; pass a number")
        warnings.warn("x: more than half of the sample pairs coincide; using the mean pairwise distance as bandwidth",
                      RuntimeWarning, stacklevel=3)
        med = torch.where(bad, mean, med)
    return med.to(x.dtype)


@torch.no_grad()
def knn_distance(x: torch.Tensor, k: int | None = None, max_points: int = 1024) -> torch.Tensor:
    """Median over points of the distance to the k-th nearest other point; (..., M, d) -> (...).

    k defaults to ceil(sqrt(M)) (clipped to M - 1). Raises ``ValueError`` where that distance is 0 for more
    than half the points (duplicates).
    """
    x = _sets(x, max_points)
    M = x.shape[-2]
    k = min(M - 1, math.ceil(math.sqrt(M)) if k is None else k)
    # the (k+1)-th smallest of each row (the first is the point itself)
    dk = _distances(x).topk(k + 1, dim=-1, largest=False).values[..., k]
    med = dk.median(-1).values
    if bool((med <= 0).any()):
        raise ValueError("x: more than half of the points have k coincident neighbours, so no local bandwidth "
                         "can be estimated; pass a number")
    return med.to(x.dtype)


def select_bandwidth(x: torch.Tensor, bandwidth) -> torch.Tensor | float:
    """Resolve a bandwidth argument: a number or tensor is returned as is, a rule name is applied to x."""
    if isinstance(bandwidth, str):
        rule = bandwidth.lower()
        if rule == "median":
            return MEDIAN_FACTOR * median_distance(x)
        if rule == "svgd":
            return median_distance(x) / math.sqrt(2 * math.log(x.shape[-2] + 1))
        if rule == "knn":
            return KNN_FACTOR * knn_distance(x)
        raise ValueError(f"bandwidth must be a positive number, a tensor, or one of {RULES}; got {bandwidth!r}")
    return bandwidth

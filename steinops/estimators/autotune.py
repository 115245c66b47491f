"""Hyper-parameters from the samples alone: held-out score matching over a small grid.

Split each sample set into a fitting part A and a held-out part B, fit the estimator on A for every
(bandwidth, knob) on a grid, predict g at B, and score it with Hyvarinen's objective

    J(g) = E_B [ 1/2 |g(z)|^2 + div g(z) ]  =  1/2 E_B |g - grad log q|^2  -  1/2 E_B |grad log q|^2,

which needs no true score yet orders candidates exactly as the held-out Fisher error does (the last
term does not depend on g). With few samples one split is noisy, so the objective is averaged over
``folds`` disjoint held-out parts (K-fold cross-validation; 4 folds up to M = 2048, 1 above, where a
single split already holds hundreds of points). The divergence is exact (d backward passes) for d <= ``exact_div_max``
and a Hutchinson estimate with Rademacher probes above. Each sample set of a batch (e.g. each noise
level) gets its own choice; the grid runs batched, one fit per grid point for all sets at once.
"""
from __future__ import annotations

import itertools
import warnings

import torch

from ..bandwidth import median_distance

BANDWIDTH_MULTS = (0.5, 1.0, 2.0, 4.0)
KNOB_GRIDS = {"stein": ("eta", (0.01, 0.03, 0.1, 0.3, 1.0))}


def divergence(g: torch.Tensor, z: torch.Tensor, *, exact_div_max: int = 16, n_probes: int = 4,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``div g`` at each row of z (..., N, d) for g = f(z) computed row-wise; returns (..., N)."""
    d = z.shape[-1]
    if d <= exact_div_max:
        cols = [torch.autograd.grad(g[..., i].sum(), z, retain_graph=True)[0][..., i] for i in range(d)]
        return torch.stack(cols, -1).sum(-1)
    total = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    for _ in range(n_probes):
        v = (torch.randint(0, 2, z.shape, generator=generator, dtype=torch.int64).to(z) * 2 - 1)
        jv = torch.autograd.grad((g * v).sum(), z, retain_graph=True)[0]
        total = total + (jv * v).sum(-1)
    return total / n_probes


def heldout_objective(est, xb: torch.Tensor, **div_kw) -> torch.Tensor:
    """Hyvarinen's objective of a fitted estimator's predictions at held-out points xb; returns (...)."""
    with torch.enable_grad():
        z = xb.detach().requires_grad_()
        g = est.predict(z)
        div = divergence(g, z, **div_kw)
    return (0.5 * (g.detach() ** 2).sum(-1) + div.detach()).mean(-1)


def tune(name: str, x: torch.Tensor, *, kernel="rbf", holdout: float = 0.25, folds: int | None = None,
         bandwidth_mults=BANDWIDTH_MULTS, knob_values=None, generator: torch.Generator | None = None, **fixed):
    """Choose the bandwidth (a multiple of the median distance) and the estimator's knob per sample set.

    Args:
        name: a registered estimator ("stein" tunes eta too; others tune the bandwidth only unless
            a knob grid exists in ``KNOB_GRIDS``).
        x: samples (..., M, d); each fold holds out ``holdout`` of them (at least 1), at random.
        folds: number of disjoint held-out parts averaged (default 4 for M <= 2048, else 1).
        bandwidth_mults, knob_values: the grid.
        fixed: further constructor arguments of the estimator.

    Returns:
        dict with ``bandwidth`` (...) and the knob (e.g. ``eta``) (...) as tensors, and ``objective`` (...).
    """
    from .base import score_estimator

    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    M = x.shape[-2]
    nb = min(M - 2, max(1, round(holdout * M)))
    if nb < 1:
        raise ValueError(f"x needs at least 3 points per set to hold some out, got {M}")
    folds = (4 if M <= 2048 else 1) if folds is None else folds
    folds = max(1, min(int(folds), M // nb))
    perm = torch.randperm(M, generator=generator, device="cpu").to(x.device)
    splits = []
    for f in range(folds):
        held = perm[f * nb:(f + 1) * nb]
        kept = torch.cat([perm[:f * nb], perm[(f + 1) * nb:]])
        splits.append((x[..., kept, :].detach(), x[..., held, :].detach()))
    med = median_distance(x)
    knob, default_values = KNOB_GRIDS.get(name, (None, (None,)))
    values = tuple(knob_values) if knob_values is not None else default_values
    batch = x.shape[:-2]
    best_j = torch.full(batch, float("inf"), dtype=x.dtype, device=x.device)
    best_h = torch.zeros(batch, dtype=x.dtype, device=x.device)
    best_k = torch.zeros(batch, dtype=x.dtype, device=x.device)
    for mult, val in itertools.product(bandwidth_mults, values):
        kw = dict(fixed, kernel=kernel, bandwidth=mult * med)
        if knob is not None:
            kw[knob] = val
        j = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for xa, xb in splits:
                j = j + heldout_objective(score_estimator(name, **kw).fit(xa), xb) / folds
        better = torch.isfinite(j) & (j < best_j)
        best_j = torch.where(better, j, best_j)
        best_h = torch.where(better, mult * med, best_h)
        if knob is not None:
            best_k = torch.where(better, torch.as_tensor(val, dtype=x.dtype, device=x.device), best_k)
    out = {"bandwidth": best_h, "objective": best_j}
    if knob is not None:
        out[knob] = best_k
    return out

"""The accuracy benchmark's oracle grid for the spectral filters (SSGE, Landweber, nu; diagonal kernel) from one
eigendecomposition of K per bandwidth, shared by the three estimators and all their knob values.

With a diagonal kernel each of these estimators is a spectral filter of the Gram matrix ``K = U diag(lam) U^T``
of the centred samples, applied to the Stein term S (M x d); write ``W = U^T S``, and for queries z the rows
``K_z`` (N x M) and their Stein term ``S_z`` (N x d), as ``gram(z, x, stein_term=True)`` gives them:

    SSGE (mask m as the fit keeps it)   in sample  G = -U diag(m / lam) W,  out of sample  -K_z U diag(m / lam^2) W
    Landweber, nu (T steps of 1 / b)    in sample  G = U diag(v_T) W / M,   out of sample  a_T S_z / M + K_z U diag(c_T) W / M

with ``(a_T, c_T, v_T)`` the fit's recursion run on the eigenvalues (``spectral_sure.recursion_values``) and the
step bound b computed from K as the fit computes it. These are the estimators' own fits in another basis (equal
to ``fit`` / ``predict`` up to rounding: ``tests/test_benchmarks.py``); a fit costs one ``eigh`` (SSGE) or T dense
products, so at M = 8192 the grid of 5 bandwidths x 4-7 knob values by fits took hours on 2 cores, and here takes
5 eigendecompositions.
"""
from __future__ import annotations

import torch

from steinops.bandwidth import median_distance
from steinops.estimators._spectral_filter import masked_reciprocal
from steinops.estimators.kef import spectral_bound
from steinops.estimators.spectral_sure import recursion_values
from steinops.ops.gram import gram

SPECTRAL = ("ssge", "landweber", "nu")


def applies(name: str, kwargs: dict) -> bool:
    """Whether the estimator ``name`` with constructor ``kwargs`` is a spectral filter of K (diagonal kernel)."""
    return name in SPECTRAL and not kwargs.get("curl_free", False)


class SpectralBasis:
    """The eigendecomposition of K and the query rows for one sample set x (M, d), queries q (N, d) and bandwidth
    ``mult x median distance``, in x's dtype (as the fit computes them)."""

    def __init__(self, x: torch.Tensor, q: torch.Tensor, mult: float, kernel="rbf"):
        if x.dim() != 2:
            raise ValueError(f"x must be one sample set (M, d), got shape {tuple(x.shape)}")
        centre = x.mean(-2, keepdim=True)  # the fit centres the samples, and the queries with them
        xc, qc = x - centre, q.to(x.dtype) - centre
        self.M = x.shape[-2]
        self.h = torch.as_tensor(mult * float(median_distance(x)), dtype=x.dtype)
        K, S = gram(xc, kernel=kernel, bandwidth=self.h, stein_term=True)
        self.step = 1.0 / (spectral_bound(K) / self.M)  # the Landweber / nu step, as the fit chooses it
        lam, U = torch.linalg.eigh(K)
        del K
        self.lam, self.U = lam.flip(-1), U.flip(-1)  # descending, as the SSGE orders them
        self.W = self.U.mT @ S  # (M, d)
        Kq, self.Sq = gram(qc, xc, kernel=kernel, bandwidth=self.h, stein_term=True)
        self.KqU = Kq @ self.U  # (N, M)

    def scores(self, est) -> tuple[torch.Tensor, torch.Tensor]:
        """(in-sample (M, d), out-of-sample (N, d)) scores of the unfitted candidate ``est`` (its knob a number)
        with this basis's bandwidth."""
        name = est.name
        if name not in SPECTRAL:
            raise ValueError(f"no spectral form for estimator {name!r}; it applies to {SPECTRAL}")
        knob = torch.as_tensor(float(getattr(est, est.knob)), dtype=self.lam.dtype)
        if name == "ssge":
            mask = est._mask(self.lam, knob)
            inv = masked_reciprocal(self.lam, mask)
            return -self.U @ (inv[:, None] * self.W), -self.KqU @ (inv[:, None] ** 2 * self.W)
        T = est._steps(knob).clamp_min(1).reshape(1)
        a, c, v = recursion_values(self.lam[None], self.step.reshape(1), T, self.M, est._coefficients)
        G = self.U @ (v[0, :, None] * self.W) / self.M
        return G, a[0] * self.Sq / self.M + self.KqU @ (c[0, :, None] * self.W) / self.M

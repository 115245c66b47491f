"""Kernelized Stein discrepancy (KSD^2) between samples and a score function, matrix-free.

    KSD^2 = mean over pairs (i, j) of u(x_i, x_j),
    u(x, x') = s(x)^T s(x') k + s(x)^T grad_{x'} k + grad_x k^T s(x') + tr(grad_x grad_{x'} k)

For a stationary kernel ``k = f(r2)``, ``r2 = |x - x'|^2``:
``grad_{x'} k = 2 f'(r2) (x' - x) = -grad_x k`` and ``tr(grad_x grad_{x'} k) = -2 d f'(r2) - 4 f''(r2) r2``.

Summed over all M^2 pairs (x centred on its mean; X (M, d), S (M, d) the scores, K the Gram matrix,
K_s the Gram matrix of the Stein profile ``-2 h^2 f'`` -- RBF itself for RBF, IMQ cubed for IMQ):

    A   = sum_ij k_ij s_i.s_j                    = sum_i s_i . (K S)_i
    B+C = 2 sum_ij 2 f'_ij s_i.(x_j - x_i)       = (2/h^2) sum_i s_i . ((K_s 1)_i x_i - (K_s X)_i)
          (the two cross terms are equal after swapping i and j; this is 2 sum_i s_i . stein_term_i)
    D   = sum_ij tr(grad_x grad_x' k)_ij
          RBF:  tr = k (d/h^2 - r2/h^4), and by symmetry sum_ij k r2 = 2 sum_i (|x_i|^2 (K 1)_i - x_i . (K X)_i):
                D = (d/h^2) sum_i (K 1)_i - (2/h^4) sum_i (|x_i|^2 (K 1)_i - x_i . (K X)_i)
          IMQ:  f' = -k^3/(2h^2), f'' = 3 k^5/(4h^4), and r2/h^2 = k^-2 - 1, so tr = ((d - 3) k^3 + 3 k^5)/h^2:
                D = ((d - 3)/h^2) sum_i (K_s 1)_i + (3/h^2) sum_ij k_ij^5

So RBF is ONE fused kernel product ``K @ [S | 1 | X]`` (K = K_s); IMQ is three: ``K @ S``, ``K_s @ [1 | X]``
(imq3 profile) and ``sum_ij k^5 = 1^T K_5 1`` with K_5 the Gram matrix of the internal imq5 profile
``(1 + r2/h^2)^(-5/2)`` (``K_5 @ 1``, which does not depend on the scores). Every term is a fused kernel product,
so nothing of size M x M is formed for either kernel, and the gradients in x and h come from the kernel
product's own (fused) backward.

The diagonal ``u(x_i, x_i) = |s_i|^2 + d/h^2`` (k(0) = 1, grad k(0) = 0, tr at r = 0 is ``-2 d f'(0) = d/h^2``
for both kernels) is subtracted exactly for the U-statistic:

    V = total / M^2,      U = (total - sum_i |s_i|^2 - M d/h^2) / (M (M - 1)).

Differentiable in ``score``, ``x`` and a tensor ``bandwidth`` (first order), so it can be a training loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ..kernels import IMQ, IMQ5, RBF, get_kernel, stein_profile
from .kernel_matvec import kernel_matvec

def ksd(x: Tensor, score: Tensor, *, kernel="rbf", bandwidth, u_statistic: bool = True,
        backend: str | None = None) -> Tensor:
    """Squared kernelized Stein discrepancy between the samples ``x`` and the scores ``score = s(x)``.

    Args:
        x: samples, (..., M, d).
        score: s(x_i) at every sample (e.g. a network's output), (..., M, d); same shape, dtype, device as x.
        kernel: "rbf" ``exp(-r2/(2h^2))`` or "imq" ``(1 + r2/h^2)^(-1/2)`` (or the RBF / IMQ profile).
        bandwidth: h > 0: a number, a tensor broadcastable to the batch shape ``...`` (differentiable), or
            "median" / "svgd" (``steinops.bandwidth.select_bandwidth``, treated as a constant).
        u_statistic: True: mean over pairs i != j (unbiased, can be negative; needs M >= 2).
            False: V-statistic, mean over all M^2 pairs (>= 0 up to rounding).
        backend: backend of the fused kernel products (see :func:`kernel_matvec`).

    Returns:
        KSD^2 per batch element, shape ``...`` (a 0-d tensor for unbatched input). See the module
        docstring for the formula; nothing of size M x M is formed (three fused kernel products for IMQ,
        one for RBF), so the memory is O(M d).
    """
    if not isinstance(u_statistic, bool):
        raise TypeError(f"u_statistic must be a bool, got {type(u_statistic).__name__}")
    _checks.points("x", x, min_rows=2 if u_statistic else 1)
    _checks.points("score", score)
    _checks.same_device(x=x, score=score)
    dtype = _checks.same_dtype(x=x, score=score)
    if score.shape != x.shape:
        raise ValueError(f"score must have the shape of x: score {tuple(score.shape)} vs x {tuple(x.shape)}")
    prof = get_kernel(kernel)
    if prof not in (RBF, IMQ):
        raise ValueError(f"kernel must be 'rbf' or 'imq' for ksd, got {prof.name!r}")
    if isinstance(bandwidth, str):
        from ..bandwidth import select_bandwidth
        bandwidth = select_bandwidth(x.detach(), bandwidth)
        if isinstance(bandwidth, Tensor):
            bandwidth = bandwidth.detach()

    cdtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    batch = x.shape[:-2]
    M, d = x.shape[-2], x.shape[-1]
    h = _checks.bandwidth_tensor(bandwidth, batch, x.detach().to(cdtype))  # shape `batch`, grads flow to bandwidth
    xs = x.to(cdtype)
    s = score.to(cdtype)
    xc = xs - xs.detach().mean(-2, keepdim=True)  # translation invariance; keeps the |x|^2 terms accurate
    h2 = h * h
    ones = torch.ones_like(xc[..., :1])
    sq = (xc * xc).sum(-1)  # (..., M)

    if prof is RBF:
        P = kernel_matvec(xc, xc, torch.cat([s, ones, xc], -1), kernel=RBF, bandwidth=h, backend=backend)
        KS, K1, KX = P[..., :d], P[..., d], P[..., d + 1:]
        Ks1, KsX = K1, KX
    else:
        KS = kernel_matvec(xc, xc, s, kernel=IMQ, bandwidth=h, backend=backend)
        Q = kernel_matvec(xc, xc, torch.cat([ones, xc], -1), kernel=stein_profile(IMQ), bandwidth=h, backend=backend)
        Ks1, KsX = Q[..., 0], Q[..., 1:]
        penta = kernel_matvec(xc, xc, ones, kernel=IMQ5, bandwidth=h, backend=backend).sum((-2, -1))

    a = (s * KS).sum((-2, -1))
    bc = 2 * (s * (Ks1.unsqueeze(-1) * xc - KsX)).sum((-2, -1)) / h2
    if prof is RBF:
        k1 = K1.sum(-1)
        kr2 = 2 * ((sq * K1).sum(-1) - (xc * KX).sum((-2, -1)))
        tr = d * k1 / h2 - kr2 / (h2 * h2)
    else:
        tr = ((d - 3) * Ks1.sum(-1) + 3 * penta) / h2
    total = a + bc + tr
    if u_statistic:
        diag = (s * s).sum((-2, -1)) + M * d / h2
        out = (total - diag) / (M * (M - 1))
    else:
        out = total / (M * M)
    return out.to(dtype)

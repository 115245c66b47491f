"""Truncated spectral inverses ``U diag(mask / lambda^p) U^T S`` of a symmetric K, with a stable backward.

The SSGE applies ``f_p(K) = U diag(mask / lambda^p) U^T`` (p = 1: in-sample scores, p = 2: the coefficients
of its out-of-sample rule) to the Stein term S. Autograd through ``torch.linalg.eigh`` differentiates U
and lambda separately and divides by every eigenvalue gap ``lambda_i - lambda_j``, including gaps between
two kept (or two dropped) eigenvalues, where the terms cancel in ``f_p(K)`` but not in floating point: with
(nearly) repeated eigenvalues -- symmetric data such as rings or a sphere, duplicated samples, a tail of
~0 eigenvalues -- the gradient is inf / NaN or noise. The derivative of a spectral function is instead
(Daleckii-Krein)::

    d f(K) = U (F o (U^T dK U)) U^T,    F_ij = (f(lambda_i) - f(lambda_j)) / (lambda_i - lambda_j),  F_ii = f'(lambda_i)

and for ``f = 1 / lambda^p`` on the kept pairs the divided difference has a gap-free closed form,
``F_ij = -sum_{a+b=p-1} lambda_i^a lambda_j^b / (lambda_i lambda_j)^p`` (p = 1: ``-1 / (lambda_i lambda_j)``).
Only a kept/dropped pair divides by its gap ``f(lambda_i) / (lambda_i - lambda_j)``: the truncation itself
is not smooth there. The mask is held fixed (piecewise constant in K), as before.

So ``Y = f_p(K) S`` has ``S_bar = f_p(K) Y_bar`` and ``K_bar = sym(U (F o (U^T Y_bar S^T U)) U^T)``.
"""
from __future__ import annotations

import torch


def masked_reciprocal(lam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask / lam`` (..., M): 1 / lam on the kept eigenpairs, 0 elsewhere (no division by a dropped, possibly
    zero, eigenvalue)."""
    return torch.where(mask, 1 / torch.where(mask, lam, torch.ones_like(lam)), torch.zeros_like(lam))


def divided_differences(lam: torch.Tensor, mask: torch.Tensor, power: int) -> torch.Tensor:
    """F (..., M, M) of ``f = mask / lambda^power`` at the eigenvalues lam (..., M)."""
    li, lj = lam[..., :, None], lam[..., None, :]
    ki, kj = mask[..., :, None], mask[..., None, :]
    safe = torch.where(mask, lam, torch.ones_like(lam))
    si, sj = safe[..., :, None], safe[..., None, :]
    if power == 1:
        both = -1.0 / (si * sj)
    else:  # power 2
        both = -(si + sj) / (si * sj) ** 2
    f = torch.where(mask, safe ** -power, torch.zeros_like(lam))
    gap = li - lj
    # exactly equal kept/dropped eigenvalues cannot occur with a threshold mask; guard the division anyway
    gap = torch.where(gap == 0, torch.full_like(gap, torch.finfo(lam.dtype).tiny), gap)
    one_kept = (f[..., :, None] - f[..., None, :]) / gap
    return torch.where(ki & kj, both, torch.where(ki | kj, one_kept, torch.zeros_like(gap)))


class _TruncatedInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, K, S, mask_fn):
        lam, U = torch.linalg.eigh(K)  # ascending
        lam, U = lam.flip(-1), U.flip(-1)  # descending
        mask = mask_fn(lam)
        inv = masked_reciprocal(lam, mask)
        W = (S.mT @ U).mT  # (..., M, d): U^T S (U^T S itself takes a slow matmul path)
        G = U @ (inv[..., None] * W)
        C = U @ (inv[..., None] ** 2 * W)
        ctx.save_for_backward(S, lam, U, mask, W)
        ctx.mark_non_differentiable(lam, U, mask)
        return G, C, lam, U, mask

    @staticmethod
    def backward(ctx, G_bar, C_bar, *_):
        S, lam, U, mask, W = ctx.saved_tensors
        inv = masked_reciprocal(lam, mask)
        K_bar = S_bar = None
        Ut_Gbar = (G_bar.mT @ U).mT  # (..., M, d)
        Ut_Cbar = (C_bar.mT @ U).mT
        if ctx.needs_input_grad[1]:
            S_bar = U @ (inv[..., None] * Ut_Gbar + inv[..., None] ** 2 * Ut_Cbar)
        if ctx.needs_input_grad[0]:
            inner = (divided_differences(lam, mask, 1) * (Ut_Gbar @ W.mT)
                     + divided_differences(lam, mask, 2) * (Ut_Cbar @ W.mT))
            K_bar = U @ inner @ U.mT
            K_bar = 0.5 * (K_bar + K_bar.mT)
        return K_bar, S_bar, None


def truncated_inverse(K: torch.Tensor, S: torch.Tensor, mask_fn):
    """``G = U diag(m / lambda) U^T S`` and ``C = U diag(m / lambda^2) U^T S`` for symmetric K (..., M, M) and
    S (..., M, d), where ``K = U diag(lambda) U^T`` (lambda descending) and ``m = mask_fn(lambda)`` (bool,
    (..., M), treated as constant). Returns (G, C, lambda, U, mask); G and C are differentiable in K and S
    (backward in the module docstring); lambda, U and mask are not."""
    return _TruncatedInverse.apply(K, S, mask_fn)

"""Linear solvers for ``(K + eta I) X = B``: Cholesky with jitter escalation, and batched CG.

Both act on leading batch dims ``(..., M, M)`` / ``(..., M, E)``.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .ops.backends import compiled_extension

SMALL_CHOLESKY_MAX = 256  # up to this size the compiled batched factorisation beats LAPACK (measured: 4x at 128)


def small_cpu_system(t: torch.Tensor, n: int) -> bool:
    """Whether an n x n system on ``t``'s device and dtype takes the compiled one-matrix-per-thread ops
    (``steinops_C::cholesky`` / ``sge_small``): CPU float32/64, 2 <= n <= SMALL_CHOLESKY_MAX, not under
    torch.compile. The caller checks that nothing needs a gradient (the ops have no backward)."""
    return (t.device.type == "cpu" and 2 <= n <= SMALL_CHOLESKY_MAX and t.dtype in (torch.float32, torch.float64)
            and compiled_extension() is not None and not torch.compiler.is_compiling())


def _small_path(A: torch.Tensor) -> bool:
    return small_cpu_system(A, A.shape[-1]) and not (A.requires_grad and torch.is_grad_enabled())


def _cholesky_ex(A: torch.Tensor):
    """``torch.linalg.cholesky_ex``, or for a CPU batch of small float matrices that needs no gradient the
    compiled one-matrix-per-thread factorisation (``steinops_C::cholesky``; torch runs a batch serially)."""
    if _small_path(A):
        n = A.shape[-1]
        L, _, info = torch.ops.steinops_C.cholesky(A.reshape(-1, n, n))
        return L.reshape(A.shape), info.reshape(A.shape[:-2])
    return torch.linalg.cholesky_ex(A)


def cholesky_solve_jitter(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, X)`` with ``L = cholesky_jitter(A)`` and ``A X = B`` (B (..., M, E)); for small CPU systems
    without gradient both in one compiled pass per matrix, else LAPACK."""
    if _small_path(A) and not (B.requires_grad and torch.is_grad_enabled()) and B.dtype == A.dtype \
            and B.shape[:-1] == A.shape[:-1]:
        n, E = A.shape[-1], B.shape[-1]
        L, X, info = torch.ops.steinops_C.cholesky(A.reshape(-1, n, n), B.reshape(-1, n, E))
        if not bool((info != 0).any()):
            return L.reshape(A.shape), X.reshape(B.shape)
    L = cholesky_jitter(A)
    return L, torch.cholesky_solve(B, L)


def cholesky_jitter(A: torch.Tensor, *, max_tries: int = 8) -> torch.Tensor:
    """Lower Cholesky factor of the symmetric ``A`` (..., M, M), adding jitter where it fails.

    On failure the diagonal is raised by ``eps * mean(diag) * 10^t`` for t = 0, 1, ... (eps the
    dtype's machine epsilon), with a ``RuntimeWarning`` naming the jitter used; ``ValueError`` when
    even the largest fails (A has NaNs or is far from positive definite). Differentiable.
    """
    L, info = _cholesky_ex(A)
    if not bool((info != 0).any()):
        return L
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    base = torch.finfo(A.dtype).eps * A.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp_min(1e-30)
    for t in range(max_tries):
        jitter = base * 10.0**t
        L, info = _cholesky_ex(A + jitter[..., None, None] * eye)
        if not bool((info != 0).any()):
            warnings.warn(
                f"Cholesky failed (K + eta I is numerically singular, e.g. duplicate points with a tiny eta); "
                f"succeeded after adding jitter {float(jitter.max()):.3g} to the diagonal", RuntimeWarning, stacklevel=2)
            return L
    raise ValueError("Cholesky failed even with jitter: the kernel matrix has non-finite entries or is not positive definite")


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    B: torch.Tensor,
    *,
    rtol: float,
    max_iter: int,
    x0: torch.Tensor | None = None,
    what: str = "conjugate gradient",
):
    """Solve ``A X = B`` for symmetric positive definite A given as ``matvec``; B (..., M, E).

    Every column (and batch element) has its own step sizes ``alpha, beta``; a column stops once
    ``|r| <= rtol |b|``. After ``max_iter`` iterations a ``RuntimeWarning`` reports the worst relative
    residual. Returns ``(X, iterations, max relative residual)``.
    """
    X = torch.zeros_like(B) if x0 is None else x0.clone()
    R = B - matvec(X) if x0 is not None else B.clone()
    P = R.clone()
    bnorm = B.norm(dim=-2).clamp_min(torch.finfo(B.dtype).tiny)  # (..., E)
    rr = (R * R).sum(-2)
    it = 0
    rel = (rr.sqrt() / bnorm).max()
    while it < max_iter and rel > rtol:
        AP = matvec(P)
        pap = (P * AP).sum(-2)
        active = rr.sqrt() > rtol * bnorm  # converged columns are frozen
        alpha = torch.where(active, rr / pap.clamp_min(torch.finfo(B.dtype).tiny), torch.zeros_like(rr))
        X = X + alpha.unsqueeze(-2) * P
        R = R - alpha.unsqueeze(-2) * AP
        rr_new = (R * R).sum(-2)
        beta = torch.where(active, rr_new / rr.clamp_min(torch.finfo(B.dtype).tiny), torch.zeros_like(rr))
        P = R + beta.unsqueeze(-2) * P
        rr = rr_new
        it += 1
        rel = (rr.sqrt() / bnorm).max()
    rel = float(rel)
    if rel > rtol:
        warnings.warn(f"{what} stopped after {it} iterations at relative residual {rel:.2e} > rtol {rtol:.1e}; "
                      f"raise eta or max_iter", RuntimeWarning, stacklevel=2)
    return X, it, rel

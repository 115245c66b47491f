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


def _spd_solve_grads(L, X, gX, need_A: bool, need_B: bool, A_shape, B_shape):
    """Gradients of ``X = A^{-1} B`` (A = L L^T symmetric positive definite) from the upstream ``gX``::

        lam = A^{-1} gX   (two triangular solves with the saved L: O(M^2 E))
        dB  = lam,        dA = -sym(lam X^T) = -(lam X^T + X lam^T) / 2   (O(M^2 E))

    The symmetric part is the gradient for symmetric A (e.g. ``K + eta I`` built from x): no O(M^3) work.
    Broadcast batch dims are summed back to the input shapes."""
    lam = torch.cholesky_solve(gX, L)
    dA = dB = None
    if need_A:
        # lam X^T + X lam^T as one product with inner dim 2E: the M x M result is written once
        U = torch.cat([lam, X], -1).mul_(-0.5)
        dA = U @ torch.cat([X, lam], -1).transpose(-1, -2)
        if dA.shape != A_shape:
            dA = dA.sum_to_size(A_shape)
    if need_B:
        dB = lam if lam.shape == B_shape else lam.sum_to_size(B_shape)
    return dA, dB


class _SPDSolve(torch.autograd.Function):
    """``(L, X) = cholesky_solve_jitter(A, B)`` with the O(M^2 E) backward of ``_spd_solve_grads``."""

    @staticmethod
    def forward(ctx, A, B):
        # grad mode is off in here, so small CPU systems take the compiled factor-and-solve pass
        L, X = cholesky_solve_jitter(A, B)
        ctx.mark_non_differentiable(L)
        ctx.save_for_backward(L, X)
        ctx.shapes = (A.shape, B.shape)
        return L, X

    @staticmethod
    @torch.autograd.function.once_differentiable  # L is saved as a constant: a second derivative would miss its terms
    def backward(ctx, gL, gX):
        L, X = ctx.saved_tensors
        return _spd_solve_grads(L, X, gX, ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.shapes)


class _FactoredSolve(torch.autograd.Function):
    """``X = cholesky_solve(B, L)`` with L the factor of A; A only carries the gradient."""

    @staticmethod
    def forward(ctx, A, L, B):
        L = L.detach()
        X = torch.cholesky_solve(B, L)
        ctx.save_for_backward(L, X)
        ctx.shapes = (A.shape, B.shape)
        return X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gX):
        L, X = ctx.saved_tensors
        dA, dB = _spd_solve_grads(L, X, gX, ctx.needs_input_grad[0], ctx.needs_input_grad[2], *ctx.shapes)
        return dA, None, dB


def spd_solve(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, X)``: the lower Cholesky factor L of the symmetric positive definite ``A`` (..., M, M) and the
    solution of ``A X = B`` (B (..., M, E)), differentiable in A and B without differentiating the Cholesky.

    Forward as ``cholesky_solve_jitter`` (jitter escalation with its warning; the compiled pass for small
    CPU systems). Backward from the saved L in O(M^2 E), with ``gX`` the gradient of X::

        lam = A^{-1} gX,   dB = lam,   dA = -(lam X^T + X lam^T) / 2

    (for ``A = K + eta I`` autograd then gives ``d eta = trace(dA) = -sum(lam * X)`` per batch element).
    dA is the gradient for symmetric A, i.e. correct whenever A is built symmetric (e.g. a kernel matrix).
    L is a non-differentiable output (for reuse: ``spd_solve_with_factor``, ``torch.cholesky_solve``). When
    jitter was added, X and the gradients are those of the jittered system ``A + jitter I`` (jitter constant).
    First derivatives only (double backward raises). Without a gradient to compute this is
    ``cholesky_solve_jitter(A, B)``.
    """
    if not (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)):
        return cholesky_solve_jitter(A, B)
    return _SPDSolve.apply(A, B)


def spd_solve_with_factor(A: torch.Tensor, L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``X = A^{-1} B`` (B (..., M, E)) from the factor ``L`` of A (..., M, M), e.g. from ``spd_solve``.

    A is not read in the forward: it carries the gradient, ``dA = -(lam X^T + X lam^T) / 2`` and
    ``dB = lam = A^{-1} gX``, both O(M^2 E) from L (the gradient wrt A is the one of the system L factors,
    jittered or not). L itself is treated as a constant; first derivatives only. Without a gradient:
    ``torch.cholesky_solve(B, L)``.
    """
    if not (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)):
        return torch.cholesky_solve(B, L)
    return _FactoredSolve.apply(A, L, B)


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
    precond: Callable[[torch.Tensor], torch.Tensor] | None = None,
    history: list | None = None,
    allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """Solve ``A X = B`` for symmetric positive definite A given as ``matvec``; B (..., M, E).

    Every column (and batch element) has its own step sizes ``alpha, beta``; a column stops once
    ``|r| <= rtol |b|`` (the true residual's norm, also with a preconditioner) and is frozen from then on.
    After ``max_iter`` iterations a ``RuntimeWarning`` reports the worst relative residual. Returns
    ``(X, iterations, max relative residual)``.

    Args:
        precond: optional callable applying ``P^{-1}`` (P symmetric positive definite, P ~ A) to a
            (..., M, E) tensor: preconditioned CG, i.e. ``z = P^{-1} r``, ``alpha = r.z / p.Ap``,
            ``beta = r'.z' / r.z``, ``p' = z' + beta p``. Without it ``z = r`` (plain CG).
        history: a list to which the max relative residual (over columns and batch) is appended,
            before the first iteration and after each one: the convergence record.
        allreduce: applied to every column-wise inner product (..., E) before use; for rows sharded
            across processes a sum over the processes (e.g. ``torch.distributed.all_reduce``), so that
            every process takes the same steps.
    """
    reduce = (lambda t: t) if allreduce is None else allreduce
    tiny = torch.finfo(B.dtype).tiny

    def coldot(U, V):
        return reduce((U * V).sum(-2))

    X = torch.zeros_like(B) if x0 is None else x0.clone()
    R = B - matvec(X) if x0 is not None else B.clone()
    Z = R if precond is None else precond(R)
    P = Z.clone()
    bnorm = coldot(B, B).sqrt().clamp_min(tiny)  # (..., E)
    rr = coldot(R, R)
    rz = rr if precond is None else coldot(R, Z)
    it = 0
    rel = float((rr.sqrt() / bnorm).max())
    if history is not None:
        history.append(rel)
    while it < max_iter and rel > rtol:
        AP = matvec(P)
        pap = coldot(P, AP)
        active = rr.sqrt() > rtol * bnorm  # converged columns are frozen
        alpha = torch.where(active, rz / pap.clamp_min(tiny), torch.zeros_like(rz))
        X = X + alpha.unsqueeze(-2) * P
        R = R - alpha.unsqueeze(-2) * AP
        Z = R if precond is None else precond(R)
        rr = coldot(R, R)
        rz_new = rr if precond is None else coldot(R, Z)
        beta = torch.where(active, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        P = Z + beta.unsqueeze(-2) * P
        rz = rz_new
        it += 1
        rel = float((rr.sqrt() / bnorm).max())
        if history is not None:
            history.append(rel)
    if rel > rtol:
        warnings.warn(f"{what} stopped after {it} iterations at relative residual {rel:.2e} > rtol {rtol:.1e}; "
                      f"raise eta or max_iter", RuntimeWarning, stacklevel=2)
    return X, it, rel

"""Matrix-free solves ``X = A(p)^{-1} B`` for a symmetric positive definite operator A(p) given by
its product, with implicit-function gradients; the kernel systems ``K(x, x) + eta I`` (diagonal or
curl-free kernel) are instances.

Forward: conjugate gradient, one operator product per iteration. Backward (A symmetric):
``lam = A^{-1} gX``, ``dB = lam``, and the gradients in the parameters p (points x, bandwidth h,
regulariser eta) are those of ``-sum lam . (A(p) X)`` with X and lam held fixed: one more product's
backward. Nothing of size M x M is formed when the product is matrix-free.

A preconditioner (a callable applying ``P^{-1} ~ A^{-1}``, e.g. from ``steinops.preconditioners``) is used
by both solves: the backward system has the same (symmetric) matrix.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ops.kernel_matvec import kernel_matvec
from ..preconditioners import DEFAULT_RANK, kernel_preconditioner
from ..solvers import conjugate_gradient


def default_rtol(dtype: torch.dtype) -> float:
    # float32: 1e-5 reaches the Cholesky answer's accuracy on the toy benchmarks (1e-4 lost ~10%)
    return 1e-8 if dtype == torch.float64 else 1e-5


class _OperatorSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, B, product, rtol, max_iter, what, precond, info, *params):
        def matvec(V):
            return product(*params, V)

        hist = []
        with torch.no_grad():
            X, it, _ = conjugate_gradient(matvec, B, rtol=rtol, max_iter=max_iter, what=f"CG solve of {what}",
                                          precond=precond, history=hist)
        if info is not None:
            info.update(iterations=it, residuals=hist)
        ctx.save_for_backward(X, *params)
        ctx.args = (product, rtol, max_iter, what, precond)
        return X

    @staticmethod
    def backward(ctx, gX):
        X, *params = ctx.saved_tensors
        product, rtol, max_iter, what, precond = ctx.args
        with torch.no_grad():
            lam, _, _ = conjugate_gradient(lambda V: product(*params, V), gX.contiguous(), rtol=rtol,
                                           max_iter=max_iter, what=f"CG solve in the backward of {what}",
                                           precond=precond)
        need = ctx.needs_input_grad[7:]
        grads = [None] * len(params)
        if any(need):
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_(n) for p, n in zip(params, need)]
                f = -(lam * product(*leaves, X)).sum()
                wrt = [p for p, n in zip(leaves, need) if n]
                found = iter(torch.autograd.grad(f, wrt, allow_unused=True))
                grads = [next(found) if n else None for n in need]
        return (lam, None, None, None, None, None, None, *grads)


def operator_solve(product: Callable, params: tuple, B: torch.Tensor, *, rtol=None, max_iter=None,
                   what: str = "A X = B", precond: Callable | None = None, info: dict | None = None) -> torch.Tensor:
    """``A(params)^{-1} B`` by CG, differentiable in B and every tensor in ``params``.

    ``product(*params, V)`` returns ``A(params) V`` for V shaped like B (..., M, E); it must be
    symmetric positive definite in V and written in differentiable torch ops. ``precond`` applies an
    approximate inverse of A (symmetric positive definite; used by the forward and the backward solve).
    ``info``, a dict, receives ``iterations`` and ``residuals`` (the max relative residual before the
    first and after every iteration) of the forward solve.
    """
    rtol = default_rtol(B.dtype) if rtol is None else rtol
    max_iter = max(100, 2 * B.shape[-2]) if max_iter is None else max_iter
    return _OperatorSolve.apply(B, product, rtol, max_iter, what, precond, info, *params)


def kernel_solve(x, B, h, eta, *, kernel, backend=None, rtol=None, max_iter=None, preconditioner=None,
                 precond_rank: int = DEFAULT_RANK, info: dict | None = None):
    """``(K(x, x) + eta I)^{-1} B`` by matrix-free (preconditioned) CG. x (..., M, d), B (..., M, E), h and eta (...).

    ``preconditioner``: None, a callable (built once, e.g. by ``kernel_preconditioner``, and reused for
    every solve with the same x, h, eta) or a name ("pivchol", "nystrom"), built here with ``precond_rank``.
    ``info`` as in ``operator_solve``.
    """
    if isinstance(preconditioner, str):
        preconditioner = kernel_preconditioner(preconditioner, x, h, eta, rank=precond_rank, kernel=kernel,
                                               backend=backend)

    def product(x, h, eta, V):
        return kernel_matvec(x, x, V, kernel=kernel, bandwidth=h, backend=backend) + eta[..., None, None] * V

    return operator_solve(product, (x, h, eta), B, rtol=rtol, max_iter=max_iter, what="(K + eta I) X = B",
                          precond=preconditioner, info=info)

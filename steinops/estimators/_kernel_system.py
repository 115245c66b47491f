"""Matrix-free solves with ``A = K(x, x) + eta I`` and their implicit-function gradients.

``X = A^{-1} B`` is found by conjugate gradient, each iteration one fused kernel product. Backward
(A symmetric): ``lam = A^{-1} gX``, ``dB = lam``, ``d eta = -sum lam . X``, and the gradients in
x and h are those of ``-sum lam . (K(x, x) X)`` with X and lam held fixed: one more fused product's
backward. Nothing of size M x M is formed.
"""
from __future__ import annotations

import torch

from ..ops.kernel_matvec import kernel_matvec
from ..solvers import conjugate_gradient


def default_rtol(dtype: torch.dtype) -> float:
    # float32: 1e-5 reaches the Cholesky answer's accuracy on the toy benchmarks (1e-4 lost ~10%)
    return 1e-8 if dtype == torch.float64 else 1e-5


class _KernelSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, B, h, eta, kernel, backend, rtol, max_iter):
        def matvec(V):
            return kernel_matvec(x, x, V, kernel=kernel, bandwidth=h, backend=backend) + eta.unsqueeze(-1).unsqueeze(-1) * V

        with torch.no_grad():
            X, _, _ = conjugate_gradient(matvec, B, rtol=rtol, max_iter=max_iter, what="CG solve of (K + eta I) X = B")
        ctx.save_for_backward(x, h, eta, X)
        ctx.args = (kernel, backend, rtol, max_iter)
        ctx.matvec = matvec
        return X

    @staticmethod
    def backward(ctx, gX):
        x, h, eta, X = ctx.saved_tensors
        kernel, backend, rtol, max_iter = ctx.args
        with torch.no_grad():
            lam, _, _ = conjugate_gradient(ctx.matvec, gX.contiguous(), rtol=rtol, max_iter=max_iter,
                                           what="CG solve in the backward of (K + eta I) X = B")
        dx = dh = deta = None
        need_x, _, need_h, need_eta = ctx.needs_input_grad[:4]
        if need_x or need_h:
            with torch.enable_grad():
                xx = x.detach().requires_grad_(need_x)
                hh = h.detach().requires_grad_(need_h)
                f = -(lam * kernel_matvec(xx, xx, X, kernel=kernel, bandwidth=hh, backend=backend)).sum()
                wrt = [t for t, n in ((xx, need_x), (hh, need_h)) if n]
                grads = list(torch.autograd.grad(f, wrt))
            dx = grads.pop(0) if need_x else None
            dh = grads.pop(0) if need_h else None
        if need_eta:
            deta = -(lam * X).sum((-2, -1))
        return dx, lam, dh, deta, None, None, None, None


def kernel_solve(x, B, h, eta, *, kernel, backend=None, rtol=None, max_iter=None):
    """``(K(x, x) + eta I)^{-1} B`` by matrix-free CG. x (..., M, d), B (..., M, E), h and eta (...)."""
    rtol = default_rtol(x.dtype) if rtol is None else rtol
    max_iter = max(100, 2 * x.shape[-2]) if max_iter is None else max_iter
    return _KernelSolve.apply(x, B, h, eta, kernel, backend, rtol, max_iter)

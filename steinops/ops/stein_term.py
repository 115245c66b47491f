"""The Stein term ``S_n = sum_m grad_{y_m} k(x_n, y_m)`` as ONE matrix-free kernel product.

For a stationary kernel ``grad_y k(x, y) = 2 k'(r2) (y - x)``. Writing ``-2 h^2 k'`` as the kernel of
a "Stein profile" (RBF for RBF, IMQ cubed for IMQ; see ``steinops.kernels``):

    S = (rowsum(K_s) * x - K_s @ y) / h^2 = (P[:, :1] * x - P[:, 1:]) / h^2,   P = K_s(x, y) @ [1 | y]

so the O(N M d) work is one fused product with ``d + 1`` right-hand sides and nothing of size N x M
is stored. Differentiable through :func:`kernel_matvec`.
"""
from __future__ import annotations

from torch import Tensor
import torch

from .. import _checks
from ..kernels import get_kernel, stein_profile
from .kernel_matvec import kernel_matvec


def stein_term(x: Tensor, y: Tensor | None = None, *, kernel="rbf", bandwidth, backend: str | None = None) -> Tensor:
    """``S[..., n, :] = sum_m grad_{y_m} k(x_n, y_m)``, shape (..., N, d); ``y = x`` when omitted."""
    yy = x if y is None else y
    _checks.points("y" if y is not None else "x", yy, check_finite=False)
    prof = stein_profile(get_kernel(kernel))
    centre = yy.detach().mean(-2, keepdim=True)  # keeps rowsum * x - K y free of cancellation
    xc, yc = x - centre, yy - centre
    rhs = torch.cat([torch.ones_like(yc[..., :1]), yc], -1)
    p = kernel_matvec(xc, yc, rhs, kernel=prof, bandwidth=bandwidth, backend=backend)
    h = bandwidth.unsqueeze(-1).unsqueeze(-1) if isinstance(bandwidth, Tensor) else bandwidth
    return (p[..., :1] * xc - p[..., 1:]) / (h * h)

"""Plain-PyTorch versions of every fused op: the ground truth for tests (run them in float64).

They follow the backend contract of ``csrc/README.md`` exactly: inputs ``x (B, N, d)``,
``y (B, M, d)``, ``v (B, M, E)``, ``g (B, N, E)``, bandwidth ``h (B,)`` and a kernel profile.
They materialise the N x M matrices, so they are for moderate sizes only. Squared distances are
taken by direct differences in chunks, the most accurate way, so a reference never inherits the
cancellation of the ``|x|^2 - 2 x.y + |y|^2`` form.
"""
from __future__ import annotations

import torch

from ..kernels import get_kernel


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``r2[b, n, m] = |x[b, n] - y[b, m]|^2`` by direct differences; (B, N, d), (B, M, d) -> (B, N, M)."""
    return ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)


def _h(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, 1, 1)


def kmv_forward(x, y, v, h, kernel):
    """``out_n = sum_m k(|x_n - y_m|^2) v_m``; returns (B, N, E)."""
    k = get_kernel(kernel)
    return k(sqdist(x, y), _h(h)) @ v


def kmv_xgrad(x, y, v, g, h, kernel):
    """Backward of the kernel product in x: ``P_nm = k'(r2_nm) (g_n . v_m)``,
    ``dx_n = 2 (rowsum(P)_n x_n - sum_m P_nm y_m)``; returns (B, N, d)."""
    k = get_kernel(kernel)
    p = k.deriv(sqdist(x, y), _h(h)) * (g @ v.transpose(-1, -2))
    return 2 * (p.sum(-1, keepdim=True) * x - p @ y)


def gram_forward(x, y, h, kernel, stein: bool):
    """``K_nm = k(r2_nm)`` (B, N, M) and, if ``stein``, ``S_n = 2 sum_m k'(r2_nm) (y_m - x_n)`` (B, N, d),
    i.e. ``S_n = sum_m grad_{y_m} k(x_n, y_m)``; otherwise S is an empty tensor."""
    k = get_kernel(kernel)
    r2 = sqdist(x, y)
    hh = _h(h)
    K = k(r2, hh)
    if not stein:
        return K, x.new_empty(0)
    kp = k.deriv(r2, hh)
    S = 2 * (kp @ y - kp.sum(-1, keepdim=True) * x)
    return K, S

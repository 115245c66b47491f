"""Kernel profiles: stationary kernels written as functions of the squared distance.

Every fused op needs only ``k(r2)`` and its derivative ``k'(r2) = dk/dr2``; the gradients in x and y
follow from ``d r2 / dx = 2 (x - y)``. A profile knows both, in plain PyTorch (used by the
reference ops and by the estimators), and carries the integer id that the compiled and Triton
backends use.

    RBF  k(r2) = exp(-r2 / (2 h^2))        k'(r2) = -k / (2 h^2)        k''(r2) = k / (4 h^4)
    IMQ  k(r2) = (1 + r2 / h^2)^(-1/2)     k'(r2) = -k^3 / (2 h^2)      k''(r2) = 3 k^5 / (4 h^4)

Both derivatives are functions of the kernel VALUE, so backward passes can reuse a saved K instead of
recomputing distances. The Stein term ``S_i = sum_j grad_{y_j} k(x_i, y_j) = 2 sum_j k'(r2_ij) (y_j - x_i)``
has the same shape as a kernel product with the "Stein profile" ``-2 h^2 k'``, which is RBF itself
for RBF and ``(1 + r2/h^2)^(-3/2)`` ("imq3", i.e. IMQ cubed) for IMQ:

    S = (rowsum(K_s) * x - K_s @ y) / h^2,     K_s = kernel matrix of the Stein profile,

so the Stein term is one matrix-free kernel product with right-hand side ``[1 | y]``.

Two further profiles exist for internal use only (not accepted by the public estimators):

    IMQ3 (id 2)  k(r2) = (1 + r2 / h^2)^(-3/2)  k' = -3 k^(5/3) / (2 h^2)   the Stein profile of IMQ
    IMQ5 (id 3)  k(r2) = (1 + r2 / h^2)^(-5/2)  k' = -5 k^(7/5) / (2 h^2)   k'' = 35 k^(9/5) / (4 h^4);
                 the trace term of the IMQ KSD, ``sum_ij k_ij^5 = 1^T K_5 1`` (see ``ops/ksd.py``)

Kernels on learned features, ``k(x, y) = profile(|phi(x) - phi(y)|^2)``, reuse these profiles on
``phi(x)``; only the chain rule through ``phi`` is added (see ``FeatureKernel``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class KernelProfile:
    name: str
    kid: int  # id passed to the compiled / Triton backends
    value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (r2, h) -> k
    deriv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (r2, h) -> dk/dr2
    deriv_of_value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (k, h) -> dk/dr2
    deriv2_of_value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (k, h) -> d2k/dr2^2
    stein_name: str  # profile whose Gram matrix gives the Stein term, -2 h^2 k'

    def __call__(self, r2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.value(r2, h)


def _rbf(r2, h):
    return torch.exp(-r2 / (2 * h * h))


def _rbf_deriv(r2, h):
    return -_rbf(r2, h) / (2 * h * h)


def _imq(r2, h):
    return torch.rsqrt(1 + r2 / (h * h))


def _imq_deriv(r2, h):
    return -_imq(r2, h) ** 3 / (2 * h * h)


def _imq3(r2, h):
    return _imq(r2, h) ** 3


def _imq3_deriv(r2, h):
    return -3 * _imq(r2, h) ** 5 / (2 * h * h)


def _imq5(r2, h):
    return _imq(r2, h) ** 5


def _imq5_deriv(r2, h):
    return -5 * _imq(r2, h) ** 7 / (2 * h * h)


RBF = KernelProfile(
    "rbf", 0, _rbf, _rbf_deriv,
    deriv_of_value=lambda k, h: -k / (2 * h * h),
    deriv2_of_value=lambda k, h: k / (4 * h**4),
    stein_name="rbf",
)
IMQ = KernelProfile(
    "imq", 1, _imq, _imq_deriv,
    deriv_of_value=lambda k, h: -k**3 / (2 * h * h),
    deriv2_of_value=lambda k, h: 3 * k**5 / (4 * h**4),
    stein_name="imq3",
)
# IMQ cubed: only used internally, as the Stein profile of IMQ.
IMQ3 = KernelProfile(
    "imq3", 2, _imq3, _imq3_deriv,
    deriv_of_value=lambda k, h: -3 * k ** (5 / 3) / (2 * h * h),
    deriv2_of_value=lambda k, h: 15 * k ** (7 / 3) / (4 * h**4),
    stein_name="",
)
# IMQ to the fifth: only used internally, by the fused IMQ KSD (its sum_ij k_ij^5 trace term).
IMQ5 = KernelProfile(
    "imq5", 3, _imq5, _imq5_deriv,
    deriv_of_value=lambda k, h: -5 * k ** (7 / 5) / (2 * h * h),
    deriv2_of_value=lambda k, h: 35 * k ** (9 / 5) / (4 * h**4),
    stein_name="",
)

KERNELS = {k.name: k for k in (RBF, IMQ)}
_ALL = {k.name: k for k in (RBF, IMQ, IMQ3, IMQ5)}
_BY_ID = {k.kid: k for k in (RBF, IMQ, IMQ3, IMQ5)}


def get_kernel(kernel) -> KernelProfile:
    """Return the profile named ``kernel`` ("rbf" or "imq"), or ``kernel`` itself if it is one."""
    if isinstance(kernel, KernelProfile):
        return kernel
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a string such as 'rbf' or 'imq', got {type(kernel).__name__}")
    try:
        return _ALL[kernel.lower()]
    except KeyError:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}") from None


def kernel_by_id(kid: int) -> KernelProfile:
    return _BY_ID[kid]


def stein_profile(kernel) -> KernelProfile:
    """The profile ``-2 h^2 k'`` whose kernel product gives the Stein term of ``kernel``."""
    k = get_kernel(kernel)
    if not k.stein_name:
        raise ValueError(f"kernel {k.name!r} has no Stein profile")
    return _ALL[k.stein_name]

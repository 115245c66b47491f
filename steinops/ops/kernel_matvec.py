"""The fused kernel product ``K(x, y) @ v`` as an autograd-aware torch op.

    out[..., n, :] = sum_m k(|x_n - y_m|^2; h) v[..., m, :]
    shapes: x (..., N, d), y (..., M, d), v (..., M, E) -> (..., N, E)

Nothing of size N x M is allocated by the compiled or Triton backends. Gradients (first order) in
x, y, v and the bandwidth h come from three fused calls (see ``csrc/README.md``):

    dL/dx = xgrad(x, y, v, g),   dL/dy = xgrad(y, x, g, v),   dL/dv = K(y, x) @ g,
    h dL/dh = -(sum x . dL/dx + sum y . dL/dy)    (the op is invariant to scaling x, y and h together)

with ``xgrad(x, y, v, g)_n = 2 sum_m k'(r2_nm) (g_n . v_m) (x_n - y_m)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ..kernels import get_kernel
from . import backends
from ._prepare import flatten_batch, prepare_pair


@torch.library.custom_op("steinops::kmv", mutates_args=())
def _kmv(x: Tensor, y: Tensor, v: Tensor, h: Tensor, kernel: int, backend: str) -> Tensor:
    return backends.kmv_forward(backend, x, y, v, h, kernel)


@_kmv.register_fake
def _kmv_fake(x, y, v, h, kernel, backend):
    return x.new_empty(x.shape[0], x.shape[1], v.shape[2])


@torch.library.custom_op("steinops::kmv_xgrad", mutates_args=())
def _kmv_xgrad(x: Tensor, y: Tensor, v: Tensor, g: Tensor, h: Tensor, kernel: int, backend: str) -> Tensor:
    return backends.kmv_xgrad(backend, x, y, v, g, h, kernel)


@_kmv_xgrad.register_fake
def _kmv_xgrad_fake(x, y, v, g, h, kernel, backend):
    return torch.empty_like(x)


def _kmv_setup_context(ctx, inputs, output):
    x, y, v, h, kernel, backend = inputs
    ctx.save_for_backward(x, y, v, h)
    ctx.kernel, ctx.backend = kernel, backend


def _kmv_backward(ctx, g):
    x, y, v, h = ctx.saved_tensors
    need_x, need_y, need_v, need_h = ctx.needs_input_grad[:4]
    g = g.contiguous()
    dx = dy = dv = dh = None
    if need_x or need_h:
        dx = _kmv_xgrad(x, y, v, g, h, ctx.kernel, ctx.backend)
    if need_y or need_h:
        dy = _kmv_xgrad(y, x, g, v, h, ctx.kernel, ctx.backend)
    if need_v:
        dv = _kmv(y, x, g, h, ctx.kernel, ctx.backend)
    if need_h:
        dh = -((x * dx).sum((1, 2)) + (y * dy).sum((1, 2))) / h
    return (dx if need_x else None), (dy if need_y else None), dv, dh, None, None


_kmv.register_autograd(_kmv_backward, setup_context=_kmv_setup_context)


def kernel_matvec(x: Tensor, y: Tensor, v: Tensor, *, kernel="rbf", bandwidth, backend: str | None = None) -> Tensor:
    """Fused kernel product ``K(x, y) @ v`` without materialising K.

    Args:
        x: queries, (..., N, d).
        y: samples, (..., M, d).
        v: right-hand sides, (..., M, E). Leading batch dims of x, y, v (and a tensor bandwidth) broadcast.
        kernel: "rbf" ``exp(-|x-y|^2/(2h^2))`` or "imq" ``(1+|x-y|^2/h^2)^(-1/2)`` (or a KernelProfile).
        bandwidth: h > 0, a number or a tensor broadcastable to the batch shape (differentiable).
        backend: "auto" (default; or env STEINOPS_BACKEND), "cpu", "triton", "cuda" or "reference".

    Returns:
        (..., N, E) in the dtype of the inputs (half inputs are accumulated in float32).
    """
    _checks.points("v", v, check_finite=False)
    xc, yc, h, batch, name, dtype = prepare_pair(x, y, bandwidth, backend, extra=(("v", v),))
    if v.shape[-2] != y.shape[-2]:
        raise ValueError(f"v must have one row per sample of y: v has {v.shape[-2]} rows, y has {y.shape[-2]}")
    vf = flatten_batch(v.to(xc.dtype), batch)
    out = _kmv(xc, yc, vf, h, get_kernel(kernel).kid, name)
    return out.reshape(*batch, x.shape[-2], v.shape[-1]).to(dtype)

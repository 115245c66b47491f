"""Triton kernels for the fused kernel product and its x-gradient (contract: ``csrc/README.md``).

    kmv_forward   out_n = sum_m k(r2_nm) v_m                                    (B, N, E)
    kmv_xgrad     P_nm  = k'(r2_nm) (g_n . v_m)
                  dx_n  = 2 (rowsum(P)_n x_n - sum_m P_nm y_m)                  (B, N, d)

with r2_nm = |x_n - y_m|^2 = |x_n|^2 + |y_m|^2 - 2 x_n . y_m (inputs centred by the caller).

Tiling, flash-attention style: program (b, row block, output-feature block) keeps a
(BLOCK_N, BLOCK_F) accumulator in registers and streams the M samples in BLOCK_M column blocks:
distance tile (tl.dot over d in BLOCK_D chunks) -> kernel tile -> tl.dot with the (BLOCK_M, BLOCK_F)
slab of v (forward) or of y (xgrad, after forming P, whose g.v factor is a tl.dot over E in BLOCK_E
chunks). Nothing N x M ever reaches memory. A wide output (E of the forward, d of the xgrad, e.g.
785 or 3072) is split across grid axis 1 in chunks of at most 64-128 columns; each such program
recomputes its distance tiles, which is cheaper than holding a (BLOCK_N, 3072) accumulator.
Accumulation is in float64 for float64 inputs and in float32 otherwise; the output is stored in the
input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import kernel_consts, kernel_value, kernel_value_and_deriv, sqdist_tile

INTERPRET = C.INTERPRET


@C.autotune(configs=C.point_tile_configs(), key=["D", "E", "N_BUCKET"])
@triton.jit
def _kmv_fwd_kernel(
    x_ptr, y_ptr, v_ptr, h_ptr, out_ptr,
    N, M, D, E, N_BUCKET,
    KERNEL: tl.constexpr, ACC: tl.constexpr, XY_PREC: tl.constexpr, KV_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # axis 0 enumerates (batch, row block): it has no 65535 limit, axis 1 (E chunks) stays small
    pid = tl.program_id(0)
    pid_e = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    b = pid // n_blocks
    pid_n = pid % n_blocks
    b64 = b.to(tl.int64)
    x_base = x_ptr + b64 * N * D
    y_base = y_ptr + b64 * M * D
    v_base = v_ptr + b64 * M * E
    o_base = out_ptr + b64 * N * E

    inv_h2, inv_2h2 = kernel_consts(h_ptr, b, ACC)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E

    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        r2 = sqdist_tile(x_base, y_base, offs_n, offs_m, mask_n, mask_m, D,
                         BLOCK_N, BLOCK_M, BLOCK_D, ACC, XY_PREC)
        k = kernel_value(r2, inv_h2, inv_2h2, KERNEL, ACC)
        # padded samples would otherwise count with y = 0 (v is also 0 there; this is belt and braces)
        k = tl.where(mask_m[None, :], k, 0.0)
        vt = tl.load(v_base + offs_m.to(tl.int64)[:, None] * E + offs_e[None, :],
                     mask=mask_m[:, None] & mask_e[None, :], other=0.0).to(ACC)
        acc = tl.dot(k, vt, acc, input_precision=KV_PREC)

    tl.store(o_base + offs_n.to(tl.int64)[:, None] * E + offs_e[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_e[None, :])


@C.autotune(configs=C.point_tile_configs(), key=["D", "E", "N_BUCKET"])
@triton.jit
def _kmv_xgrad_kernel(
    x_ptr, y_ptr, v_ptr, g_ptr, h_ptr, dx_ptr,
    N, M, D, E, N_BUCKET,
    KERNEL: tl.constexpr, ACC: tl.constexpr, XY_PREC: tl.constexpr, KV_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_f = tl.program_id(1)  # chunk of the output feature dim d
    n_blocks = tl.cdiv(N, BLOCK_N)
    b = pid // n_blocks
    pid_n = pid % n_blocks
    b64 = b.to(tl.int64)
    x_base = x_ptr + b64 * N * D
    y_base = y_ptr + b64 * M * D
    v_base = v_ptr + b64 * M * E
    g_base = g_ptr + b64 * N * E
    o_base = dx_ptr + b64 * N * D

    inv_h2, inv_2h2 = kernel_consts(h_ptr, b, ACC)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows_n = offs_n.to(tl.int64)[:, None]
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < D

    acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=ACC)  # sum_m P_nm y_m (this feature chunk)
    rowsum = tl.zeros((BLOCK_N,), dtype=ACC)       # sum_m P_nm
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows_m = offs_m.to(tl.int64)
        r2 = sqdist_tile(x_base, y_base, offs_n, offs_m, mask_n, mask_m, D,
                         BLOCK_N, BLOCK_M, BLOCK_D, ACC, XY_PREC)
        _, kp = kernel_value_and_deriv(r2, inv_h2, inv_2h2, KERNEL, ACC)

        # g_n . v_m for the tile, a second small matmul over E (v read transposed)
        gv = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
            gt = tl.load(g_base + rows_n * E + offs_e[None, :],
                         mask=mask_n[:, None] & mask_e[None, :], other=0.0)
            vt = tl.load(v_base + rows_m[None, :] * E + offs_e[:, None],
                         mask=mask_e[:, None] & mask_m[None, :], other=0.0)
            gv = tl.dot(gt, vt, gv, input_precision=XY_PREC)

        p = tl.where(mask_m[None, :], kp * gv, 0.0)
        rowsum += tl.sum(p, axis=1)
        yt = tl.load(y_base + rows_m[:, None] * D + offs_f[None, :],
                     mask=mask_m[:, None] & mask_f[None, :], other=0.0).to(ACC)
        acc = tl.dot(p, yt, acc, input_precision=KV_PREC)

    out_mask = mask_n[:, None] & mask_f[None, :]
    xt = tl.load(x_base + rows_n * D + offs_f[None, :], mask=out_mask, other=0.0).to(ACC)
    dx = 2.0 * (rowsum[:, None] * xt - acc)
    tl.store(o_base + rows_n * D + offs_f[None, :], dx.to(dx_ptr.dtype.element_ty), mask=out_mask)


@C.interpreter_bf16_fallback
def kmv_forward(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, h: torch.Tensor, kernel: int) -> torch.Tensor:
    """``out[b, n] = sum_m k(|x[b,n] - y[b,m]|^2; h[b]) v[b, m]``: x (B,N,d), y (B,M,d), v (B,M,E), h (B,)
    -> (B, N, E) in x's dtype. ``kernel``: 0 = RBF, 1 = IMQ, 2 = IMQ^3, 3 = IMQ^5."""
    kernel = C.check_kernel_id(kernel)
    B, N, D = x.shape
    M, E = y.shape[1], v.shape[2]
    out = torch.empty((B, N, E), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    acc, xy_prec, kv_prec = C.dtypes_for(x)
    block_e = C.output_block(E, x.dtype)
    C.launch(_kmv_fwd_kernel, B, N, triton.cdiv(E, block_e), (x, y, v, h, out, N, M, D, E),
             dict(KERNEL=kernel, ACC=acc, XY_PREC=xy_prec, KV_PREC=kv_prec,
                  BLOCK_D=C.reduction_block(D, x.dtype), BLOCK_E=block_e))
    return out


@C.interpreter_bf16_fallback
def kmv_xgrad(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
              kernel: int) -> torch.Tensor:
    """``dx[b, n] = 2 sum_m k'(r2_nm) (g_n . v_m) (x_n - y_m)``: x (B,N,d), y (B,M,d), v (B,M,E),
    g (B,N,E), h (B,) -> (B, N, d) in x's dtype. ``kernel``: 0 = RBF, 1 = IMQ, 2 = IMQ^3, 3 = IMQ^5."""
    kernel = C.check_kernel_id(kernel)
    B, N, D = x.shape
    M, E = y.shape[1], v.shape[2]
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx
    acc, xy_prec, kv_prec = C.dtypes_for(x)
    block_f = C.output_block(D, x.dtype)
    C.launch(_kmv_xgrad_kernel, B, N, triton.cdiv(D, block_f), (x, y, v, g, h, dx, N, M, D, E),
             dict(KERNEL=kernel, ACC=acc, XY_PREC=xy_prec, KV_PREC=kv_prec,
                  BLOCK_D=C.reduction_block(D, x.dtype), BLOCK_E=C.reduction_block(E, x.dtype),
                  BLOCK_F=block_f))
    return dx

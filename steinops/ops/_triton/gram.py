"""Triton kernel for the Gram matrix and the Stein term in one pass (contract: ``csrc/README.md``).

    K_nm = k(r2_nm)                                   (B, N, M)
    S_n  = 2 sum_m k'(r2_nm) (y_m - x_n)
         = 2 (sum_m k'_nm y_m - rowsum(k')_n x_n)     (B, N, d), only when stein is true

with r2_nm = |x_n|^2 + |y_m|^2 - 2 x_n . y_m (inputs centred by the caller).

Tiling: program (b, row block, feature block of S) streams the samples in BLOCK_M column blocks;
each distance tile (tl.dot over d in BLOCK_D chunks) gives a K tile, stored straight away, and k'
of the same tile, reduced into a (BLOCK_N, BLOCK_F) register accumulator by tl.dot with the y slab.
When d is wider than one feature block (e.g. d = 784 or 3072), S's features are split across grid
axis 1; every such program recomputes the distance tiles (K is cheap next to them), and only the
feature-block-0 program writes K. Accumulation is in float64 for float64 inputs and float32
otherwise; K and S are stored in the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import kernel_consts, kernel_value, kernel_value_and_deriv, sqdist_tile

INTERPRET = C.INTERPRET


@C.autotune(configs=C.point_tile_configs(), key=["D", "N_BUCKET", "STEIN"])
@triton.jit
def _gram_kernel(
    x_ptr, y_ptr, h_ptr, k_ptr, s_ptr,
    N, M, D, N_BUCKET,
    KERNEL: tl.constexpr, STEIN: tl.constexpr,
    ACC: tl.constexpr, XY_PREC: tl.constexpr, KV_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_f = tl.program_id(1)  # feature block of S (always 0 without the Stein term)
    n_blocks = tl.cdiv(N, BLOCK_N)
    b = pid // n_blocks
    pid_n = pid % n_blocks
    b64 = b.to(tl.int64)
    x_base = x_ptr + b64 * N * D
    y_base = y_ptr + b64 * M * D
    k_base = k_ptr + b64 * N * M  # int64: N x M can pass 2^31 for one batch element

    inv_h2, inv_2h2 = kernel_consts(h_ptr, b, ACC)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows_n = offs_n.to(tl.int64)[:, None]
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < D
    # rows whose K this program writes: all of them in feature block 0, none elsewhere
    # (a per-row mask rather than a scalar condition; the interpreter rejects scalar & block masks)
    mask_nk = mask_n & ((tl.zeros((BLOCK_N,), dtype=tl.int32) + pid_f) == 0)

    acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=ACC)  # sum_m k'_nm y_m (this feature block)
    rowsum = tl.zeros((BLOCK_N,), dtype=ACC)       # sum_m k'_nm
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        r2 = sqdist_tile(x_base, y_base, offs_n, offs_m, mask_n, mask_m, D,
                         BLOCK_N, BLOCK_M, BLOCK_D, ACC, XY_PREC)
        if STEIN:
            k, kp = kernel_value_and_deriv(r2, inv_h2, inv_2h2, KERNEL, ACC)
        else:
            k = kernel_value(r2, inv_h2, inv_2h2, KERNEL, ACC)
        tl.store(k_base + rows_n * M + offs_m[None, :], k.to(k_ptr.dtype.element_ty),
                 mask=mask_nk[:, None] & mask_m[None, :])
        if STEIN:
            # padded samples (y loaded as 0) must not enter the sums
            kp = tl.where(mask_m[None, :], kp, 0.0)
            rowsum += tl.sum(kp, axis=1)
            yt = tl.load(y_base + offs_m.to(tl.int64)[:, None] * D + offs_f[None, :],
                         mask=mask_m[:, None] & mask_f[None, :], other=0.0).to(ACC)
            acc = tl.dot(kp, yt, acc, input_precision=KV_PREC)

    if STEIN:
        out_mask = mask_n[:, None] & mask_f[None, :]
        xt = tl.load(x_base + rows_n * D + offs_f[None, :], mask=out_mask, other=0.0).to(ACC)
        s = 2.0 * (acc - rowsum[:, None] * xt)
        tl.store(s_ptr + b64 * N * D + rows_n * D + offs_f[None, :], s.to(s_ptr.dtype.element_ty),
                 mask=out_mask)


@C.interpreter_bf16_fallback
def gram_forward(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, kernel: int, stein: bool):
    """``K[b, n, m] = k(|x[b,n] - y[b,m]|^2; h[b])`` (B, N, M) and, if ``stein``,
    ``S[b, n] = 2 sum_m k'(r2_nm) (y_m - x_n)`` (B, N, d); otherwise S is an empty tensor.
    x (B,N,d), y (B,M,d), h (B,); outputs in x's dtype. ``kernel``: 0 = RBF, 1 = IMQ, 2 = IMQ^3, 3 = IMQ^5."""
    kernel = C.check_kernel_id(kernel)
    stein = bool(stein)
    B, N, D = x.shape
    M = y.shape[1]
    K = torch.empty((B, N, M), dtype=x.dtype, device=x.device)
    if stein:
        S = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    else:
        S = x.new_empty(0)
    if B * N == 0 or (M == 0 and not stein) or (D == 0 and M == 0):
        if stein:
            S.zero_()
        return K, S
    acc, xy_prec, kv_prec = C.dtypes_for(x)
    if stein and D > 0:
        block_f = C.output_block(D, x.dtype)
        n_chunks = triton.cdiv(D, block_f)
    else:
        block_f, n_chunks = 16, 1  # S unused (or has no columns); one program per row block
    # s_ptr must be a valid pointer argument even when S is not written
    C.launch(_gram_kernel, B, N, n_chunks, (x, y, h, K, S if stein else K, N, M, D),
             dict(KERNEL=kernel, STEIN=stein, ACC=acc, XY_PREC=xy_prec, KV_PREC=kv_prec,
                  BLOCK_D=C.reduction_block(D, x.dtype), BLOCK_F=block_f))
    return K, S

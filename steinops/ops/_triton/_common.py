"""Shared pieces of the Triton kernels: the distance tile, the kernel profiles, dtype/precision and
block-size choices, and autotuning that degrades to a single fixed config under the interpreter.

Every kernel in this package works on one (BLOCK_N, BLOCK_M) tile of the pairwise matrix at a time:

    r2 = |x|^2 + |y|^2 - 2 x.y          x.y by tl.dot over d in BLOCK_D chunks, clamped at 0
    RBF  k = exp(-r2 / (2 h^2))   = exp2(r2 * (-log2(e) / (2 h^2)))       k' = -k / (2 h^2)
    IMQ  k = rsqrt(1 + r2 / h^2)                                          k' = -k^3 / (2 h^2)
    IMQ3 k = rsqrt(1 + r2 / h^2)^3   (id 2; the Stein profile of IMQ)      k' = -3 k^(5/3) / (2 h^2)
    IMQ5 k = rsqrt(1 + r2 / h^2)^5   (id 3; the trace term of the IMQ KSD)  k' = -5 k^(7/5) / (2 h^2)

The caller centres x and y (translation invariance), which keeps the dot form of r2 accurate.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


# Whether @triton.jit gives interpreted functions: Triton reads TRITON_INTERPRET when a kernel is
# decorated, so ask it rather than the environment (which may have changed since).
INTERPRET = type(_probe).__name__ == "InterpretedFunction"

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

# Block sizes of the loops whose extent is a data dimension (d or E). They are chosen by the
# launcher from the problem (tl.dot needs >= 16; no point in a 128-wide tile for E = 1), the tile
# sizes over points (BLOCK_N, BLOCK_M) by the autotuner on a GPU, fixed under the interpreter.
# "red" caps a reduction chunk (looped over), "out" caps an output feature chunk (a grid axis; the
# distances are recomputed per output chunk, so a wide chunk saves work but costs registers).
_CAPS = {
    # dtype class: (red cap, out cap)
    "interp": (64, 64),
    "half": (64, 128),
    "f32": (64, 128),
    "f64": (32, 64),
}
INTERP_BLOCK_N = 32
INTERP_BLOCK_M = 32


def _pow2_block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "f64"
    if dtype == torch.float32:
        return "f32"
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    raise TypeError(f"the Triton backend supports float16, bfloat16, float32 and float64, got {dtype}")


def reduction_block(n: int, dtype: torch.dtype) -> int:
    """Chunk of a reduced feature dimension (d for x.y, E for g.v)."""
    return _pow2_block(n, _CAPS["interp" if INTERPRET else _dtype_class(dtype)][0])


def output_block(n: int, dtype: torch.dtype) -> int:
    """Chunk of an output feature dimension (E of kmv_forward, d of kmv_xgrad / gram's S)."""
    return _pow2_block(n, _CAPS["interp" if INTERPRET else _dtype_class(dtype)][1])


def size_bucket(n: int) -> int:
    """Coarse autotuning key for a point count, so tiny and huge N do not share a tile shape."""
    return min(triton.next_power_of_2(max(int(n), 1)), 4096)


def dtypes_for(x: torch.Tensor):
    """(ACC, XY_PREC, KV_PREC) constexprs for inputs of x's dtype.

    ACC: float64 for float64 inputs, float32 otherwise (half inputs too).
    XY_PREC: tl.dot precision for products of raw inputs (x.y, g.v). "ieee" so that float32 never
      drops to TF32 (10-bit mantissa would wreck the cancellation in |x|^2 + |y|^2 - 2 x.y); 16-bit
      inputs are multiplied natively with exact products and float32 accumulation.
    KV_PREC: precision of (kernel tile) @ (v or y), both in ACC. IEEE for float32/float64; for half
      inputs TF32 on NVIDIA, at tensor-core speed: v and y convert to TF32 exactly, and rounding k
      to TF32's 11 significant bits matches the float16 output's own rounding (bfloat16 has 8).
    """
    cls = _dtype_class(x.dtype)
    acc = tl.float64 if cls == "f64" else tl.float32
    kv = "ieee"
    if cls == "half" and x.is_cuda and torch.version.hip is None and not INTERPRET:
        kv = "tf32"
    return acc, "ieee", kv


def check_kernel_id(kernel: int) -> int:
    kernel = int(kernel)
    if kernel not in (0, 1, 2, 3):
        raise ValueError(f"kernel id must be 0 (rbf), 1 (imq), 2 (imq3) or 3 (imq5), got {kernel}")
    return kernel


def autotune(configs, key):
    """``triton.autotune`` on a GPU; under the interpreter (which cannot autotune) the identity, and
    the launcher passes ``interp_meta()`` instead."""
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


def interp_meta() -> dict:
    return dict(BLOCK_N=INTERP_BLOCK_N, BLOCK_M=INTERP_BLOCK_M) if INTERPRET else {}


def point_tile_configs():
    """Candidate (BLOCK_N, BLOCK_M, warps, stages). Small tiles matter for small N (more programs in
    flight) and for float64 (register and shared-memory pressure); configs that do not fit are
    skipped by the autotuner."""
    shapes = [
        (128, 64, 8, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
        (32, 64, 4, 2),
        (32, 32, 4, 2),
        (16, 32, 2, 2),
    ]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bn, bm, w, s in shapes
    ]


# ---- device-side helpers -------------------------------------------------------------------------

@triton.jit
def sqdist_tile(x_base, y_base, offs_n, offs_m, mask_n, mask_m, D,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                ACC: tl.constexpr, XY_PREC: tl.constexpr):
    """r2[i, j] = |x_i - y_j|^2 for rows offs_n of x (.., D) and rows offs_m of y (.., D), in ACC.

    The norms come from the same loaded chunks as the x.y product (no extra pass over memory);
    masked entries load as 0 and so contribute nothing to any of the three terms.
    """
    xy = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    xx = tl.zeros((BLOCK_N,), dtype=ACC)
    yy = tl.zeros((BLOCK_M,), dtype=ACC)
    rows_x = offs_n.to(tl.int64)[:, None] * D
    rows_y = offs_m.to(tl.int64)[None, :] * D
    for k0 in range(0, D, BLOCK_D):
        offs_k = k0 + tl.arange(0, BLOCK_D)
        mask_k = offs_k < D
        xt = tl.load(x_base + rows_x + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        # y is read transposed, (BLOCK_D, BLOCK_M), so the product is a plain tl.dot
        yt = tl.load(y_base + rows_y + offs_k[:, None], mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        xy = tl.dot(xt, yt, xy, input_precision=XY_PREC)
        xf = xt.to(ACC)
        yf = yt.to(ACC)
        xx += tl.sum(xf * xf, axis=1)
        yy += tl.sum(yf * yf, axis=0)
    r2 = xx[:, None] + yy[None, :] - 2.0 * xy
    # rounding can push r2 of (near-)coincident points below 0
    return tl.maximum(r2, 0.0)


@triton.jit
def kernel_consts(h_ptr, b, ACC: tl.constexpr):
    """(1/h^2, 1/(2h^2)) for batch element b, in ACC (h is stored in the input dtype)."""
    h = tl.load(h_ptr + b).to(ACC)
    inv_h2 = 1.0 / (h * h)
    return inv_h2, 0.5 * inv_h2


@triton.jit
def _inv_sqrt(t, ACC: tl.constexpr):
    if ACC == tl.float64:
        r = 1.0 / tl.sqrt(t)  # sqrt and division are correctly rounded in float64; rsqrt need not be
    else:
        r = tl.rsqrt(t)
    return r


@triton.jit
def kernel_value(r2, inv_h2, inv_2h2, KERNEL: tl.constexpr, ACC: tl.constexpr):
    """k(r2) for kernel id KERNEL (0 RBF, 1 IMQ, 2 IMQ^3, 3 IMQ^5), in ACC."""
    if KERNEL == 0:
        if ACC == tl.float64:
            # a Python float constant is float32 in Triton: keep log2(e) out of the float64 path
            k = tl.exp(-r2 * inv_2h2)
        else:
            k = tl.exp2(r2 * (-LOG2E * inv_2h2))
    else:
        s = _inv_sqrt(1.0 + r2 * inv_h2, ACC)
        if KERNEL == 1:
            k = s
        elif KERNEL == 2:
            k = s * s * s
        else:
            s2 = s * s
            k = s2 * s2 * s
    return k


@triton.jit
def kernel_value_and_deriv(r2, inv_h2, inv_2h2, KERNEL: tl.constexpr, ACC: tl.constexpr):
    """(k, dk/dr2): RBF (k, -k/(2h^2)), IMQ (s, -s^3/(2h^2)), IMQ^3 (s^3, -3 s^5/(2h^2)),
    IMQ^5 (s^5, -5 s^7/(2h^2)), with s = (1 + r2/h^2)^(-1/2)."""
    if KERNEL == 0:
        k = kernel_value(r2, inv_h2, inv_2h2, KERNEL, ACC)
        kp = -k * inv_2h2
    else:
        s = _inv_sqrt(1.0 + r2 * inv_h2, ACC)
        s2 = s * s
        if KERNEL == 1:
            k = s
            kp = -(s2 * s) * inv_2h2
        elif KERNEL == 2:
            k = s2 * s
            kp = -3.0 * (k * s2) * inv_2h2
        else:
            k = s2 * s2 * s
            kp = -5.0 * (k * s2) * inv_2h2
    return k, kp


def launch(kernel_fn, B: int, N: int, n_feature_chunks: int, args, meta: dict) -> None:
    """Launch on the grid (B * cdiv(N, BLOCK_N), n_feature_chunks). Axis 0 enumerates (batch, row
    block), as it has no 65535 limit; the kernel recovers both with n_blocks = cdiv(N, BLOCK_N)."""
    def grid(m):
        return (B * triton.cdiv(N, m["BLOCK_N"]), n_feature_chunks)

    meta = dict(meta, N_BUCKET=size_bucket(N), **interp_meta())
    dev = args[0].device
    if dev.type == "cuda":
        with torch.cuda.device(dev):  # Triton launches on the current device
            kernel_fn[grid](*args, **meta)
    else:
        kernel_fn[grid](*args, **meta)


def interpreter_bf16_fallback(fn):
    """The interpreter's tl.dot multiplies bfloat16 tiles as their raw 16-bit patterns (numpy has
    no bfloat16). Under the interpreter only, run bfloat16 inputs in float32 -- the same math, as
    the kernels accumulate half inputs in float32 anyway, and bf16 x bf16 products are exact in
    float32 -- and round the outputs back. Compiled kernels take bfloat16 directly."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (INTERPRET and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args)):
            return fn(*args, **kwargs)
        out = fn(*(a.float() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
        if isinstance(out, tuple):
            return tuple(o.to(torch.bfloat16) for o in out)
        return out.to(torch.bfloat16)

    return wrapper

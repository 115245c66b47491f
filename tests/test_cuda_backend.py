"""The CUDA backend of ``kmv_forward`` against the float64 plain-PyTorch reference.

Runs only where there is a CUDA device and ``steinops._C`` was built with the CUDA kernels
(``steinops._C.has_cuda()``). Calls the compiled op directly, ``torch.ops.steinops_C.kmv_forward``,
with inputs that already follow the backend contract (contiguous, (B, N, d) / (B, M, d) / (B, M, E) /
(B,)). Sizes are awkward on purpose: not multiples of the tiles (128 / 64 samples, 512 / 256 / 64
rows per block), E = 33 needs a full chunk of 32 plus a remainder chunk, d = 17 / 64 / 784 take the
dot-product path, d <= 8 the direct-difference path.

Errors are measured relative to ``sum_m k(r2_nm) |v_m|`` (the reference run on ``|v|``), the natural
scale of the rounding error of a sum of products.
"""
from __future__ import annotations

import math

import pytest
import torch

try:
    import steinops._C as _C  # loading the extension registers torch.ops.steinops_C
except ImportError:  # not built
    _C = None


def _cuda_backend_available() -> bool:
    if _C is None or not torch.cuda.is_available():
        return False
    has_cuda = getattr(_C, "has_cuda", None)
    return bool(has_cuda()) if callable(has_cuda) else False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _cuda_backend_available(),
        reason="needs a CUDA device and steinops._C built with its CUDA kernels (steinops._C.has_cuda())",
    ),
]

KERNELS = {"rbf": 0, "imq": 1}
# Tolerances relative to sum_m k |v_m|. float32: fast ex2/rsqrt (~2 ulp) and float32 sums;
# half types are computed in float32, the tolerance is the final rounding to the output dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _reference(x, y, v, h, kernel):
    from steinops.ops.reference import kmv_forward as ref_kmv

    x64, y64, v64, h64 = (t.double() for t in (x, y, v, h))
    return ref_kmv(x64, y64, v64, h64, kernel), ref_kmv(x64, y64, v64.abs(), h64, kernel)


def _inputs(B, N, M, d, E, dtype, seed=0, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, M, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, M, E, generator=g, dtype=torch.float64)
    # bandwidths around the median distance, sqrt(2 d), so k is neither ~0 nor ~1 everywhere
    h = math.sqrt(max(d, 1)) * (0.5 + torch.rand(B, generator=g, dtype=torch.float64))
    # centre like the Python layer does (the kernels are translation invariant)
    mu = torch.cat([x, y], 1).mean(1, keepdim=True)
    x, y = x - mu, y - mu
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (x, y, v, h))


def _check(x, y, v, h, kernel, dtype):
    out = torch.ops.steinops_C.kmv_forward(x, y, v, h, KERNELS[kernel])
    torch.cuda.synchronize()
    B, N, _ = x.shape
    E = v.shape[-1]
    assert out.shape == (B, N, E)
    assert out.dtype == dtype and out.device == x.device
    ref, scale = _reference(x, y, v, h, kernel)
    err = (out.double() - ref).abs()
    bound = TOL[dtype] * scale + 1e-30
    assert torch.isfinite(out).all(), "non-finite output"
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, (
        f"max error {err.max().item():.3g} exceeds {TOL[dtype]:g} x scale "
        f"(worst ratio {worst:.3g}; B={B} N={N} M={y.shape[1]} d={x.shape[-1]} E={E} {dtype} {kernel})"
    )


@pytest.mark.parametrize("E", [1, 4, 33])
@pytest.mark.parametrize("d", [1, 3, 17, 64, 784])
@pytest.mark.parametrize("kernel", ["rbf", "imq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_kmv_forward_matches_reference(dtype, kernel, d, E):
    B, N, M = 2, 37, 203
    _check(*_inputs(B, N, M, d, E, dtype, seed=d * 100 + E), kernel, dtype)


@pytest.mark.parametrize("d", [0, 2, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("E", [2, 8, 16, 31, 32, 64, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kmv_forward_dispatch_coverage(dtype, d, E):
    """Every compiled (d, E-chunk) variant, incl. padded d and E = k * 32 + remainder."""
    _check(*_inputs(1, 45, 150, d, E, dtype, seed=7 * d + E), "rbf", dtype)


@pytest.mark.parametrize(
    "B,N,M,d,E",
    [
        (1, 1, 1, 3, 1),        # smallest
        (3, 1, 1000, 3, 4),     # one query row, many samples: M is split across blocks
        (1, 1300, 700, 3, 1),   # several row blocks
        (1, 1300, 700, 3, 33),
        (2, 130, 257, 784, 5),  # dot path, several row blocks and sample tiles
        (5, 17, 3, 17, 1),      # M smaller than a tile
        (1, 129, 4097, 2, 8),   # many sample tiles
    ],
)
@pytest.mark.parametrize("kernel", ["rbf", "imq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kmv_forward_shapes(dtype, kernel, B, N, M, d, E):
    _check(*_inputs(B, N, M, d, E, dtype, seed=B + N + M + d + E), kernel, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_kmv_forward_empty(dtype):
    op = torch.ops.steinops_C.kmv_forward
    x, y, v, h = _inputs(2, 5, 0, 3, 4, dtype)  # M = 0: empty sum
    out = op(x, y, v, h, 0)
    assert out.shape == (2, 5, 4) and out.dtype == dtype and (out == 0).all()
    x, y, v, h = _inputs(2, 0, 6, 3, 4, dtype)  # N = 0
    assert op(x, y, v, h, 1).shape == (2, 0, 4)
    x, y, v, h = _inputs(2, 5, 6, 3, 0, dtype)  # E = 0
    assert op(x, y, v, h, 0).shape == (2, 5, 0)
    x, y, v, h = _inputs(0, 5, 6, 3, 2, dtype)  # B = 0
    assert op(x, y, v, h, 0).shape == (0, 5, 2)


def test_kmv_forward_rejects_bad_inputs():
    op = torch.ops.steinops_C.kmv_forward
    x, y, v, h = _inputs(2, 5, 6, 3, 4, torch.float32)
    with pytest.raises(RuntimeError):
        op(x, y.double(), v, h, 0)  # dtype mismatch
    with pytest.raises(RuntimeError):
        op(x, y, v[:, :5].contiguous(), h, 0)  # M mismatch
    with pytest.raises(RuntimeError):
        op(x, y[..., :2].contiguous(), v, h, 0)  # d mismatch
    with pytest.raises(RuntimeError):
        op(x, y, v, h[:1], 0)  # B mismatch
    with pytest.raises(RuntimeError):
        op(x, y, v, h, 2)  # unknown kernel
    with pytest.raises(RuntimeError):
        op(x.transpose(1, 2).contiguous().transpose(1, 2), y, v, h, 0)  # not contiguous


def test_kmv_forward_uses_current_stream():
    x, y, v, h = _inputs(1, 300, 500, 3, 4, torch.float32)
    expected = torch.ops.steinops_C.kmv_forward(x, y, v, h, 0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = torch.ops.steinops_C.kmv_forward(x, y, v, h, 0)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # deterministic: no atomics


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kmv_forward_on_second_device():
    x, y, v, h = _inputs(2, 40, 90, 3, 4, torch.float32, device="cuda:1")
    with torch.cuda.device(0):
        out = torch.ops.steinops_C.kmv_forward(x, y, v, h, 1)
    assert out.device == x.device
    ref, scale = _reference(x, y, v, h, "imq")
    assert ((out.double() - ref).abs() <= 1e-4 * scale).all()


@pytest.mark.slow
def test_kmv_forward_large_d3():
    """N = M = 100,000, d = 3, float32 (the performance target: < 5 ms on an H100). Prints the time;
    checks a subset of rows against the float64 reference."""
    N = M = 100_000
    x, y, v, h = _inputs(1, N, M, 3, 1, torch.float32, seed=1)
    op = torch.ops.steinops_C.kmv_forward
    out = op(x, y, v, h, 0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        op(x, y, v, h, 0)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / reps
    print(f"kmv_forward N=M=1e5 d=3 E=1 float32 rbf: {ms:.2f} ms on {torch.cuda.get_device_name()}")
    rows = torch.arange(0, N, 397, device=x.device)
    ref, scale = _reference(x[:, rows], y, v, h, "rbf")
    err = (out[:, rows].double() - ref).abs()
    assert (err <= 1e-4 * scale).all(), f"max error {err.max().item():.3g}"

"""Tests of steinops.ksd against a naive dense float64 implementation whose kernel gradients and trace
come from autograd (independent of the closed forms in steinops/ops/ksd.py)."""
import math
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import steinops
from steinops.ops import backends

from conftest import cpu_backends

BACKENDS = ["reference"] + (["cpu"] if backends.available("cpu", torch.device("cpu")) else [])
KERNELS = ["rbf", "imq"]


def _profile(name, r2, h):
    if name == "rbf":
        return torch.exp(-r2 / (2 * h * h))
    return (1 + r2 / (h * h)) ** -0.5


def naive_ksd_single(x, s, h, kernel, u_statistic):
    """u(x_i, x_j) for every pair from an explicit M x M x d construction; all derivatives by autograd."""
    M, d = x.shape
    if not x.requires_grad:
        x = x.detach().requires_grad_()
    xa = x.unsqueeze(1).repeat(1, M, 1)  # first argument, (M, M, d)
    xb = x.unsqueeze(0).repeat(M, 1, 1)  # second argument
    K = _profile(kernel, ((xa - xb) ** 2).sum(-1), h)
    gxa, gxb = torch.autograd.grad(K.sum(), (xa, xb), create_graph=True)  # per-pair grad_x k, grad_x' k
    tr = torch.zeros_like(K)
    for c in range(d):
        tr = tr + torch.autograd.grad(gxb[..., c].sum(), xa, create_graph=True)[0][..., c]
    si, sj = s.unsqueeze(1), s.unsqueeze(0)
    u = (si * sj).sum(-1) * K + (si * gxb).sum(-1) + (gxa * sj).sum(-1) + tr
    if u_statistic:
        return (u.sum() - u.diagonal().sum()) / (M * (M - 1))
    return u.sum() / (M * M)


def naive_ksd(x, s, h, kernel, u_statistic):
    batch = x.shape[:-2]
    xf, sf = x.reshape(-1, *x.shape[-2:]), s.reshape(-1, *s.shape[-2:])
    hf = (h if isinstance(h, torch.Tensor) else torch.tensor(float(h), dtype=x.dtype)).expand(batch).reshape(-1)
    return torch.stack([naive_ksd_single(xf[b], sf[b], hf[b], kernel, u_statistic) for b in range(xf.shape[0])]).reshape(batch)


CASES = [((), 7, 3), ((2,), 13, 1), ((2, 3), 5, 4), ((3,), 2, 2), ((1,), 11, 6)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("u_statistic", [True, False])
@pytest.mark.parametrize("batch,M,d", CASES)
def test_matches_naive_values_and_grads(backend, kernel, u_statistic, batch, M, d):
    x = (torch.randn(*batch, M, d, dtype=torch.float64) * 1.3 + 2.0).requires_grad_()
    s = torch.randn(*batch, M, d, dtype=torch.float64).requires_grad_()
    h = (torch.rand(batch, dtype=torch.float64) + 0.6).requires_grad_() if batch else torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    out = steinops.ksd(x, s, kernel=kernel, bandwidth=h, u_statistic=u_statistic, backend=backend)
    ref = naive_ksd(x, s, h, kernel, u_statistic)
    assert out.shape == batch and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(batch, dtype=torch.float64)
    g = torch.autograd.grad((out * w).sum(), (x, s, h))
    gr = torch.autograd.grad((ref * w).sum(), (x, s, h))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_number_bandwidth_and_broadcast_tensor_bandwidth(backend, kernel):
    x = torch.randn(2, 3, 6, 2, dtype=torch.float64)
    s = torch.randn(2, 3, 6, 2, dtype=torch.float64)
    out = steinops.ksd(x, s, kernel=kernel, bandwidth=1.7, backend=backend)
    torch.testing.assert_close(out, naive_ksd(x, s, 1.7, kernel, True), rtol=1e-10, atol=1e-12)
    h = torch.tensor([0.8, 1.1, 1.9], dtype=torch.float64)  # broadcasts over the first batch dim
    out = steinops.ksd(x, s, kernel=kernel, bandwidth=h, backend=backend)
    torch.testing.assert_close(out, naive_ksd(x, s, h, kernel, True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("u_statistic", [True, False])
def test_gradcheck(backend, kernel, u_statistic):
    x = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    h = torch.tensor([0.9, 1.4], dtype=torch.float64, requires_grad=True)
    f = lambda x, s, h: steinops.ksd(x, s, kernel=kernel, bandwidth=h, u_statistic=u_statistic, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, s, h))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("u_statistic", [True, False])
def test_imq_fused_on_every_backend(backend, u_statistic):
    """The IMQ trace term sum_ij k^5 is the fused imq5 kernel product: value and gradients in x, score
    and h on every CPU-runnable backend (Triton through its interpreter)."""
    x = (torch.randn(2, 9, 3, dtype=torch.float64) + 1.5).requires_grad_()
    s = torch.randn(2, 9, 3, dtype=torch.float64).requires_grad_()
    h = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    out = steinops.ksd(x, s, kernel="imq", bandwidth=h, u_statistic=u_statistic, backend=backend)
    ref = naive_ksd(x, s, h, "imq", u_statistic)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.sum(), (x, s, h)), torch.autograd.grad(ref.sum(), (x, s, h))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_imq_trace_term_is_the_imq5_kernel_product(monkeypatch):
    """The IMQ KSD goes through kernel_matvec only (profiles imq, imq3 and imq5), no dense path."""
    mod = sys.modules["steinops.ops.ksd"]  # the package attribute `ksd` is the function
    seen = []
    real = mod.kernel_matvec

    def spy(x, y, v, *, kernel, **kw):
        seen.append(steinops.kernels.get_kernel(kernel).name)
        return real(x, y, v, kernel=kernel, **kw)

    monkeypatch.setattr(mod, "kernel_matvec", spy)
    x = torch.randn(7, 2, dtype=torch.float64)
    out = steinops.ksd(x, -x, kernel="imq", bandwidth=1.1, backend="reference")
    torch.testing.assert_close(out, naive_ksd(x, -x, 1.1, "imq", True), rtol=1e-10, atol=1e-12)
    assert sorted(seen) == ["imq", "imq3", "imq5"]


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch, steinops
    torch.manual_seed(0)
    M, d = 20000, 3
    x = torch.randn(M, d, requires_grad=True); s = torch.randn(M, d, requires_grad=True)
    h = torch.tensor(0.5, requires_grad=True)
    steinops.ksd(x[:10], s[:10], kernel="imq", bandwidth=h, backend="cpu").backward()  # warm-up: libraries loaded
    x.grad = s.grad = h.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = steinops.ksd(x, s, kernel="imq", bandwidth=h, backend="cpu")
    out.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(s.grad).all()
    assert torch.isfinite(h.grad)
    print((after - before) / 1024)  # MiB
""")


@pytest.mark.skipif(not backends.available("cpu", torch.device("cpu")), reason="C++ extension not built")
def test_imq_20k_never_allocates_mxm():
    """IMQ KSD with gradients at M = 20,000, d = 3 in float32: an M x M float32 matrix is 1.5 GiB, a row
    block of one (as the former chunked k^5 sum used) tens of MiB; the fused path needs O(M d)."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    grown_mib = float(res.stdout.strip().splitlines()[-1])
    mxm_mib = 20000 * 20000 * 4 / 2**20
    assert grown_mib < 0.01 * mxm_mib, f"peak memory grew by {grown_mib:.0f} MiB (M x M float32 is {mxm_mib:.0f} MiB)"
    assert elapsed < 300, f"took {elapsed:.0f} s"


@pytest.mark.parametrize("kernel", KERNELS)
def test_translation_invariant_and_v_statistic_nonnegative(kernel):
    x = torch.randn(4, 30, 3, dtype=torch.float64)
    s = torch.randn(4, 30, 3, dtype=torch.float64) * 0.1  # near-zero discrepancy is the hard case for >= 0
    v = steinops.ksd(x, s, kernel=kernel, bandwidth=1.0, u_statistic=False)
    assert (v >= 0).all()
    v2 = steinops.ksd(x + 1e3, s, kernel=kernel, bandwidth=1.0, u_statistic=False)
    torch.testing.assert_close(v, v2, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_exact_score_gives_zero_in_expectation_and_wrong_score_positive(kernel):
    d, M, R = 3, 200, 40
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    A = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.6]], dtype=torch.float64)
    prec = torch.linalg.inv(A @ A.T)
    gen = torch.Generator().manual_seed(7)
    x = mu + torch.randn(R, M, d, dtype=torch.float64, generator=gen) @ A.T  # R independent sample sets
    exact = -(x - mu) @ prec
    wrong = -(x - mu - torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)) @ prec
    good = steinops.ksd(x, exact, kernel=kernel, bandwidth=1.5)
    bad = steinops.ksd(x, wrong, kernel=kernel, bandwidth=1.5)
    se = good.std() / math.sqrt(R)
    assert abs(float(good.mean())) < 4 * float(se)
    assert float(bad.mean()) > 20 * float(bad.std() / math.sqrt(R))
    assert float(bad.mean()) > 10 * float(good.abs().mean())
    assert (bad > 0).all()


def test_median_bandwidth_and_unbatched():
    x = torch.randn(50, 2, dtype=torch.float64)
    s = -x
    out = steinops.ksd(x, s, bandwidth="median")
    h = steinops.bandwidth.select_bandwidth(x, "median")
    torch.testing.assert_close(out, steinops.ksd(x, s, bandwidth=float(h)))
    assert out.shape == ()


def test_float32_close_to_float64():
    x = torch.randn(3, 64, 4, dtype=torch.float64) + 5
    s = torch.randn(3, 64, 4, dtype=torch.float64)
    for kernel in KERNELS:
        ref = steinops.ksd(x, s, kernel=kernel, bandwidth=1.2)
        out = steinops.ksd(x.float(), s.float(), kernel=kernel, bandwidth=1.2)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-4)


def test_bad_inputs_name_the_argument():
    x = torch.randn(5, 2, dtype=torch.float64)
    s = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="score"):
        steinops.ksd(x, s[:4], bandwidth=1.0)
    with pytest.raises(TypeError, match="score"):
        steinops.ksd(x, s.float(), bandwidth=1.0)
    with pytest.raises(TypeError, match="x"):
        steinops.ksd(x.numpy(), s, bandwidth=1.0)
    with pytest.raises(ValueError, match="x"):
        steinops.ksd(x[:1], s[:1], bandwidth=1.0)
    steinops.ksd(x[:1], s[:1], bandwidth=1.0, u_statistic=False)  # one point is fine for the V-statistic
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x"):
        steinops.ksd(bad, s, bandwidth=1.0)
    with pytest.raises(ValueError, match="score"):
        steinops.ksd(x, bad, bandwidth=1.0)
    for h in (0.0, -1.0, float("inf"), torch.tensor(-1.0, dtype=torch.float64)):
        with pytest.raises(ValueError, match="bandwidth"):
            steinops.ksd(x, s, bandwidth=h)
    with pytest.raises(ValueError, match="bandwidth"):
        steinops.ksd(x, s, bandwidth="nonsense")
    with pytest.raises(ValueError, match="bandwidth"):
        steinops.ksd(x.expand(2, 5, 2), s.expand(2, 5, 2), bandwidth=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="kernel"):
        steinops.ksd(x, s, kernel="imq3", bandwidth=1.0)
    with pytest.raises(ValueError, match="kernel"):
        steinops.ksd(x, s, kernel="gauss", bandwidth=1.0)
    with pytest.raises(TypeError, match="u_statistic"):
        steinops.ksd(x, s, bandwidth=1.0, u_statistic=1)
    with pytest.raises(ValueError, match="backend"):
        steinops.ksd(x, s, bandwidth=1.0, backend="nope")

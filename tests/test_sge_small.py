"""The fused dense SGE fit (steinops_C::sge_small) that SteinScoreEstimator uses for small CPU sample sets:
against a float64 reference written from the formula, and the estimator's dispatch around it."""
import warnings

import pytest
import torch

from steinops.estimators.stein import SteinScoreEstimator, _fused_small_fit
from steinops.ops.backends import compiled_extension

pytestmark = pytest.mark.skipif(compiled_extension() is None, reason="steinops._C not built")


def reference(x, h, eta, kernel):
    """G = -(K + eta I)^-1 S in float64, K and S from their definitions (x (B, n, d) centred)."""
    x = x.double()
    diff = x[:, :, None, :] - x[:, None, :, :]  # (B, n, n, d): x_i - x_j
    r2 = diff.square().sum(-1)
    h2 = h.double().square()[:, None, None]
    if kernel == "rbf":
        K = torch.exp(-r2 / (2 * h2))
        prof = K
    else:
        K = (1 + r2 / h2).rsqrt()
        prof = K**3
    S = (prof[..., None] * diff).sum(2) / h2  # sum_j grad_{x_j} k(x_i, x_j)
    A = K + eta.double()[:, None, None] * torch.eye(x.shape[1], dtype=torch.float64)
    return -torch.linalg.solve(A, S), torch.linalg.cholesky(A)


@pytest.mark.parametrize("B, n, d", [(1, 2, 1), (3, 37, 2), (5, 128, 3), (2, 61, 17), (1, 256, 2)])
@pytest.mark.parametrize("kernel", ["rbf", "imq"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_matches_the_float64_reference(B, n, d, kernel, dtype, tol):
    g = torch.Generator().manual_seed(1000 * n + d)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64) * (0.2 + 3 * torch.rand(B, 1, 1, generator=g, dtype=torch.float64))
    x = x - x.mean(1, keepdim=True)
    h = 0.3 + 2 * torch.rand(B, generator=g, dtype=torch.float64)
    eta = 0.01 + torch.rand(B, generator=g, dtype=torch.float64)
    G_ref, L_ref = reference(x, h, eta, kernel)
    L, G, info = torch.ops.steinops_C.sge_small(x.to(dtype), h.to(dtype), eta.to(dtype), 0 if kernel == "rbf" else 1)
    assert info.tolist() == [0] * B
    assert G.dtype == dtype and G.shape == (B, n, d) and L.shape == (B, n, n)
    assert (G.double() - G_ref).abs().max() <= tol * G_ref.abs().max().clamp_min(1.0)
    assert (L.double() - L_ref).abs().max() <= tol
    assert torch.equal(L.triu(1), torch.zeros_like(L))


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_the_estimator_takes_it_and_agrees_with_the_reference_backend(kernel):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 45, 2, generator=g) * torch.tensor([0.5, 2.0, 8.0]).view(1, 3, 1, 1) + 4.0  # not centred
    fused = SteinScoreEstimator(kernel, eta=0.05)
    assert _fused_small_fit(x, torch.ones(2, 3), torch.ones(2, 3), kernel, None)
    fused.fit(x)
    ref = SteinScoreEstimator(kernel, eta=0.05, backend="reference").fit(x)
    assert (fused.scores_ - ref.scores_).abs().max() <= 1e-4 * ref.scores_.abs().max()
    z = torch.randn(2, 3, 7, 2, generator=g) + 4.0
    assert torch.allclose(fused.predict(z), ref.predict(z), rtol=1e-3, atol=1e-3 * ref.scores_.abs().max().item())


def test_gradients_and_other_backends_take_the_general_path():
    x = torch.randn(1, 20, 2, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    assert not _fused_small_fit(x.clone().requires_grad_(), one, one, "rbf", None)
    assert not _fused_small_fit(x, one, one, "rbf", "reference")
    assert not _fused_small_fit(torch.randn(1, 300, 2, dtype=torch.float64), one, one, "rbf", None)  # large M
    xg = x.clone().requires_grad_()
    est = SteinScoreEstimator("rbf", eta=0.1).fit(xg)
    assert est.scores_.requires_grad  # differentiable fits still work
    torch.autograd.gradcheck(lambda t: SteinScoreEstimator("rbf", bandwidth=1.3, eta=0.1).fit(t).scores_,
                             (torch.randn(1, 6, 2, dtype=torch.float64, requires_grad=True),))


def test_a_singular_system_falls_back_to_jitter():
    x = torch.zeros(1, 6, 2, dtype=torch.float64)
    x[0, 3:] = 1.0  # duplicates: K has rank 2, eta tiny
    with pytest.warns(RuntimeWarning, match="jitter"):
        est = SteinScoreEstimator("rbf", bandwidth=1.0, eta=1e-300).fit(x)
    assert torch.isfinite(est.scores_).all()
    L, G, info = torch.ops.steinops_C.sge_small(x, torch.ones(1, dtype=torch.float64),
                                                torch.full((1,), 1e-300, dtype=torch.float64), 0)
    assert int(info[0]) > 0


def test_a_failed_set_gets_nan_and_leaves_the_others_alone():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, 2, generator=g, dtype=torch.float64)
    x[1] = 0.0
    x[1, 5:] = 1.0  # set 1: duplicates with eta ~ 0, not positive definite
    x = x - x.mean(1, keepdim=True)
    h, eta = torch.ones(3, dtype=torch.float64), torch.tensor([0.1, 1e-300, 0.1], dtype=torch.float64)
    L, G, info = torch.ops.steinops_C.sge_small(x, h, eta, 0)
    assert int(info[1]) > 0 and int(info[0]) == int(info[2]) == 0
    assert torch.isnan(G[1]).all()  # never stale numbers for a set the caller has to redo
    keep = torch.tensor([0, 2])
    G_ref, _ = reference(x[keep], h[keep], eta[keep], "rbf")
    assert torch.allclose(G[keep], G_ref, rtol=1e-10, atol=1e-12)


def test_nan_input_never_passes_silently():
    x = torch.randn(1, 8, 2)
    x[0, 2, 0] = float("nan")
    L, G, info = torch.ops.steinops_C.sge_small(x, torch.ones(1), torch.ones(1), 0)
    assert int(info[0]) > 0  # a NaN never passes as positive definite


def test_bad_input_is_rejected():
    one = torch.ones(1)
    with pytest.raises(RuntimeError, match="x must be 3-D"):
        torch.ops.steinops_C.sge_small(torch.ones(4, 2), one, one, 0)
    with pytest.raises(RuntimeError, match="h must have shape"):
        torch.ops.steinops_C.sge_small(torch.ones(1, 4, 2), torch.ones(2), one, 0)
    with pytest.raises(RuntimeError, match="eta has dtype"):
        torch.ops.steinops_C.sge_small(torch.ones(1, 4, 2), one, one.double(), 0)
    with pytest.raises(RuntimeError, match="kernel id"):
        torch.ops.steinops_C.sge_small(torch.ones(1, 4, 2), one, one, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.ops.steinops_C.sge_small(torch.randn(1, 4, 2), one, one, 0)

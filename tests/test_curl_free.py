"""Curl-free matrix kernel (steinops.estimators._curl_free) and the curl-free kscore estimators:
blockwise products against autograd constructions of h^2 grad_z grad_y^T k, exact gradient fields
(symmetric Jacobians, potential whose gradient is the field), log-densities against exact ones,
accuracy against exact scores, dense == matrix-free, gradients, bad arguments."""
import pytest
import torch
from conftest import relative_fisher_error

import steinops
from steinops.distributions import FullCovGaussianMixture, two_mode_mixture
from steinops.estimators import _curl_free as cf, _kernel_system
from steinops.estimators.kef import KEFScoreEstimator, LandweberScoreEstimator, NuMethodScoreEstimator
from steinops.kernels import get_kernel

DT = torch.float64
CLASSES = [(KEFScoreEstimator, dict(lam=1e-2)), (LandweberScoreEstimator, dict(n_iter=40)),
           (NuMethodScoreEstimator, dict(n_iter=15))]


def _k(kernel, h):
    prof = get_kernel(kernel)
    return lambda z, y: prof.value(((z - y) ** 2).sum(-1), h)


def _autograd_gram(x, h, kernel):
    """(M d, M d) with blocks h^2 d^2 k / dz_a dy_b at (x^i, x^m), by nested autograd."""
    k = _k(kernel, h)
    M, d = x.shape
    G = torch.zeros(M * d, M * d, dtype=DT)
    for i in range(M):
        for m in range(M):
            J = torch.autograd.functional.jacobian(
                lambda z: torch.autograd.functional.jacobian(lambda y: k(z, y), x[m], create_graph=True), x[i])
            G[i * d:(i + 1) * d, m * d:(m + 1) * d] = h * h * J.T  # J[b, a] = d/dz_a (dk/dy_b)
    return G


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_gram_and_products_match_autograd(kernel):
    M, d = 6, 3
    x = torch.randn(M, d, dtype=DT)
    h = torch.tensor(1.7, dtype=DT)
    prof = get_kernel(kernel)
    G = _autograd_gram(x, h, kernel)
    torch.testing.assert_close(cf.curl_free_gram(x, h, kernel=prof), G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G.diagonal(), torch.ones(M * d, dtype=DT))  # normalised: K(x, x) = I
    c = torch.randn(M, d, dtype=DT)
    torch.testing.assert_close(cf.curl_free_matvec(x, c, h, kernel=prof), (G @ c.reshape(-1)).reshape(M, d))
    # S_i = h^2 sum_m grad_z Lap_y k(z, x^m) at z = x^i
    k = _k(kernel, h)

    def lap_sum(z):
        return sum(torch.autograd.functional.hessian(lambda y: k(z, y), x[m], create_graph=True).diagonal().sum()
                   for m in range(M))

    S = torch.stack([torch.autograd.functional.jacobian(lap_sum, x[i]) for i in range(M)]) * h * h
    torch.testing.assert_close(cf.curl_free_stein_term(x, h, kernel=prof), S, rtol=1e-9, atol=1e-10)
    bound = cf.curl_free_norm_bound(x, h, kernel=prof)
    lam_max = torch.linalg.eigvalsh(G).max()
    assert lam_max <= bound <= 4 * lam_max


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
@pytest.mark.parametrize("d", [2, 11])  # direct differences and the dot form of the distances
def test_potential_gradient_is_field_and_blocks_batch(kernel, d, monkeypatch):
    monkeypatch.setattr(cf, "BLOCK_ENTRIES", 64)  # many query blocks
    prof = get_kernel(kernel)
    x = torch.randn(2, 1, 13, d, dtype=DT)
    z = torch.randn(1, 3, 9, d, dtype=DT, requires_grad=True)
    h = torch.rand(2, 3, dtype=DT) + 0.5
    c = torch.randn(2, 3, 13, d, dtype=DT)
    w = torch.randn(2, 3, dtype=DT)
    field, pot = cf.curl_free_apply(z, x, h, kernel=prof, coef=c, weight=w, potential=True)
    assert field.shape == (2, 3, 9, d) and pot.shape == (2, 3, 9)
    torch.testing.assert_close(torch.autograd.grad(pot.sum(), z)[0].sum(0, keepdim=True), field.sum(0, keepdim=True))
    # one batch element against the dense Gram rows: field = w S_z + K_z c with z appended to the centres
    b0, b1 = 1, 2
    zs, xs = z[0, b1].detach(), x[b0, 0]
    both = torch.cat([zs, xs])
    G = cf.curl_free_gram(both, h[b0, b1], kernel=prof)
    Kz = G[:9 * d, 9 * d:]
    S_all = cf.curl_free_apply(zs, xs, h[b0, b1], kernel=prof, weight=torch.ones((), dtype=DT))[0]
    expect = w[b0, b1] * S_all + (Kz @ c[b0, b1].reshape(-1)).reshape(9, d)
    torch.testing.assert_close(field[b0, b1], expect)


def _jacobian(est, z):
    return torch.stack([torch.autograd.functional.jacobian(lambda p: est.predict(p[None])[0], zi) for zi in z])


@pytest.mark.parametrize("cls,kw", CLASSES)
@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_curl_free_estimate_has_symmetric_jacobian(cls, kw, kernel):
    x = torch.randn(40, 3, dtype=DT) * torch.tensor([1.0, 2.0, 0.5], dtype=DT)
    z = torch.randn(5, 3, dtype=DT)
    J = _jacobian(cls(kernel, curl_free=True, **kw).fit(x), z)
    torch.testing.assert_close(J, J.transpose(-1, -2), rtol=1e-9, atol=1e-11)
    # the diagonal kernel's estimate is not a gradient field: the same check fails there
    Jd = _jacobian(cls(kernel, **kw).fit(x), z)
    assert (Jd - Jd.transpose(-1, -2)).abs().max() > 1e-3 * Jd.abs().max()


@pytest.mark.parametrize("cls,kw", CLASSES)
def test_log_density_gradient_is_prediction(cls, kw):
    x = torch.randn(2, 30, 2, dtype=DT)
    est = cls(curl_free=True, **kw).fit(x)
    z = torch.randn(2, 7, 2, dtype=DT, requires_grad=True)
    f = est.log_density(z)
    assert f.shape == (2, 7)
    torch.testing.assert_close(torch.autograd.grad(f.sum(), z)[0], est.predict(z.detach()))
    torch.testing.assert_close(est.predict(x), est.scores_, rtol=1e-8, atol=1e-8)


def test_log_density_matches_exact_up_to_a_constant():
    # an anisotropic Gaussian: the fitted potential minus its mean against the exact log-density
    cov = torch.tensor([[[1.0, 0.5], [0.5, 0.6]]], dtype=DT)
    dist = FullCovGaussianMixture([1.0], torch.tensor([[1.0, -2.0]], dtype=DT), cov)
    x = dist.sample(800, 0.2)
    est = KEFScoreEstimator(curl_free=True, lam=1e-3).fit(x)
    q = dist.sample(400, 0.2)
    f, exact = est.log_density(q), dist.log_prob(q, 0.2)
    err = (f - f.mean()) - (exact - exact.mean())
    assert err.pow(2).mean().sqrt() < 0.25 * exact.std()  # measured 0.15 x std (0.17 nats)
    assert torch.corrcoef(torch.stack([f, exact]))[0, 1] > 0.98


@pytest.mark.parametrize("name,kw", [("kef", {}), ("landweber", {}), ("nu", {})])
def test_accuracy_against_exact_scores(name, kw):
    dist, sigma = two_mode_mixture(), 0.5
    x = dist.sample(1000, sigma)
    est = steinops.score_estimator(name, curl_free=True, **kw).fit(x)
    assert relative_fisher_error(est.scores_, dist.score(x, sigma)) < 0.05  # measured 0.025-0.041
    q = dist.sample(500, sigma)
    assert relative_fisher_error(est.predict(q), dist.score(q, sigma)) < 0.06


@pytest.mark.parametrize("cls,kw,tol", [(KEFScoreEstimator, dict(lam=1e-2), 1e-6),
                                        (LandweberScoreEstimator, dict(n_iter=30), 1e-10),
                                        (NuMethodScoreEstimator, dict(n_iter=12), 1e-10)])
def test_matrix_free_equals_dense(cls, kw, tol):
    x = torch.randn(2, 37, 3, dtype=DT)
    dense = cls("imq", curl_free=True, solver="dense", **kw).fit(x)
    free = cls("imq", curl_free=True, solver="matrix_free", **kw).fit(x)
    assert dense.solver_ == "dense" and free.solver_ == "matrix_free"
    torch.testing.assert_close(free.scores_, dense.scores_, rtol=tol, atol=tol * dense.scores_.abs().max())
    q = torch.randn(2, 5, 3, dtype=DT)
    torch.testing.assert_close(free.predict(q), dense.predict(q), rtol=tol, atol=tol * dense.scores_.abs().max())


@pytest.mark.parametrize("solver", ["dense", "matrix_free"])
def test_kef_gradients_in_x(solver, monkeypatch):
    # matrix-free: implicit-function gradient of the CG solve; dense: autograd through Cholesky.
    # Finite differences of a CG solution need a residual far below eps: solve to 1e-13.
    monkeypatch.setattr(_kernel_system, "default_rtol", lambda dtype: 1e-13)
    x = torch.randn(9, 2, dtype=DT, requires_grad=True)
    q = torch.randn(3, 2, dtype=DT)

    def f(x):
        est = KEFScoreEstimator(bandwidth=1.1, lam=3e-2, curl_free=True, solver=solver).fit(x)
        return est.scores_.pow(2).sum() + est.predict(q).sum()

    torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_float32_and_registry_defaults():
    x = torch.randn(3, 200, 2)
    for name in ("kef", "landweber", "nu"):
        est = steinops.score_estimator(name, curl_free=True).fit(x)
        assert est.scores_.dtype == torch.float32 and est.scores_.shape == x.shape
        assert torch.isfinite(est.scores_).all() and torch.isfinite(est.log_density(x[:, :5])).all()


def test_bad_arguments():
    with pytest.raises(TypeError, match="curl_free"):
        KEFScoreEstimator(curl_free="yes")
    est = KEFScoreEstimator().fit(torch.randn(20, 2))
    with pytest.raises(ValueError, match="curl_free=True"):
        est.log_density(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="fit"):
        KEFScoreEstimator(curl_free=True).log_density(torch.randn(3, 2))
    est = KEFScoreEstimator(curl_free=True).fit(torch.randn(20, 2))
    with pytest.raises(ValueError, match="features"):
        est.log_density(torch.randn(3, 4))
    with pytest.raises(ValueError, match="query"):
        est.log_density(torch.tensor([[float("nan"), 0.0]]))

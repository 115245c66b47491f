"""kscore estimators with a diagonal kernel: Tikhonov / KEF, Landweber, nu-method."""
import math

import pytest
import torch
from conftest import relative_fisher_error

import steinops
from steinops.distributions import two_mode_mixture
from steinops.estimators.kef import (KEFScoreEstimator, LandweberScoreEstimator, NuMethodScoreEstimator,
                                     nu_coefficients, spectral_bound)
from steinops.ops import gram

ITERATIVE = [LandweberScoreEstimator, NuMethodScoreEstimator]


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_kef_in_sample_equals_sge_with_eta_M_lam(kernel):
    x = torch.randn(2, 3, 50, 3, dtype=torch.float64)  # batch dims (2, 3)
    M, h, lam = x.shape[-2], 1.3, 2e-3
    kef = KEFScoreEstimator(kernel, bandwidth=h, lam=lam).fit(x)
    sge = steinops.SteinScoreEstimator(kernel, bandwidth=h, eta=M * lam, solver="cholesky").fit(x)
    assert kef.scores_.shape == x.shape
    torch.testing.assert_close(kef.scores_, sge.scores_, rtol=0, atol=1e-8)


@pytest.mark.parametrize("cls,kw", [(KEFScoreEstimator, dict(lam=1e-2)), (LandweberScoreEstimator, dict(n_iter=50)),
                                    (NuMethodScoreEstimator, dict(n_iter=20))])
@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_out_of_sample_at_samples_equals_in_sample(cls, kw, kernel):
    # the Nystrom / representer extension s(z) = a S_z / M + K_z c interpolates its own in-sample values
    x = torch.randn(3, 40, 2, dtype=torch.float64)
    est = cls(kernel, bandwidth="median", **kw).fit(x)
    torch.testing.assert_close(est.predict(x), est.scores_, rtol=1e-8, atol=1e-8)
    q = torch.randn(3, 7, 2, dtype=torch.float64)
    assert est.predict(q).shape == (3, 7, 2)


def test_kef_out_of_sample_closed_form():
    # s(z) = -(1/lam) [zeta(z) - K_z (K + M lam I)^{-1} zeta(X)], zeta(z) = (1/M) sum_m grad_{x^m} k(z, x^m)
    x, z = torch.randn(30, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    M, h, lam = 30, 0.9, 3e-3
    est = KEFScoreEstimator(bandwidth=h, lam=lam).fit(x)
    xc, zc = x - x.mean(0), z - x.mean(0)
    K, S = gram(xc, bandwidth=h, stein_term=True)
    Kz, Sz = gram(zc, xc, bandwidth=h, stein_term=True)
    expect = -(Sz / M - Kz @ torch.linalg.solve(K + M * lam * torch.eye(M, dtype=K.dtype), S / M)) / lam
    torch.testing.assert_close(est.predict(z), expect, rtol=1e-9, atol=1e-9)
    # zeta by autograd: grad_{x^m} of k(z, x^m) summed over m
    xr = xc.clone().requires_grad_(True)
    kz = torch.exp(-((zc[:, None, :] - xr[None]) ** 2).sum(-1) / (2 * h * h))
    zeta = torch.stack([torch.autograd.grad(kz[n].sum(), xr, retain_graph=True)[0].sum(0) for n in range(5)]) / M
    torch.testing.assert_close(zeta, Sz / M)


def _filter_reference(x, h, step, filt):
    """In-sample -g(K/M) S/M by eigendecomposition, g given as a function of the eigenvalues."""
    M = x.shape[-2]
    xc = x - x.mean(-2, keepdim=True)
    K, S = gram(xc, bandwidth=h, stein_term=True)
    ev, U = torch.linalg.eigh(K)
    g = filt(ev / M)
    return -(U * g[..., None, :]) @ (U.transpose(-1, -2) @ (S / M))


def test_landweber_filter_matches_spectral_formula():
    x = torch.randn(2, 40, 3, dtype=torch.float64)
    h, T = 1.1, 37
    est = LandweberScoreEstimator(bandwidth=h, n_iter=T).fit(x)
    step = est.step_[..., None]
    ref = _filter_reference(x, h, step, lambda s: step * ((1 - (1 - step * s) ** T) / (step * s)))
    torch.testing.assert_close(est.scores_, ref, rtol=1e-8, atol=1e-8)


def test_nu_filter_matches_scalar_recurrence():
    x = torch.randn(2, 40, 3, dtype=torch.float64)
    h, T, nu = 1.1, 15, 1.0
    est = NuMethodScoreEstimator(bandwidth=h, n_iter=T, nu=nu).fit(x)
    step = est.step_[..., None]

    def filt(s):  # the nu recurrence on g_k(s) (s_k = -g_k(L) zeta): g_k = g + mu (g - g_prev) + omega step (1 - s g)
        g_prev, g = torch.zeros_like(s), torch.zeros_like(s)
        for k in range(1, T + 1):
            mu, om = nu_coefficients(k, nu)
            g_prev, g = g, g + mu * (g - g_prev) + om * step * (1 - s * g)
        return g
    torch.testing.assert_close(est.scores_, _filter_reference(x, h, step, filt), rtol=1e-8, atol=1e-8)


def test_spectral_bound_is_tight_upper_bound():
    x = torch.randn(3, 200, 2, dtype=torch.float64)
    K = gram(x, bandwidth=0.5)
    lmax = torch.linalg.eigvalsh(K)[..., -1]
    b = spectral_bound(K)
    assert bool((b >= lmax * (1 - 1e-12)).all()) and bool((b <= lmax * 1.05).all())


def test_landweber_converges_to_tikhonov_limit():
    # well-conditioned K (cond ~ 6.5): Landweber tends to -(K/M)^{-1} S/M = KEF(lam -> 0) geometrically
    torch.manual_seed(0)
    x = torch.randn(40, 2, dtype=torch.float64) * 4
    h = 0.7
    limit = KEFScoreEstimator(bandwidth=h, lam=1e-13).fit(x).scores_

    def err(est):
        return float((est.scores_ - limit).norm() / limit.norm())
    errs = [err(LandweberScoreEstimator(bandwidth=h, n_iter=T).fit(x)) for T in (10, 30, 100, 300)]
    assert all(a > b for a, b in zip(errs[:-1], errs[1:]))
    assert errs[-1] < 1e-9  # measured 1.1e-11
    # the nu-method converges to the same limit (only polynomially fast on a well-conditioned K)
    assert err(NuMethodScoreEstimator(bandwidth=h, n_iter=50).fit(x)) < 3e-3  # measured 1.1e-3


def test_nu_method_needs_about_sqrt_as_many_iterations():
    # ill-conditioned K (cond ~ 2400): the regime regularisation is about
    torch.manual_seed(0)
    x = torch.randn(40, 2, dtype=torch.float64) * 2
    h = 1.0
    limit = KEFScoreEstimator(bandwidth=h, lam=1e-13).fit(x).scores_

    def err(est):
        return float((est.scores_ - limit).norm() / limit.norm())
    assert err(LandweberScoreEstimator(bandwidth=h, n_iter=300).fit(x)) > 0.3  # measured 0.55
    assert err(LandweberScoreEstimator(bandwidth=h, n_iter=10000).fit(x)) < 0.02  # measured 0.008
    assert err(NuMethodScoreEstimator(bandwidth=h, n_iter=300).fit(x)) < 0.02  # measured 0.0099
    # and with lam: Landweber(lam) takes ceil(1/lam) steps, the nu-method ceil(lam^-1/2)
    assert LandweberScoreEstimator(lam=1e-4).fit(x).n_iter_ == 10000
    assert NuMethodScoreEstimator(lam=1e-4).fit(x).n_iter_ == 100


# relative Fisher error at the samples, two_mode_mixture(2), sigma = 0.5, M = 1000, median bandwidth;
# measured over seeds 0, 1, 2, 1234 (in-sample / at 500 fresh queries): KEF(3e-4) 0.019-0.029 / 0.018-0.027,
# Landweber(3e-3) 0.017-0.020 / 0.016-0.022, nu(1e-3) 0.022-0.028 / 0.021-0.027 (SGE defaults 0.019-0.029)
@pytest.mark.parametrize("name,lam,threshold", [("kef", 3e-4, 0.06), ("landweber", 3e-3, 0.04), ("nu", 1e-3, 0.055)])
def test_accuracy_two_mode_mixture(name, lam, threshold):
    dist = two_mode_mixture(2)
    x = dist.sample(1000, 0.5)
    est = steinops.score_estimator(name, lam=lam).fit(x)
    assert relative_fisher_error(est.scores_, dist.score(x, 0.5)) < threshold
    z = dist.sample(500, 0.5)
    assert relative_fisher_error(est.predict(z), dist.score(z, 0.5)) < threshold


@pytest.mark.parametrize("name,cls", [("kef", KEFScoreEstimator), ("landweber", LandweberScoreEstimator),
                                      ("nu", NuMethodScoreEstimator)])
def test_registry_and_dtypes(name, cls):
    est = steinops.score_estimator(name, bandwidth="median")
    assert isinstance(est, cls)
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = torch.randn(2, 64, 3, dtype=dtype)
        est.fit(x)
        assert est.scores_.dtype == dtype and est.scores_.shape == x.shape
        assert torch.isfinite(est.scores_).all()
        assert est.predict(torch.randn(2, 5, 3, dtype=dtype)).shape == (2, 5, 3)


@pytest.mark.parametrize("cls,kw", [(KEFScoreEstimator, dict(lam=1e-2)),
                                    (LandweberScoreEstimator, dict(n_iter=6, step=0.5)),
                                    (NuMethodScoreEstimator, dict(n_iter=5, step=0.5))])
def test_differentiable(cls, kw):
    x = torch.randn(2, 8, 2, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: cls(bandwidth=0.8, **kw).fit(x).scores_, (x,))
    torch.autograd.gradcheck(lambda x, z: cls(bandwidth=0.8, **kw).fit(x).predict(z), (x, z))


@pytest.mark.parametrize("cls", [KEFScoreEstimator, *ITERATIVE])
@pytest.mark.parametrize("lam", [0, -1e-3, math.inf, math.nan, "1e-3", True])
def test_bad_lam(cls, lam):
    with pytest.raises(ValueError, match="lam"):
        cls(lam=lam)


@pytest.mark.parametrize("cls", ITERATIVE)
@pytest.mark.parametrize("n_iter", [0, -3, 2.5, "10", True])
def test_bad_n_iter(cls, n_iter):
    with pytest.raises(ValueError, match="n_iter"):
        cls(n_iter=n_iter)


def test_bad_step_and_nu():
    with pytest.raises(ValueError, match="step"):
        LandweberScoreEstimator(step=-1.0)
    with pytest.raises(ValueError, match="nu"):
        NuMethodScoreEstimator(nu=0)


@pytest.mark.parametrize("cls,kw", [(KEFScoreEstimator, dict(lam=1e-2)), (LandweberScoreEstimator, dict(n_iter=40)),
                                    (NuMethodScoreEstimator, dict(n_iter=15))])
def test_matrix_free_equals_dense(cls, kw):
    x = torch.randn(2, 60, 3, dtype=torch.float64)
    q = torch.randn(2, 9, 3, dtype=torch.float64)
    dense = cls(bandwidth="median", solver="dense", **kw).fit(x)
    free = cls(bandwidth="median", solver="matrix_free", **kw).fit(x)
    assert (dense.solver_, free.solver_) == ("dense", "matrix_free")
    torch.testing.assert_close(free.step_ if hasattr(free, "step_") else free.a_,
                               dense.step_ if hasattr(dense, "step_") else dense.a_)
    torch.testing.assert_close(free.scores_, dense.scores_, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(free.predict(q), dense.predict(q), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="solver"):
        cls(solver="qr", **kw)

"""The spectral Stein gradient estimator (SSGE): its closed forms against the definition (Nystrom
eigenfunctions, Stein-identity coefficients by autograd), against the SGE, and against EXACT scores."""
import math

import pytest
import torch

import steinops
from steinops.distributions import GaussianMixture, two_mode_mixture
from steinops.estimators import SpectralScoreEstimator
from steinops.kernels import get_kernel

from conftest import relative_fisher_error


def _kernel(kernel, a, b, h):
    """k(a_n, b_m) straight from the definition (autograd-friendly), shape (..., N, M)."""
    r2 = ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1)
    if kernel == "rbf":
        return torch.exp(-r2 / (2 * h**2))
    return (1 + r2 / h**2) ** -0.5  # imq


def test_imq_reference_matches_library_kernel():
    x = torch.randn(7, 3, dtype=torch.float64)
    for kernel in ("rbf", "imq"):
        K = steinops.gram(x, kernel=kernel, bandwidth=0.9)
        torch.testing.assert_close(K, _kernel(kernel, x, x, 0.9))
    assert get_kernel("imq").name == "imq"


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_matches_definition_with_autograd(kernel):
    """beta_j = -(1/M) sum_i grad psi_j(x^i) by autograd, g(z) = sum_j beta_j psi_j(z): checks the
    Stein-term identity and the sign convention of the closed forms."""
    M, d, h, J = 25, 2, 1.2, 6
    x = torch.randn(M, d, dtype=torch.float64)
    z = torch.randn(9, d, dtype=torch.float64) * 1.5
    K = _kernel(kernel, x, x, h)
    lam, U = torch.linalg.eigh(K)
    lam, U = lam.flip(-1)[:J], U.flip(-1)[:, :J]

    def psi(p):  # (n, J)
        return math.sqrt(M) * _kernel(kernel, p, x, h) @ U / lam

    xr = x.clone().requires_grad_(True)
    grads = torch.stack([torch.autograd.grad(psi(xr)[:, j].sum(), xr)[0] for j in range(J)])  # (J, M, d)
    beta = -grads.mean(1)  # (J, d)
    est = SpectralScoreEstimator(kernel, bandwidth=h, n_eigen=J).fit(x)
    torch.testing.assert_close(est.predict(z), psi(z) @ beta, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(est.scores_, psi(x) @ beta, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(est.beta_[:J], beta, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(est.eigenfunctions(z)[:, :J], psi(z), rtol=1e-9, atol=1e-10)


def test_all_eigenpairs_equals_sge_without_ridge():
    x = torch.randn(2, 12, 3, dtype=torch.float64)  # bandwidth 0.5: cond(K) ~ 10-30
    est = SpectralScoreEstimator(bandwidth=0.5, n_eigen=12).fit(x)
    assert (est.n_eigen_ == 12).all()
    sge = steinops.SteinScoreEstimator(bandwidth=0.5, eta=1e-10, solver="cholesky").fit(x)
    torch.testing.assert_close(est.scores_, sge.scores_, rtol=1e-7, atol=1e-8)
    # and the ridge-free SGE's in-sample rule -K^{-1} S
    K, S = steinops.gram(x, bandwidth=0.5, stein_term=True)
    torch.testing.assert_close(est.scores_, -torch.linalg.solve(K, S), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
@pytest.mark.parametrize("J", [1, 4, 15])
def test_in_sample_is_truncated_pseudo_inverse(kernel, J):
    x = torch.randn(3, 40, 2, dtype=torch.float64)
    h = torch.tensor([0.7, 1.0, 1.5], dtype=torch.float64)
    est = SpectralScoreEstimator(kernel, bandwidth=h, n_eigen=J).fit(x)
    K, S = steinops.gram(x - x.mean(-2, keepdim=True), kernel=kernel, bandwidth=h, stein_term=True)
    lam, U = torch.linalg.eigh(K)
    lam, U = lam[..., -J:], U[..., -J:]  # the J largest
    G = -(U / lam[..., None, :]) @ (U.transpose(-1, -2) @ S)  # -sum_j u_j u_j^T S / lambda_j
    torch.testing.assert_close(est.scores_, G, rtol=1e-8, atol=1e-9)
    assert (est.n_eigen_ == J).all()


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_out_of_sample_at_the_samples_equals_in_sample(kernel, dtype, tol):
    """Nystrom property: psi_j(x^i) = sqrt(M) u_ji, so predict(x) reproduces scores_."""
    x = torch.randn(2, 80, 3, dtype=dtype)
    est = SpectralScoreEstimator(kernel, eig_mass=0.99).fit(x)
    G = est.scores_
    assert G.dtype == dtype
    torch.testing.assert_close(est.predict(x), G, rtol=tol, atol=tol * G.abs().max().item())


# Thresholds are ~2x the errors measured with the defaults (eig_mass 0.99, 2 x median bandwidth).
def test_in_and_out_of_sample_two_mode_mixture_2d():
    dist = two_mode_mixture(2)
    x = dist.sample(1000, 0.5)
    q = dist.sample(300, 0.5)
    est = steinops.score_estimator("ssge").fit(x)
    assert relative_fisher_error(est.scores_, dist.score(x, 0.5)) < 0.04  # measured 0.0187-0.0190 (3 seeds; SGE 0.019-0.029)
    assert relative_fisher_error(est.predict(q), dist.score(q, 0.5)) < 0.045  # measured 0.0176-0.0207


def test_in_sample_gaussian_10d():
    d = 10
    dist = GaussianMixture([1.0], torch.zeros(1, d, dtype=torch.float64), [1.0])
    x = dist.sample(1000, 0.0)
    G = SpectralScoreEstimator().fit(x).scores_
    assert relative_fisher_error(G, dist.score(x)) < 0.03  # measured 0.011-0.0145 (3 seeds; SGE 0.019-0.021), J = 11


def test_batch_dims_equal_separate_calls_with_per_element_J():
    x = torch.stack([torch.randn(200, 2, dtype=torch.float64) * s for s in (0.3, 1.0, 3.0)]).reshape(3, 1, 200, 2)
    x = torch.cat([x, x.flip(0)], 1)  # (3, 2, 200, 2)
    est = SpectralScoreEstimator(bandwidth=1.0, eig_mass=0.99).fit(x)
    assert est.n_eigen_.shape == (3, 2) and len(set(est.n_eigen_.flatten().tolist())) == 3  # J differs
    q = torch.randn(17, 2, dtype=torch.float64)
    g = est.predict(q)
    assert g.shape == (3, 2, 17, 2)
    for i in range(3):
        for j in range(2):
            single = SpectralScoreEstimator(bandwidth=1.0, eig_mass=0.99).fit(x[i, j])
            assert single.n_eigen_ == est.n_eigen_[i, j]
            torch.testing.assert_close(est.scores_[i, j], single.scores_, rtol=1e-8, atol=1e-9)
            torch.testing.assert_close(g[i, j], single.predict(q), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("mass", [0.5, 0.9, 0.99, 0.999, 1.0])
def test_eig_mass_picks_smallest_J(mass):
    x = torch.randn(4, 60, 3, dtype=torch.float64)
    est = SpectralScoreEstimator(bandwidth=1.5, eig_mass=mass).fit(x)
    lam = est.eigenvalues_
    assert (lam[..., :-1] >= lam[..., 1:]).all()  # descending
    for b in range(4):
        pos = lam[b].clamp_min(0)
        eps_floor = 60 * torch.finfo(lam.dtype).eps * lam[b, 0]
        frac = torch.cumsum(pos, 0) / pos.sum()
        J = next(j + 1 for j in range(60) if frac[j] >= mass * (1 - 1e-15))
        J = min(J, int((lam[b] > eps_floor).sum()))
        assert int(est.n_eigen_[b]) == J
        mask = est.eigen_mask_[b]
        assert mask[:J].all() and not mask[J:].any()
        if J > 1:
            assert frac[J - 2] < mass  # J - 1 pairs are not enough


def test_n_eigen_drops_numerically_zero_eigenvalues():
    x = torch.randn(50, 1, dtype=torch.float64)
    est = SpectralScoreEstimator(bandwidth=20.0, n_eigen=50).fit(x)  # K nearly rank-deficient
    assert int(est.n_eigen_) < 50 and torch.isfinite(est.scores_).all()


@pytest.mark.parametrize("kwargs,name", [
    (dict(n_eigen=0), "n_eigen"), (dict(n_eigen=-3), "n_eigen"), (dict(n_eigen=2.5), "n_eigen"),
    (dict(n_eigen=True), "n_eigen"), (dict(eig_mass=0), "eig_mass"), (dict(eig_mass=1.5), "eig_mass"),
    (dict(eig_mass=float("nan")), "eig_mass"), (dict(eig_mass=-0.1), "eig_mass"),
    (dict(eig_mass="0.9"), "eig_mass"), (dict(n_eigen=3, eig_mass=0.9), "n_eigen"),
])
def test_bad_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SpectralScoreEstimator(**kwargs)


def test_n_eigen_larger_than_M_raises_at_fit():
    est = SpectralScoreEstimator(n_eigen=11)
    with pytest.raises(ValueError, match="n_eigen"):
        est.fit(torch.randn(10, 2))
    SpectralScoreEstimator(n_eigen=10).fit(torch.randn(10, 2))  # M itself is fine


def test_registry_and_defaults():
    est = steinops.score_estimator("ssge", kernel="imq", n_eigen=5)
    assert isinstance(est, SpectralScoreEstimator) and est.n_eigen == 5 and est.eig_mass is None
    est = SpectralScoreEstimator()
    assert est.eig_mass == "auto"  # 0.99 unless tuned with bandwidth="auto"
    est.fit(torch.randn(30, 2))
    assert torch.all(est.eig_mass_ == 0.99)
    assert "ssge" in steinops.estimators.ESTIMATORS
    with pytest.raises(RuntimeError):
        SpectralScoreEstimator().predict(torch.randn(3, 2))


def test_predict_chunks_queries(monkeypatch):
    from steinops.estimators import base
    x, q = torch.randn(40, 2, dtype=torch.float64), torch.randn(25, 2, dtype=torch.float64)
    est = SpectralScoreEstimator().fit(x)
    full = est.predict(q)
    monkeypatch.setattr(base, "QUERY_CHUNK_ENTRIES", 40 * 7)  # 7 queries per chunk
    torch.testing.assert_close(est.predict(q), full)


def test_translation_and_permutation_equivariance():
    x = torch.randn(150, 3, dtype=torch.float64)
    G = SpectralScoreEstimator(n_eigen=8).fit(x).scores_
    shift = torch.tensor([100.0, -50.0, 1e3], dtype=torch.float64)
    torch.testing.assert_close(SpectralScoreEstimator(n_eigen=8).fit(x + shift).scores_, G, rtol=1e-6, atol=1e-7)
    perm = torch.randperm(150)
    torch.testing.assert_close(SpectralScoreEstimator(n_eigen=8).fit(x[perm]).scores_, G[perm], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_gradcheck_with_respect_to_samples_and_queries(kernel):
    x = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

    def f(x, q):
        est = SpectralScoreEstimator(kernel, bandwidth=0.9, n_eigen=5).fit(x)
        return est.scores_, est.predict(q)

    assert torch.autograd.gradcheck(f, (x, q))


def test_no_grad_and_half_precision():
    x = torch.randn(100, 3, requires_grad=True)
    with torch.no_grad():
        G = SpectralScoreEstimator().fit(x).scores_
    assert G.grad_fn is None and not G.requires_grad
    est = SpectralScoreEstimator().fit(x.detach().bfloat16())
    assert est.scores_.dtype == torch.bfloat16 and torch.isfinite(est.scores_.float()).all()
    assert est.predict(torch.randn(5, 3).bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_gradient_with_repeated_eigenvalues(kernel):
    """A regular polygon has a circulant Gram matrix: its eigenvalues come in equal pairs, where autograd
    through eigh's eigenvectors divides by zero gaps. With every eigenpair kept the SSGE is -K^{-1} S, whose
    gradient through a linear solve is the reference."""
    M = 12
    t = 2 * math.pi * torch.arange(M, dtype=torch.float64) / M
    x = torch.stack([t.cos(), t.sin()], -1).requires_grad_()
    w = torch.randn(M, 2, dtype=torch.float64)
    lam = torch.linalg.eigvalsh(steinops.gram(x.detach(), kernel=kernel, bandwidth=0.7))
    assert (lam[1:] - lam[:-1]).abs().min() < 1e-12  # really repeated
    est = SpectralScoreEstimator(kernel, bandwidth=0.7, n_eigen=M).fit(x)
    assert int(est.n_eigen_) == M
    g = torch.autograd.grad((est.scores_ * w).sum(), x)[0]
    K, S = steinops.gram(x, kernel=kernel, bandwidth=0.7, stein_term=True)
    g_ref = torch.autograd.grad((-torch.linalg.solve(K, S) * w).sum(), x)[0]
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-7)

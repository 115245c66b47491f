"""The Stein gradient estimator against EXACT scores of Gaussian mixtures convolved with noise,
plus its structural properties (out-of-sample = appending the query, equivariances, batching,
gradients)."""
import pytest
import torch

import steinops
from steinops.distributions import GaussianMixture, two_mode_mixture

from conftest import relative_fisher_error


def _mixture(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, d, generator=g, dtype=torch.float64) * 2.0
    return GaussianMixture([0.5, 0.3, 0.2], means, [1.0, 0.7, 1.3])


# Thresholds are ~2x the errors measured with the defaults (the measured value is in the comment).
@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("kernel,threshold", [("rbf", 0.05), ("imq", 0.07)])  # measured 0.018-0.025 / 0.025-0.040
def test_in_sample_two_mode_mixture_2d(solver, kernel, threshold):
    dist = two_mode_mixture(2)
    x = dist.sample(1000, 0.5)
    G = steinops.stein_score(x, kernel=kernel, solver=solver)
    assert relative_fisher_error(G, dist.score(x, 0.5)) < threshold


# measured over 3 seeds: d=3 0.24-0.25, d=10 0.14-0.15, d=17 0.16-0.17
@pytest.mark.parametrize("d,sigma,threshold", [(3, 0.1, 0.35), (10, 1.0, 0.22), (17, 0.5, 0.25)])
def test_in_sample_mixtures_higher_d(d, sigma, threshold):
    dist = _mixture(d, seed=d)
    x = dist.sample(1500, sigma)
    G = steinops.stein_score(x)
    err = relative_fisher_error(G, dist.score(x, sigma))
    assert err < threshold, err


def test_float32_matches_float64_accuracy():
    dist = _mixture(5)
    x = dist.sample(800, 0.3)
    exact = dist.score(x, 0.3)
    e64 = relative_fisher_error(steinops.stein_score(x), exact)
    e32 = relative_fisher_error(steinops.stein_score(x.float()).double(), exact)
    assert abs(e32 - e64) < 0.01 * e64 + 1e-4


def test_out_of_sample_against_exact_scores():
    dist = two_mode_mixture(2)
    x = dist.sample(1500, 0.5)
    q = dist.sample(300, 0.5)
    g = steinops.stein_score(x, q)
    assert relative_fisher_error(g, dist.score(q, 0.5)) < 0.03  # measured 0.011-0.013


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_out_of_sample_equals_appending_the_query(kernel, solver):
    x = torch.randn(2, 57, 3, dtype=torch.float64)
    q = torch.randn(2, 6, 3, dtype=torch.float64) * 1.5
    h, eta = torch.tensor([1.3, 0.8], dtype=torch.float64), 0.2
    est = steinops.SteinScoreEstimator(kernel, bandwidth=h, eta=eta, solver=solver, cg_rtol=1e-12).fit(x)
    g = est.predict(q)
    for i in range(q.shape[1]):
        xa = torch.cat([x, q[:, i:i + 1]], 1)
        ga = steinops.stein_score(xa, kernel=kernel, bandwidth=h, eta=eta, solver="cholesky")[:, -1]
        torch.testing.assert_close(g[:, i], ga, rtol=1e-8, atol=1e-9)


def test_predict_chunks_queries(monkeypatch):
    from steinops.estimators import base
    x, q = torch.randn(40, 2, dtype=torch.float64), torch.randn(25, 2, dtype=torch.float64)
    full = steinops.stein_score(x, q)
    monkeypatch.setattr(base, "QUERY_CHUNK_ENTRIES", 40 * 7)  # 7 queries per chunk
    torch.testing.assert_close(steinops.stein_score(x, q), full)


def test_translation_and_permutation_equivariance():
    x = torch.randn(200, 4, dtype=torch.float64)
    G = steinops.stein_score(x)
    shift = torch.tensor([100.0, -50.0, 3.0, 1e3], dtype=torch.float64)
    torch.testing.assert_close(steinops.stein_score(x + shift), G, rtol=1e-7, atol=1e-8)
    perm = torch.randperm(200)
    torch.testing.assert_close(steinops.stein_score(x[perm]), G[perm], rtol=1e-9, atol=1e-10)


def test_batched_levels_equal_separate_calls():
    dist = two_mode_mixture(2)
    sigmas = [0.1, 0.5, 2.0]
    x = torch.stack([dist.sample(300, s) for s in sigmas])
    G = steinops.stein_score(x)
    for i in range(3):
        torch.testing.assert_close(G[i], steinops.stein_score(x[i]), rtol=1e-9, atol=1e-10)


def test_solvers_agree_and_auto_switches(monkeypatch):
    from steinops.estimators import base
    x = torch.randn(3, 150, 3, dtype=torch.float64)
    Gc = steinops.SteinScoreEstimator(solver="cholesky").fit(x).scores_
    monkeypatch.setattr(base, "DENSE_MAX_ENTRIES", 100)
    est = steinops.SteinScoreEstimator(solver="auto", cg_rtol=1e-11).fit(x)
    assert est.solver_ == "cg"
    torch.testing.assert_close(est.scores_, Gc, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_gradcheck_with_respect_to_samples_and_queries(solver, kernel):
    x = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

    def f(x, q):
        est = steinops.SteinScoreEstimator(kernel, bandwidth=1.1, eta=0.3, solver=solver, cg_rtol=1e-13).fit(x)
        return est.scores_, est.predict(q)

    assert torch.autograd.gradcheck(f, (x, q))


def test_no_grad_stores_nothing_and_half_precision():
    x = torch.randn(100, 3, requires_grad=True)
    with torch.no_grad():
        G = steinops.stein_score(x)
    assert G.grad_fn is None and not G.requires_grad
    Gb = steinops.stein_score(x.detach().bfloat16())
    assert Gb.dtype == torch.bfloat16 and torch.isfinite(Gb.float()).all()


def test_fit_once_predict_many_equals_function():
    x, q = torch.randn(120, 3), torch.randn(30, 3)
    est = steinops.SteinScoreEstimator().fit(x)
    torch.testing.assert_close(est.predict(q), steinops.stein_score(x, q))
    torch.testing.assert_close(est.predict(q[:5]), steinops.stein_score(x, q[:5]))
    assert est.bandwidth_.shape == () and est.eta_.shape == ()

"""Low-rank-plus-ridge preconditioners (``steinops.preconditioners``) and preconditioned CG: factors against the
dense Gram, Woodbury application against a dense inverse, PCG against dense Cholesky (float64), iteration
counts, residual history, gradients through the preconditioned solve, batch dims, bad arguments."""
import pytest
import torch

import steinops
from steinops.estimators import stein as stein_module
from steinops.estimators._kernel_system import kernel_solve
from steinops import preconditioners as pc
from steinops.preconditioners import LowRankPreconditioner, kernel_preconditioner, nystrom_factor, pivoted_cholesky
from steinops.solvers import conjugate_gradient


def _points(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _system(x, h, eta, kernel="rbf"):
    K = steinops.gram(x, kernel=kernel, bandwidth=h)
    eye = torch.eye(x.shape[-2], dtype=x.dtype)
    et = eta if isinstance(eta, torch.Tensor) else torch.tensor(eta, dtype=x.dtype)
    return K, K + et[..., None, None] * eye


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_pivoted_cholesky_full_rank_is_exact_and_partial_rank_is_consistent(kernel):
    x = _points(83, 3)
    K, _ = _system(x, 0.9, 1.0, kernel)
    L, trace = pivoted_cholesky(x, 0.9, rank=83, kernel=kernel, tol=0.0)
    assert L.shape == (83, 83) and L.dtype == torch.float64
    torch.testing.assert_close(L @ L.T, K, rtol=0, atol=1e-9)
    prev = float("inf")
    for r in (5, 17, 40):
        L, trace = pivoted_cholesky(x, 0.9, rank=r, kernel=kernel)
        R = K - L @ L.T
        assert L.shape == (83, r)
        torch.testing.assert_close(trace, R.diagonal().sum(), rtol=1e-8, atol=1e-10)  # the residual it reports
        assert torch.linalg.eigvalsh(R).min() > -1e-9  # K - L L^T stays positive semidefinite
        assert float(trace) < prev
        prev = float(trace)


def test_pivoted_cholesky_takes_one_kernel_column_per_step(monkeypatch):
    """Memory O(M r): every kernel evaluation is a column K(x, x_p), never M x M."""
    calls = []
    real = pc.gram

    def spy(x, y=None, **kw):
        calls.append(tuple(y.shape))
        return real(x, y, **kw)

    monkeypatch.setattr(pc, "gram", spy)
    x = _points(2, 61, 4)
    pivoted_cholesky(x, torch.tensor([1.0, 2.0], dtype=torch.float64), rank=9)
    assert len(calls) == 9 and all(s == (2, 1, 4) for s in calls)


def test_pivoted_cholesky_stops_early_when_exhausted():
    x = torch.cat([_points(3, 2)] * 10)  # 3 distinct points, 30 rows: rank 3
    L, trace = pivoted_cholesky(x, 1.0, rank=25)
    assert L.shape[-1] < 25 and float(trace) < 1e-10
    K, _ = _system(x, 1.0, 1.0)
    torch.testing.assert_close(L @ L.T, K, rtol=0, atol=1e-10)


def test_nystrom_factor_matches_its_formula():
    x = _points(70, 2)
    S = torch.randperm(70, generator=torch.Generator().manual_seed(3))[:12]
    L = nystrom_factor(x, 1.3, rank=12, generator=torch.Generator().manual_seed(3))
    KxS = steinops.gram(x, x[S], bandwidth=1.3)
    ref = KxS @ torch.linalg.solve(KxS[S], KxS.T)
    torch.testing.assert_close(L @ L.T, ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["pivchol", "nystrom"])
def test_apply_equals_dense_inverse_with_batch_dims(name):
    x = _points(2, 3, 47, 3, seed=1)
    h = torch.tensor([[0.7, 1.0, 1.6], [2.0, 0.9, 1.2]], dtype=torch.float64)
    eta = torch.tensor([[0.01, 0.1, 1.0], [0.3, 0.05, 2.0]], dtype=torch.float64)
    pre = kernel_preconditioner(name, x, h, eta, rank=11)
    V = _points(2, 3, 47, 5, seed=2)
    L = pre.factor
    P = L @ L.transpose(-1, -2) + eta[..., None, None] * torch.eye(47, dtype=torch.float64)
    torch.testing.assert_close(pre(V), torch.linalg.solve(P, V), rtol=1e-7, atol=1e-9)
    out32 = pre(V.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), pre(V), rtol=1e-5, atol=1e-6)
    assert pre.rank == 11 and pre.setup_seconds >= 0


def _solve(x, h, eta, B, precond, rtol, history=None):
    mv = lambda V: steinops.kernel_matvec(x, x, V, bandwidth=h) + eta * V  # noqa: E731
    return conjugate_gradient(mv, B, rtol=rtol, max_iter=2000, precond=precond, history=history)


@pytest.mark.parametrize("name,rank", [("pivchol", 100), ("nystrom", 250)])
def test_pcg_beats_cg_on_an_ill_conditioned_system(name, rank):
    x = _points(389, 3, seed=4) * torch.tensor([1.0, 0.3, 2.0], dtype=torch.float64)
    h, eta, rtol = 1.1, 1e-3, 1e-9
    _, A = _system(x, h, eta)
    B = _points(389, 4, seed=5)
    ref = torch.linalg.solve(A, B)
    X0, it0, rel0 = _solve(x, h, eta, B, None, rtol)
    hist = []
    X1, it1, rel1 = _solve(x, h, eta, B, kernel_preconditioner(name, x, h, eta, rank=rank), rtol, hist)
    assert rel0 <= rtol and rel1 <= rtol
    assert it1 < it0 / 5, (it0, it1)  # measured: 749 plain, 47 (pivchol 100), 13 (nystrom 250)
    for X in (X0, X1):
        torch.testing.assert_close(X, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # the history: 1 before the first iteration, one entry per iteration, ends below rtol; decreasing on the
    # whole (CG's residual norm need not fall at every step: the error's A-norm does)
    assert len(hist) == it1 + 1 and hist[0] == pytest.approx(1.0) and hist[-1] <= rtol
    n = len(hist)
    assert max(hist[n // 2:]) < min(hist[: n // 4 + 1]) and max(hist[3 * n // 4:]) < min(hist[: n // 2])


def test_cg_keeps_its_old_interface_and_freezes_converged_columns():
    x = _points(150, 2, seed=6)
    B = _points(150, 3, seed=7)
    B[:, 1] = 0.0  # a zero column converges at once and must stay exactly 0
    X, it, rel = _solve(x, 0.8, 0.1, B, None, 1e-10)
    assert isinstance(it, int) and isinstance(rel, float) and rel <= 1e-10
    assert (X[:, 1] == 0).all()
    # allreduce = identity takes the same steps
    mv = lambda V: steinops.kernel_matvec(x, x, V, bandwidth=0.8) + 0.1 * V  # noqa: E731
    X2, it2, _ = conjugate_gradient(mv, B, rtol=1e-10, max_iter=500, allreduce=lambda t: t)
    assert it2 == it and torch.equal(X2, X)


@pytest.mark.parametrize("name", ["pivchol", "nystrom"])
def test_estimator_with_preconditioner_equals_cholesky(name):
    x = _points(2, 211, 3, seed=8)
    q = _points(2, 7, 3, seed=9)
    h = torch.tensor([1.2, 0.8], dtype=torch.float64)
    eta = torch.tensor([0.02, 0.3], dtype=torch.float64)
    est = steinops.SteinScoreEstimator(bandwidth=h, eta=eta, solver="cg", preconditioner=name, precond_rank=50,
                                       cg_rtol=1e-12).fit(x)
    ref = steinops.SteinScoreEstimator(bandwidth=h, eta=eta, solver="cholesky").fit(x)
    torch.testing.assert_close(est.scores_, ref.scores_, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(est.predict(q), ref.predict(q), rtol=1e-8, atol=1e-9)
    assert est.preconditioner_ is not None and est.preconditioner_.rank == 50
    assert est.cg_iterations_ == len(est.cg_residuals_) - 1 and est.cg_residuals_[-1] <= 1e-12
    plain = steinops.SteinScoreEstimator(bandwidth=h, eta=eta, solver="cg", preconditioner=None, cg_rtol=1e-12).fit(x)
    assert plain.preconditioner_ is None and est.cg_iterations_ < plain.cg_iterations_
    assert ref.cg_iterations_ is None and ref.cg_residuals_ is None and ref.preconditioner_ is None


def test_auto_preconditioner_switches_on_with_many_samples(monkeypatch):
    x = _points(120, 2, seed=10)
    est = steinops.SteinScoreEstimator(solver="cg", cg_rtol=1e-12).fit(x)
    assert est.preconditioner == "auto" and est.preconditioner_ is None  # 120 < AUTO_PRECOND_MIN_POINTS
    monkeypatch.setattr(stein_module, "AUTO_PRECOND_MIN_POINTS", 100)
    est2 = steinops.SteinScoreEstimator(solver="cg", precond_rank=30, cg_rtol=1e-12).fit(x)
    assert isinstance(est2.preconditioner_, LowRankPreconditioner) and est2.preconditioner_.rank <= 30
    torch.testing.assert_close(est2.scores_, est.scores_, rtol=1e-8, atol=1e-9)


def test_gradcheck_through_the_preconditioned_solve():
    x = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

    def f(x, q):
        est = steinops.SteinScoreEstimator(bandwidth=1.1, eta=0.3, solver="cg", preconditioner="pivchol",
                                           precond_rank=4, cg_rtol=1e-13).fit(x)
        return est.scores_, est.predict(q)

    assert torch.autograd.gradcheck(f, (x, q))


def test_backward_solve_uses_the_preconditioner():
    x = _points(64, 3, seed=11).requires_grad_()
    h, eta = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    pre = kernel_preconditioner("pivchol", x.detach(), h, eta, rank=20)
    calls = []

    def counting(V):
        calls.append(V.shape)
        return pre(V)

    B = _points(64, 2, seed=12)
    X = kernel_solve(x, B, h, eta, kernel="rbf", rtol=1e-12, preconditioner=counting)
    n_forward = len(calls)
    X.pow(2).sum().backward()
    assert n_forward > 0 and len(calls) > n_forward
    # the gradient equals the one of the dense solve
    xd = x.detach().requires_grad_()
    _, A = _system(xd, h, eta)
    torch.linalg.solve(A, B).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-7, atol=1e-9)


def test_kernel_solve_builds_a_named_preconditioner_and_reports():
    x = _points(3, 90, 2, seed=13)
    h, eta = torch.full((3,), 0.9, dtype=torch.float64), torch.full((3,), 0.01, dtype=torch.float64)
    B = _points(3, 90, 2, seed=14)
    info = {}
    X = kernel_solve(x, B, h, eta, kernel="imq", rtol=1e-11, preconditioner="pivchol", precond_rank=25, info=info)
    _, A = _system(x, h, eta, "imq")
    torch.testing.assert_close(X, torch.linalg.solve(A, B), rtol=1e-7, atol=1e-8)
    assert info["iterations"] == len(info["residuals"]) - 1 and info["residuals"][-1] <= 1e-11


def test_float32_pcg_reaches_the_float32_tolerance():
    x = _points(3001, 5, seed=15, dtype=torch.float32)
    est = steinops.SteinScoreEstimator(solver="cg", preconditioner="pivchol", precond_rank=100).fit(x)
    plain = steinops.SteinScoreEstimator(solver="cg", preconditioner=None).fit(x)
    ref = steinops.SteinScoreEstimator(solver="cholesky").fit(x.double()).scores_
    assert est.cg_residuals_[-1] <= 1e-5 and est.cg_iterations_ <= 4 < plain.cg_iterations_  # measured 2 vs 13

    def err(G):
        return float((G.double() - ref).norm() / ref.norm())

    assert err(est.scores_) < 1e-3 and err(est.scores_) <= err(plain.scores_)  # measured 2.1e-4 vs 5.2e-4


@pytest.mark.parametrize("rank,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
                                      ("10", TypeError), (None, TypeError)])
def test_bad_rank(rank, exc):
    x = _points(20, 2)
    with pytest.raises(exc, match="rank"):
        kernel_preconditioner("pivchol", x, 1.0, 0.1, rank=rank)
    with pytest.raises(exc, match="rank"):
        pivoted_cholesky(x, 1.0, rank=rank)
    with pytest.raises(exc, match="precond_rank"):
        steinops.SteinScoreEstimator(solver="cg", precond_rank=rank)


def test_bad_arguments():
    x = _points(20, 2)
    for bad in ("ilu", "", 3):
        with pytest.raises(ValueError, match="preconditioner"):
            kernel_preconditioner(bad, x, 1.0, 0.1)
        with pytest.raises(ValueError, match="preconditioner"):
            steinops.SteinScoreEstimator(preconditioner=bad)
    with pytest.raises(ValueError, match="preconditioner"):
        kernel_preconditioner(None, x, 1.0, 0.1)
    with pytest.raises(ValueError, match="eta"):
        kernel_preconditioner("pivchol", x, 1.0, -0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        kernel_preconditioner("pivchol", x, 0.0, 0.1)
    with pytest.raises(TypeError, match="x"):
        kernel_preconditioner("pivchol", x.long(), 1.0, 0.1)
    with pytest.raises(ValueError, match="eta"):
        kernel_preconditioner("nystrom", _points(2, 20, 2), 1.0, torch.ones(3, dtype=torch.float64))

"""``spd_solve``: the SPD solve whose backward reuses the forward's Cholesky factor (O(M^2 E), no
O(M^3) work), and the dense SGE fit / predict that use it. Gradients are checked by gradcheck in float64
and against torch's autograd through the Cholesky (``cholesky_solve_jitter``, the previous path)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import steinops
from steinops.estimators import stein
from steinops.solvers import cholesky_solve_jitter, spd_solve, spd_solve_with_factor

F64 = torch.float64


def _spd_from(C):
    """A symmetric positive definite matrix built from an unconstrained C: the symmetric parametrisation."""
    return C @ C.transpose(-1, -2) / C.shape[-1] + torch.eye(C.shape[-1], dtype=C.dtype)


def _randn(*shape, seed=0, dtype=F64, requires_grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(requires_grad)


@pytest.mark.parametrize("batch, M, E", [((), 7, 1), ((2,), 13, 3), ((2, 3), 7, 3), ((3,), 13, 1)])
def test_gradcheck_spd_solve(batch, M, E):
    C = _randn(*batch, M, M, seed=M, requires_grad=True)
    B = _randn(*batch, M, E, seed=E, requires_grad=True)
    assert torch.autograd.gradcheck(lambda C, B: spd_solve(_spd_from(C), B)[1], (C, B))


def test_gradcheck_spd_solve_broadcast_batch():
    C = _randn(2, 1, 7, 7, seed=1, requires_grad=True)  # A broadcasts over the 3, B over the 2
    B = _randn(3, 7, 2, seed=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda C, B: spd_solve(_spd_from(C), B)[1], (C, B))


@pytest.mark.parametrize("batch, M, E", [((), 13, 3), ((2,), 7, 1)])
def test_gradcheck_solve_with_factor(batch, M, E):
    C = _randn(*batch, M, M, seed=M, requires_grad=True)
    B = _randn(*batch, M, E, seed=E, requires_grad=True)

    def f(C, B):
        A = _spd_from(C)
        return spd_solve_with_factor(A, torch.linalg.cholesky(A.detach()), B)  # A only carries the gradient

    assert torch.autograd.gradcheck(f, (C, B))


@pytest.mark.parametrize("M", [7, 13, 300])  # 300: past the compiled small path, LAPACK in the forward
def test_matches_autograd_through_the_cholesky(M):
    A0 = _spd_from(_randn(2, M, M, seed=M))
    B0, gX = _randn(2, M, 3, seed=1), _randn(2, M, 3, seed=2)

    def grads(solve):
        A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
        L, X = solve(A, B)
        return (X, L) + torch.autograd.grad((X * gX).sum(), (A, B))

    X, L, dA, dB = grads(spd_solve)
    Xr, Lr, dAr, dBr = grads(cholesky_solve_jitter)
    assert not L.requires_grad and L.grad_fn is None
    torch.testing.assert_close(L, Lr.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(X, Xr.detach(), rtol=0, atol=1e-12)
    for a, b in [(dA, dAr), (dB, dBr)]:
        assert (a - b).abs().max() <= 1e-9 * b.abs().max()
    torch.testing.assert_close(dA, dA.transpose(-1, -2), rtol=0, atol=1e-14)  # symmetric


def test_jitter_gives_the_gradient_of_the_jittered_system():
    x = _randn(6, 2, seed=3)
    A = (x @ x.T).requires_grad_()  # rank 2 of 6: needs jitter
    B = _randn(6, 2, seed=4, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="jitter"):
        L, X = spd_solve(A, B)
    gX = _randn(6, 2, seed=5)
    dA, dB = torch.autograd.grad((X * gX).sum(), (A, B))
    assert torch.isfinite(dA).all() and torch.isfinite(dB).all()
    lam = torch.cholesky_solve(gX, L)  # (L L^T)^{-1} gX: L factors the jittered A + jitter I
    torch.testing.assert_close(dB, lam, rtol=1e-12, atol=0)
    torch.testing.assert_close(dA, -(lam @ X.detach().T + X.detach() @ lam.T) / 2, rtol=1e-12, atol=0)


def test_no_grad_callers_get_cholesky_solve_jitter():
    A, B = _spd_from(_randn(3, 9, 9, seed=6)), _randn(3, 9, 2, seed=7)
    L, X = spd_solve(A, B)
    Lr, Xr = cholesky_solve_jitter(A, B)
    assert torch.equal(L, Lr) and torch.equal(X, Xr)
    with torch.no_grad():
        L, X = spd_solve(A.requires_grad_(), B)
    assert torch.equal(X, Xr) and X.grad_fn is None


def test_double_backward_raises_instead_of_missing_terms():
    C, B = _randn(5, 5, seed=8, requires_grad=True), _randn(5, 2, seed=9, requires_grad=True)
    (gB,) = torch.autograd.grad(spd_solve(_spd_from(C), B)[1].pow(2).sum(), B, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        gB.sum().backward()


# ---- the dense SGE fit and predict ----------------------------------------------------------------

BACKENDS = ["reference", None]  # None: the default (the compiled CPU backend where built)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_stein_score_median_bandwidth(backend):
    # the "median" rule's bandwidth carries no gradient (a constant of x, before this change too), while
    # gradcheck's finite differences would see it move: fix it at the value the rule gives for x
    x = _randn(9, 2, seed=10, requires_grad=True)
    h = float(steinops.bandwidth.select_bandwidth(x.detach(), "median"))
    assert torch.autograd.gradcheck(lambda x: steinops.stein_score(x, solver="cholesky", bandwidth=h,
                                                                    backend=backend), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_gradcheck_fit_and_predict(backend, kernel):
    x = _randn(2, 8, 2, seed=11, requires_grad=True)
    q = _randn(2, 3, 2, seed=12, requires_grad=True)
    h = torch.tensor([1.2, 0.8], dtype=F64, requires_grad=True)
    eta = torch.tensor([0.3, 0.1], dtype=F64, requires_grad=True)

    def f(x, q, h, eta):
        est = steinops.SteinScoreEstimator(kernel, bandwidth=h, eta=eta, solver="cholesky", backend=backend).fit(x)
        return est.scores_, est.predict(q)

    assert torch.autograd.gradcheck(f, (x, q, h, eta))


def _old_path(monkeypatch):
    """The previous dense path: autograd through torch's Cholesky, predict through the differentiable L."""
    monkeypatch.setattr(stein, "spd_solve", cholesky_solve_jitter)
    monkeypatch.setattr(stein, "spd_solve_with_factor", lambda A, L, B: torch.cholesky_solve(B, L))


@pytest.mark.parametrize("backend", BACKENDS)
def test_estimator_gradients_match_the_previous_path(backend, monkeypatch):
    x, q = _randn(2, 40, 3, seed=13), _randn(2, 6, 3, seed=14)
    h0, eta0 = torch.tensor([1.1, 0.9], dtype=F64), torch.tensor([0.3, 0.05], dtype=F64)
    gG, gP = _randn(2, 40, 3, seed=15), _randn(2, 6, 3, seed=16)

    def grads():
        ins = [t.clone().requires_grad_() for t in (x, q, h0, eta0)]
        est = steinops.SteinScoreEstimator(bandwidth=ins[2], eta=ins[3], solver="cholesky", backend=backend).fit(ins[0])
        G, P = est.scores_, est.predict(ins[1])
        return [G.detach(), P.detach()] + list(torch.autograd.grad((G * gG).sum() + (P * gP).sum(), ins))

    new = grads()
    _old_path(monkeypatch)
    old = grads()
    for a, b in zip(new, old):
        assert (a - b).abs().max() <= 1e-9 * b.abs().max()


class _AtenRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


CUBIC_OPS = {"linalg_cholesky_ex", "cholesky", "linalg_cholesky", "cholesky_inverse", "linalg_solve_triangular",
             "triangular_solve", "linalg_inv_ex", "linalg_solve_ex", "linalg_lu_factor_ex"}


def _backward_calls(monkeypatch, M, predict):
    x = _randn(M, 3, seed=17, requires_grad=True)
    est = steinops.SteinScoreEstimator(bandwidth=1.0, eta=0.3, solver="cholesky").fit(x)
    out = est.predict(_randn(5, 3, seed=18)) if predict else est.scores_
    counts = {"n": 0}
    for name in ("cholesky", "cholesky_ex"):
        orig = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *a, _f=orig, **k: (counts.__setitem__("n", counts["n"] + 1),
                                                                            _f(*a, **k))[1])
    rec = _AtenRecorder()
    with rec:
        out.sum().backward()
    monkeypatch.undo()
    return counts["n"], rec.calls


@pytest.mark.parametrize("predict", [False, True])
def test_backward_has_no_cubic_work(monkeypatch, predict):
    M = 40
    n_chol, calls = _backward_calls(monkeypatch, M, predict)
    assert n_chol == 0
    assert not [c for c in calls if c[0] in CUBIC_OPS]
    solves = [shapes for name, shapes in calls if name == "cholesky_solve"]
    assert solves and all(rhs[-1] < M for rhs, _ in solves)  # right-hand sides of d or query columns, never M
    # the recorder sees the previous path's O(M^3) triangular solves
    _old_path(monkeypatch)
    _, calls = _backward_calls(monkeypatch, M, predict)
    assert [s for name, s in calls if name == "linalg_solve_triangular" and s[1] == (M, M)]


def test_no_grad_fit_unchanged_and_refit_drops_the_handle(monkeypatch):
    x = _randn(2, 50, 3, seed=19, dtype=torch.float32, requires_grad=True)
    est = steinops.SteinScoreEstimator(bandwidth=1.0, solver="cholesky")
    est.fit(x)
    assert est._A is not None and not est._L.requires_grad
    G_grad = est.scores_.detach()
    with torch.no_grad():
        est.fit(x)
    assert est._A is None and est.scores_.grad_fn is None
    assert (est.scores_ - G_grad).abs().max() <= 1e-4 * G_grad.abs().max()  # fused no-grad op vs gram + solve
    G_nograd, P_nograd = est.scores_, est.predict(x[0, :4].detach())
    _old_path(monkeypatch)
    with torch.no_grad():
        est.fit(x)
    assert torch.equal(est.scores_, G_nograd) and torch.equal(est.predict(x[0, :4].detach()), P_nograd)


def test_float32_large_set_matches_the_previous_path(monkeypatch):
    x = _randn(300, 3, seed=20, dtype=torch.float32)  # > SMALL_CHOLESKY_MAX: LAPACK in the forward
    g = _randn(300, 3, seed=21, dtype=torch.float32)

    def grad():
        xr = x.clone().requires_grad_()
        G = steinops.stein_score(xr, solver="cholesky", bandwidth=1.5, eta=0.3)
        return torch.autograd.grad((G * g).sum(), xr)[0]

    new = grad()
    _old_path(monkeypatch)
    old = grad()
    assert (new - old).abs().max() <= 1e-4 * old.abs().max()

"""The compiled batched Cholesky (steinops_C::cholesky) used by cholesky_jitter for small CPU systems."""
import warnings

import pytest
import torch

from steinops.ops.backends import compiled_extension
from steinops.solvers import SMALL_CHOLESKY_MAX, _cholesky_ex, cholesky_jitter, cholesky_solve_jitter

pytestmark = pytest.mark.skipif(compiled_extension() is None, reason="steinops._C not built")


def spd(batch, n, dtype, seed, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return ((Q * ev) @ Q.transpose(-1, -2)).to(dtype)


@pytest.mark.parametrize("batch, n", [((), 2), ((3,), 17), ((2, 3), 63), ((4,), 128), ((1,), 131), ((2,), 256)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 3e-5)])
def test_matches_lapack(batch, n, dtype, tol):
    A = spd(batch, n, dtype, seed=n)
    L, _, info = torch.ops.steinops_C.cholesky(A.reshape(-1, n, n))
    L = L.reshape(A.shape)
    ref = torch.linalg.cholesky(A.double())
    assert (info == 0).all()
    assert torch.equal(L.triu(1), torch.zeros_like(L))  # strict upper triangle written as zeros
    assert (L.double() - ref).abs().max() <= tol * ref.abs().max()
    L2, info2 = _cholesky_ex(A)  # the dispatching wrapper takes the compiled path here
    assert torch.equal(L2, L) and info2.shape == batch


@pytest.mark.parametrize("batch, n, E", [((3,), 17, 1), ((2, 2), 64, 5), ((1,), 200, 3)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-3)])
def test_fused_solve_matches_the_exact_solution(batch, n, E, dtype, tol):
    A = spd(batch, n, dtype, seed=n + E, cond=100.0)
    B = torch.randn(*batch, n, E, dtype=torch.float64, generator=torch.Generator().manual_seed(E)).to(dtype)
    ref = torch.linalg.solve(A.double(), B.double())
    L, X = cholesky_solve_jitter(A, B)
    assert X.dtype == dtype and X.shape == B.shape
    assert (X.double() - ref).abs().max() <= tol * ref.abs().max()
    assert torch.equal(L, _cholesky_ex(A)[0])
    _, X2, _ = torch.ops.steinops_C.cholesky(A.reshape(-1, n, n), B.reshape(-1, n, E))
    assert torch.equal(X2.reshape(B.shape), X)
    # with a gradient the LAPACK path runs and agrees
    Ag = A.double().clone().requires_grad_()
    _, Xg = cholesky_solve_jitter(Ag, B.double())
    assert torch.allclose(Xg.detach(), ref, rtol=1e-8, atol=1e-10)


def test_info_reports_the_first_failing_minor_like_lapack():
    A = spd((4,), 9, torch.float64, seed=1)
    A[1, 4, 4] = -50.0  # leading minor of order 5 indefinite
    A[2, 0, 0] = float("nan")
    A[3] = -A[3]
    _, _, info = torch.ops.steinops_C.cholesky(A)
    _, ref = torch.linalg.cholesky_ex(A)
    assert info.tolist()[0] == 0 and info.tolist()[1] == ref.tolist()[1] == 5 and info.tolist()[3] == 1
    assert info.tolist()[2] > 0  # NaN never passes as positive definite


def test_cholesky_jitter_uses_it_and_still_escalates():
    x = torch.randn(5, 3, dtype=torch.float64)
    A = (x @ x.T).unsqueeze(0).repeat(2, 1, 1)  # rank 3 of 5: singular
    with pytest.warns(RuntimeWarning, match="jitter"):
        L = cholesky_jitter(A)
    assert torch.isfinite(L).all()
    assert torch.allclose(L @ L.transpose(-1, -2), A, atol=1e-10)


def test_gradients_take_the_differentiable_path():
    A = spd((2,), 6, torch.float64, seed=3).requires_grad_()
    torch.autograd.gradcheck(lambda a: cholesky_jitter(0.5 * (a + a.transpose(-1, -2))), (A,))
    big = spd((1,), SMALL_CHOLESKY_MAX + 1, torch.float64, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(_cholesky_ex(big)[0], torch.linalg.cholesky(big))


def test_bad_input_is_rejected():
    with pytest.raises(RuntimeError, match="must be \\(B, n, n\\)"):
        torch.ops.steinops_C.cholesky(torch.eye(3))
    with pytest.raises(RuntimeError, match="B must be"):
        torch.ops.steinops_C.cholesky(torch.eye(3)[None], torch.ones(1, 4, 1))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.steinops_C.cholesky(torch.eye(3, dtype=torch.float16)[None])

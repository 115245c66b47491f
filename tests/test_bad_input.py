"""Bad input gives a ValueError / TypeError naming the argument, or a documented recovery with a
warning: never a crash, a hang or a silent NaN."""
import warnings

import pytest
import torch

import steinops


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: steinops.kernel_matvec(_x(3), _x(4, 3), _x(4, 1), bandwidth=1.0), ValueError, "x must have shape"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 2), _x(4, 1), bandwidth=1.0), ValueError, "same number of features"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), _x(6, 1), bandwidth=1.0), ValueError, "v must have one row"),
    (lambda: steinops.kernel_matvec(_x(2, 5, 3), _x(3, 4, 3), _x(4, 1), bandwidth=1.0), ValueError, "broadcast"),
    (lambda: steinops.kernel_matvec(torch.ones(5, 3, dtype=torch.int64), _x(4, 3), _x(4, 1), bandwidth=1.0), TypeError, "x must have a floating"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3, dtype=torch.float64), _x(4, 1), bandwidth=1.0), TypeError, "dtype"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), _x(4, 1), bandwidth=0.0), ValueError, "bandwidth"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), _x(4, 1), bandwidth=-1.0), ValueError, "bandwidth"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), _x(4, 1), bandwidth=float("nan")), ValueError, "bandwidth"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), _x(4, 1), bandwidth=torch.tensor([1.0, -1.0])), ValueError, "bandwidth"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), _x(4, 1), bandwidth="median"), ValueError, "numeric bandwidth"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), _x(4, 1), bandwidth=1.0, kernel="laplace"), ValueError, "kernel"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), _x(4, 1), bandwidth=1.0, backend="nope"), ValueError, "backend"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), _x(4, 1), bandwidth=1.0, backend="cuda"), ValueError, "not available"),
    (lambda: steinops.kernel_matvec(torch.full((5, 3), float("nan")), _x(4, 3), _x(4, 1), bandwidth=1.0), ValueError, "x contains NaN"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), torch.full((4, 1), float("inf")), bandwidth=1.0), ValueError, "v contains NaN"),
    (lambda: steinops.kernel_matvec(_x(5, 3), _x(4, 3), _x(4, 1), bandwidth=1.0, kernel=3), TypeError, "kernel"),
    (lambda: steinops.gram(_x(5, 3), bandwidth=1.0, stein_term=1), TypeError, "stein_term"),
    (lambda: steinops.gram(_x(5, 0), bandwidth=1.0), ValueError, "no features"),
    (lambda: steinops.stein_score(_x(1, 3)), ValueError, "x needs at least 2"),
    (lambda: steinops.stein_score(_x(10, 3), eta=0.0), ValueError, "eta"),
    (lambda: steinops.stein_score(_x(10, 3), eta=-1), ValueError, "eta"),
    (lambda: steinops.stein_score(_x(10, 3), eta="big"), ValueError, "eta"),
    (lambda: steinops.stein_score(_x(10, 3), bandwidth="silverman"), ValueError, "bandwidth"),
    (lambda: steinops.stein_score(_x(10, 3), bandwidth=0), ValueError, "bandwidth"),
    (lambda: steinops.stein_score(_x(10, 3), solver="lu"), ValueError, "solver"),
    (lambda: steinops.stein_score(_x(10, 3), kernel="imq3"), ValueError, "kernel"),
    (lambda: steinops.stein_score(_x(10, 3), _x(4, 2)), ValueError, "query has 2 features"),
    (lambda: steinops.stein_score(_x(10, 3), torch.full((4, 3), float("nan"))), ValueError, "query contains NaN"),
    (lambda: steinops.stein_score(torch.zeros(10, 3)), ValueError, "all samples"),
    (lambda: steinops.stein_score([[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_raises_naming_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a cross-device check")
def test_different_devices():
    with pytest.raises(ValueError, match="one device"):
        steinops.kernel_matvec(_x(5, 3), _x(4, 3).cuda(), _x(4, 1), bandwidth=1.0)


def test_different_devices_meta():
    # meta tensors stand in for a second device on a CPU-only machine
    with pytest.raises(ValueError, match="one device"):
        steinops.kernel_matvec(_x(5, 3), torch.empty(4, 3, device="meta"), _x(4, 1), bandwidth=1.0)


def test_duplicate_points_recover_with_warning():
    # 3 distinct points repeated: K is singular; with a tiny eta Cholesky needs jitter (documented recovery)
    base = torch.randn(3, 2, dtype=torch.float64)
    x = base.repeat(20, 1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        G = steinops.stein_score(x, eta=1e-300, bandwidth=1.0)
    assert torch.isfinite(G).all()
    assert any("jitter" in str(w.message) or "coincide" in str(w.message) for w in rec)


def test_mostly_duplicate_points_bandwidth_falls_back_with_warning():
    x = torch.cat([torch.zeros(30, 2), torch.randn(5, 2)])
    with pytest.warns(RuntimeWarning, match="coincide"):
        G = steinops.stein_score(x)
    assert torch.isfinite(G).all()


def test_cg_iteration_cap_warns():
    x = torch.randn(300, 2, dtype=torch.float64)
    est = steinops.SteinScoreEstimator(solver="cg", eta=1e-4, cg_max_iter=3)
    with pytest.warns(RuntimeWarning, match="relative residual"):
        est.fit(x)
    assert torch.isfinite(est.scores_).all()


def test_predict_before_fit():
    with pytest.raises(RuntimeError, match="fit"):
        steinops.SteinScoreEstimator().predict(torch.randn(3, 2))

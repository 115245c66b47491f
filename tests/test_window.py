"""steinops.estimators.window.window_score: the Gaussian-window Stein ratio, against exact scores of the
smoothed density, a float64 loop reference, leave-one-out, gradcheck, stability and bad input."""
import math

import pytest
import torch

import steinops.estimators.window as window
from steinops._checks import value_checks_suspended
from steinops.distributions import get_distribution
from steinops.estimators.window import window_score
from steinops.ops.backends import compiled_extension

DT = torch.float64


def reference(x, y, h, exclude=None):
    """Loop over queries, explicit weights exp(-|y - x_j|^2 / (2 h^2)) / sum (float64)."""
    out, neff = torch.empty_like(y), torch.empty(y.shape[0], dtype=y.dtype)
    for n in range(y.shape[0]):
        keep = [j for j in range(x.shape[0]) if exclude is None or j != int(exclude[n])]
        xs = x[keep]
        logw = -((xs - y[n]) ** 2).sum(-1) / (2 * h * h)
        w = torch.exp(logw - logw.max())
        w = w / w.sum()
        out[n] = (w[:, None] * (xs - y[n])).sum(0) / (h * h)
        neff[n] = 1 / (w ** 2).sum()
    return out, neff


def relative_fisher(g, exact):
    return float((g - exact).square().sum(-1).mean() / exact.square().sum(-1).mean())


def test_gaussian_gives_the_exact_score_of_the_smoothed_gaussian(path):
    """q = N(mu, Sigma) anisotropic: the window estimate targets grad log N(mu, Sigma + h^2 I), not grad log q."""
    gen = torch.Generator().manual_seed(0)
    d, M, h = 3, 6000, 0.9
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))[0]
    Sigma = Q @ torch.diag(torch.tensor([0.3, 1.0, 2.5], dtype=DT)) @ Q.T
    chol = torch.linalg.cholesky(Sigma)
    x = mu + torch.randn(M, d, generator=gen, dtype=DT) @ chol.T
    smoothed_cov = Sigma + h * h * torch.eye(d, dtype=DT)
    y = mu + torch.randn(400, d, generator=gen, dtype=DT) @ torch.linalg.cholesky(smoothed_cov).T
    g = window_score(x, y, h)
    smoothed = -torch.linalg.solve(Sigma + h * h * torch.eye(d, dtype=DT), (y - mu).T).T
    unsmoothed = -torch.linalg.solve(Sigma, (y - mu).T).T
    assert relative_fisher(g, smoothed) < 0.01
    assert relative_fisher(g, unsmoothed) > 0.1  # it is the smoothed score, measurably


def test_mixture_level_shift_is_nearly_unbiased(path):
    """Samples of q_sigma with h = sqrt(sigma_c^2 - sigma^2) estimate grad log q_{sigma_c} at y ~ q_{sigma_c}
    (exact scores of the two-mode mixture); averaged over replicate sets the ratio bias is small."""
    gen = torch.Generator().manual_seed(1)
    dist = get_distribution("two_mode")
    sigma, sigma_c, m, R = 1.1, 2.0, 128, 64
    h = math.sqrt(sigma_c ** 2 - sigma ** 2)
    y = dist.sample(64, sigma_c, generator=gen)
    x = dist.sample(R * m, sigma, generator=gen).reshape(R, m, 2)
    g = window_score(x, y.expand(R, 64, 2).contiguous(), h)  # (R, 64, 2)
    exact = dist.score(y, sigma_c)
    assert relative_fisher(g.mean(0), exact) < 0.01  # bias
    assert relative_fisher(g[0], exact) < 0.5  # one set of 128
    assert relative_fisher(g.mean(0), dist.score(y, sigma)) > 0.1  # not the finer level's score


@pytest.fixture(params=["torch", "compiled"])
def path(request, monkeypatch):
    """Both implementations: the dense torch path and the compiled CPU op (skipped when it is not built)."""
    if request.param == "torch":
        monkeypatch.setattr(window, "_compiled", lambda *a: False)
    elif compiled_extension() is None:
        pytest.skip("steinops._C is not built")
    else:
        calls = []
        monkeypatch.setattr(window, "_compiled", lambda *a: calls.append(1) or True)
        yield request.param
        assert calls, "the compiled path was not taken"
        return
    yield request.param


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_matches_loop_reference_with_batches_and_exclusion(dtype, tol, path):
    gen = torch.Generator().manual_seed(2)
    B, M, N, d = 3, 37, 29, 5
    x = torch.randn(B, M, d, generator=gen, dtype=DT) * 2 + 7  # off-centre: the centring matters in float32
    y = torch.randn(B, N, d, generator=gen, dtype=DT) * 2 + 7
    h = torch.tensor([0.7, 1.3, 2.9], dtype=DT)
    exclude = torch.randint(0, M, (N,), generator=gen)
    for ex in (None, exclude):
        got, neff = window_score(x.to(dtype), y.to(dtype), h.to(dtype), exclude=ex, return_neff=True)
        assert got.dtype == dtype and got.shape == (B, N, d) and neff.shape == (B, N)
        for b in range(B):
            ref, ref_neff = reference(x[b], y[b], float(h[b]), ex)
            scale = ref.abs().max()
            assert torch.allclose(got[b].double(), ref, atol=tol * scale, rtol=tol)
            assert torch.allclose(neff[b].double(), ref_neff, rtol=tol * 10)


def test_exclusion_ignores_the_excluded_sample_and_chunks_agree(monkeypatch, path):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 2, generator=gen, dtype=DT)
    y = x + 0.3 * torch.randn(20, 2, generator=gen, dtype=DT)
    ex = torch.arange(20)
    a = window_score(x, y, 0.5, exclude=ex)
    poisoned = x.clone()
    poisoned[4] = 1e6  # only query 4 excludes sample 4: the others now see a far sample with weight 0
    b = window_score(poisoned, y, 0.5, exclude=ex)
    assert torch.allclose(a[4], b[4], atol=1e-12)
    keep = torch.arange(20) != 4
    assert torch.allclose(a[4], window_score(x[keep], y[4:5], 0.5)[0], atol=1e-12)
    monkeypatch.setattr(window, "_CHUNK_ELEMENTS", 40)  # two queries per chunk (torch path)
    assert torch.allclose(window_score(x, y, 0.5, exclude=ex), a, atol=1e-13)


def test_neff_limits_and_far_queries_stay_finite(path):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(50, 3, generator=gen, dtype=torch.float32)
    _, neff = window_score(x, x.clone(), 1e4, exclude=torch.arange(50), return_neff=True)
    assert torch.allclose(neff, torch.full_like(neff, 49.0), rtol=1e-4)  # a flat window: every other sample
    far = torch.tensor([[1e3, 0.0, 0.0]])
    g, neff = window_score(x, far, 0.1, return_neff=True)  # every exp underflows without the softmax's shift
    assert torch.isfinite(g).all() and float(neff) == pytest.approx(1.0)
    nearest = x[(x - far).norm(dim=-1).argmin()]
    assert torch.allclose(g[0], (nearest - far[0]) / 0.01, rtol=1e-4)


def test_gradcheck():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 2, generator=gen, dtype=DT, requires_grad=True)
    y = torch.randn(2, 4, 2, generator=gen, dtype=DT, requires_grad=True)
    h = torch.tensor([0.8, 1.4], dtype=DT, requires_grad=True)
    ex = torch.tensor([0, 2, 5, 1])
    assert torch.autograd.gradcheck(lambda a, b, c: window_score(a, b, c, exclude=ex), (x, y, h))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(bandwidth=-1.0), ValueError, "bandwidth"),
    (dict(bandwidth=float("nan")), ValueError, "bandwidth"),
    (dict(bandwidth="wide"), TypeError, "bandwidth"),
    (dict(bandwidth=torch.ones(3)), ValueError, "bandwidth"),
    (dict(queries=torch.zeros(4, 3)), ValueError, "queries"),
    (dict(queries=torch.zeros(4, 2, dtype=torch.float32)), TypeError, "queries"),
    (dict(samples=torch.zeros(5, dtype=DT)), TypeError, "samples"),
    (dict(exclude=torch.tensor([0, 1, 2, 9])), ValueError, "exclude"),
    (dict(exclude=torch.tensor([0, 1])), TypeError, "exclude"),
    (dict(samples=torch.zeros(1, 2, dtype=DT), exclude=torch.zeros(4, dtype=torch.long)), ValueError, "samples"),
])
def test_bad_input(kwargs, err, match):
    args = dict(samples=torch.randn(5, 2, dtype=DT), queries=torch.randn(4, 2, dtype=DT), bandwidth=1.0)
    args.update(kwargs)
    exclude = args.pop("exclude", None)
    with pytest.raises(err, match=match):
        window_score(args["samples"], args["queries"], args["bandwidth"], exclude=exclude)


def test_compiled_op_rejects_bad_input_without_crashing():
    if compiled_extension() is None:
        pytest.skip("steinops._C is not built")
    op = torch.ops.steinops_C.window_score
    x, y, h = torch.randn(2, 5, 3, dtype=DT), torch.randn(2, 4, 3, dtype=DT), torch.ones(2, dtype=DT)
    none = torch.empty(0, dtype=torch.long)
    for args, match in [((x, y.float(), h, none), "dtype"), ((x, y[:, :, :2].contiguous(), h, none), "shape"),
                        ((x, y, h[:1], none), "h must"), ((x, y, h, torch.tensor([0, 1, 2, 5])), "exclude"),
                        ((x, y, h, torch.tensor([-1, 0, 1, 2])), "exclude must index"),
                        ((x, y, h, torch.tensor([0, 1])), "exclude"),
                        ((x[:, :1].contiguous(), y, h, torch.zeros(4, dtype=torch.long)), "2 samples")]:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    # with the Python value checks off (the training objective's inner loop), the op still guards its memory
    with value_checks_suspended(), pytest.raises(RuntimeError, match="exclude must index"):
        window_score(x, y, h, exclude=torch.tensor([0, 1, 2, 5]))

"""steinops.sgm.metrics against dense references and closed forms (Gaussians), plus bad input."""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import cdist as np_cdist, pdist

from steinops.distributions import GaussianMixture, concentric_rings, random_gmm, two_mode_mixture
from steinops.sgm import metrics as M

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gauss(n, mean, cov, g):
    mean = torch.as_tensor(mean, dtype=F64)
    L = torch.linalg.cholesky(torch.as_tensor(cov, dtype=F64))
    return mean + torch.randn(n, mean.numel(), generator=g, dtype=F64) @ L.T


S1 = [[1.0, 0.3], [0.3, 0.5]]
S2 = [[0.6, -0.2], [-0.2, 1.4]]


# ---- MMD ------------------------------------------------------------------------------------------------

def dense_mmd(x, y, h):
    k = lambda a, b: np.exp(-np_cdist(a, b, "sqeuclidean") / (2 * h * h))  # noqa: E731
    x, y = x.numpy(), y.numpy()
    n, m = len(x), len(y)
    return ((k(x, x).sum() - n) / (n * (n - 1)) + (k(y, y).sum() - m) / (m * (m - 1))
            - 2 * k(x, y).mean())


def test_mmd_equals_dense_unbiased_estimate():
    g = gen(0)
    x = torch.randn(37, 3, generator=g, dtype=F64) + 10.0  # far from the origin: centring must not matter
    y = 1.3 * torch.randn(23, 3, generator=g, dtype=F64) + 10.4
    assert M.mmd(x, y, bandwidth=0.9) == pytest.approx(dense_mmd(x, y, 0.9), rel=1e-10, abs=1e-13)
    # "median": the (lower) median pairwise distance of the pooled sample
    d = np.sort(pdist(torch.cat([x, y]).numpy()))
    h = d[(len(d) - 1) // 2]
    assert M.mmd(x, y) == pytest.approx(dense_mmd(x, y, h), rel=1e-10, abs=1e-13)
    assert M.mmd(x.float(), y.float(), bandwidth=0.9) == pytest.approx(dense_mmd(x, y, 0.9), rel=1e-5, abs=1e-7)


def expected_rbf(S, delta, h):
    """E exp(-|Z|^2/(2h^2)) for Z ~ N(delta, S): h^d / sqrt(det(S + h^2 I)) exp(-delta^T (S + h^2 I)^-1 delta / 2)."""
    A = torch.as_tensor(S, dtype=F64) + h * h * torch.eye(len(delta), dtype=F64)
    delta = torch.as_tensor(delta, dtype=F64)
    return float(h ** len(delta) / torch.linalg.det(A).sqrt() * torch.exp(-0.5 * delta @ torch.linalg.solve(A, delta)))


def test_mmd_closed_form_between_gaussians():
    g, h = gen(1), 1.5
    m2 = [0.7, -0.4]
    x, y = gauss(1200, [0, 0], S1, g), gauss(900, m2, S2, g)
    S1t, S2t = torch.tensor(S1, dtype=F64), torch.tensor(S2, dtype=F64)
    exact = (expected_rbf(2 * S1t, [0, 0], h) + expected_rbf(2 * S2t, [0, 0], h)
             - 2 * expected_rbf(S1t + S2t, m2, h))
    assert exact > 0.1
    assert M.mmd(x, y, bandwidth=h) == pytest.approx(exact, abs=0.035)  # MC std ~0.008 (measured)
    # same law: unbiased estimate near zero; a shift is detected
    same = M.mmd(gauss(1000, [0, 0], S1, g), gauss(700, [0, 0], S1, g))
    assert abs(same) < 0.01
    assert M.mmd(x, y) > 10 * max(abs(same), 1e-3)


# ---- energy distance -------------------------------------------------------------------------------------

def test_energy_distance_equals_dense_and_scipy():
    g = gen(2)
    x = torch.randn(41, 2, generator=g, dtype=F64) + 5
    y = 0.7 * torch.randn(29, 2, generator=g, dtype=F64) + 5.3
    xn, yn = x.numpy(), y.numpy()
    ref = 2 * np_cdist(xn, yn).mean() - pdist(xn).mean() - pdist(yn).mean()  # pdist: pairs i < j
    assert M.energy_distance(x, y) == pytest.approx(ref, rel=1e-12)
    # 1-D: scipy's energy_distance is sqrt of the V-statistic 2E|X-Y| - E_V|X-X'| - E_V|Y-Y'|
    a, b = x[:, :1], y[:17, :1]
    n, m = len(a), len(b)
    uxx, uyy = pdist(a.numpy()).mean(), pdist(b.numpy()).mean()
    sci = stats.energy_distance(a[:, 0].numpy(), b[:, 0].numpy()) ** 2
    assert M.energy_distance(a, b) == pytest.approx(sci - uxx / n - uyy / m, rel=1e-10)


def test_energy_distance_closed_form_gaussians():
    g = gen(3)
    # 1-D: X ~ N(0, 1), Y ~ N(1, 1.5^2); E|N(mu, s^2)| = s sqrt(2/pi) exp(-mu^2/(2 s^2)) + mu (1 - 2 Phi(-mu/s))
    s, mu = math.sqrt(1 + 1.5**2), 1.0
    exy = s * math.sqrt(2 / math.pi) * math.exp(-mu**2 / (2 * s * s)) + mu * (1 - 2 * stats.norm.cdf(-mu / s))
    exact1 = 2 * exy - 2 * 1.0 / math.sqrt(math.pi) - 2 * 1.5 / math.sqrt(math.pi)  # E|X - X'| = 2 sd / sqrt(pi)
    est1 = M.energy_distance(torch.randn(3000, 1, generator=g, dtype=F64),
                             1 + 1.5 * torch.randn(2500, 1, generator=g, dtype=F64))
    assert est1 == pytest.approx(exact1, abs=0.08)
    # 2-D isotropic: |N(delta, s^2 I)| is Rice(|delta|/s, scale s); E|X - X'| = sd sqrt(pi)
    s1, s2, delta = 1.0, 0.6, np.array([1.2, -0.5])
    s = math.hypot(s1, s2)
    exact2 = 2 * stats.rice(np.linalg.norm(delta) / s, scale=s).mean() - (s1 + s2) * math.sqrt(math.pi)
    x = s1 * torch.randn(2500, 2, generator=g, dtype=F64)
    y = torch.as_tensor(delta) + s2 * torch.randn(2000, 2, generator=g, dtype=F64)
    assert exact2 > 0.5
    assert M.energy_distance(x, y) == pytest.approx(exact2, abs=0.08)
    same = M.energy_distance(x, s1 * torch.randn(1800, 2, generator=g, dtype=F64))
    assert abs(same) < 0.03


# ---- sliced Wasserstein ----------------------------------------------------------------------------------

def test_sliced_wasserstein_1d_matches_scipy_w1_unequal_sizes():
    g = gen(4)
    x, y = torch.randn(13, 1, generator=g, dtype=F64), 2 * torch.randn(8, 1, generator=g, dtype=F64) + 1
    ref = stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    assert M.sliced_wasserstein(x, y, p=1, n_projections=5, generator=g) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("n,m,p", [(12, 8, 2), (7, 5, 3), (9, 9, 2)])
def test_sliced_wasserstein_unequal_sizes_equals_repeated_equal_sizes(n, m, p):
    """The empirical law of x equals that of x with every point repeated r times, so padding both samples
    to lcm(n, m) by repetition must give the same sliced distance (same directions: same seed)."""
    g = gen(5)
    x, y = torch.randn(n, 3, generator=g, dtype=F64), torch.randn(m, 3, generator=g, dtype=F64) + 0.5
    lcm = n * m // math.gcd(n, m)
    got = M.sliced_wasserstein(x, y, n_projections=17, p=p, generator=gen(9))
    ref = M.sliced_wasserstein(x.repeat_interleave(lcm // n, 0), y.repeat(lcm // m, 1), n_projections=17, p=p,
                               generator=gen(9))
    assert got == pytest.approx(ref, rel=1e-12)
    # deterministic given the generator, different directions for another seed
    assert M.sliced_wasserstein(x, y, n_projections=17, p=p, generator=gen(9)) == got
    assert M.sliced_wasserstein(x, y, n_projections=17, p=p, generator=gen(10)) != got


def test_sliced_wasserstein_closed_form_gaussians():
    g = gen(6)
    # 1-D: W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    x1 = torch.randn(3000, 1, generator=g, dtype=F64)
    y1 = 0.8 + 1.4 * torch.randn(2300, 1, generator=g, dtype=F64)
    assert M.sliced_wasserstein(x1, y1, n_projections=2, generator=g) ** 2 == pytest.approx(0.64 + 0.16, abs=0.08)
    # 2-D anisotropic: average the per-direction closed form over the circle (quadrature in the angle)
    m2 = np.array([0.9, -0.3])
    x, y = gauss(3000, [0, 0], S1, g), gauss(2500, m2, S2, g)
    ang = (np.arange(4096) + 0.5) * 2 * np.pi / 4096
    th = np.stack([np.cos(ang), np.sin(ang)], 1)
    q = lambda S: np.sqrt(np.einsum("ki,ij,kj->k", th, np.array(S), th))  # noqa: E731
    exact = np.mean((th @ m2) ** 2 + (q(S1) - q(S2)) ** 2)
    est = M.sliced_wasserstein(x, y, n_projections=1500, generator=g) ** 2
    assert est == pytest.approx(exact, rel=0.12)
    same = M.sliced_wasserstein(x, gauss(2000, [0, 0], S1, g), generator=g) ** 2
    assert same < 0.1 * exact


# ---- mode weights -----------------------------------------------------------------------------------------

def test_mode_weights_known_assignments_and_posterior_rule():
    mix = GaussianMixture([0.5, 0.3, 0.2], [[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], [1.0, 0.5, 2.0])
    g = gen(7)
    pts = torch.cat([mix.means[0].expand(5, 2), mix.means[1].expand(3, 2), mix.means[2].expand(2, 2)])
    pts = pts + 0.05 * torch.randn(10, 2, generator=g, dtype=F64)
    w = M.mode_weights(pts, mix)
    assert w.dtype == F64 and torch.allclose(w, torch.tensor([0.5, 0.3, 0.2], dtype=F64))
    assert M.mode_weight_error(pts, mix) == pytest.approx(0.0, abs=1e-15)
    assert M.mode_weight_error(pts[:5], mix) == pytest.approx(0.5)
    # the max-posterior rule (weights and unequal stds matter, not just the nearest mean), via scipy
    z = 6 * torch.rand(400, 2, generator=g, dtype=F64) - 1
    logp = np.stack([np.log(float(mix.weights[k])) + stats.multivariate_normal(
        mix.means[k].numpy(), float(mix.stds[k]) ** 2 * np.eye(2)).logpdf(z.numpy()) for k in range(3)], 1)
    ref = np.bincount(logp.argmax(1), minlength=3) / 400
    nearest = np.bincount(np_cdist(z.numpy(), mix.means.numpy()).argmin(1), minlength=3) / 400
    assert not np.allclose(ref, nearest)  # the test can tell the two rules apart
    np.testing.assert_allclose(M.mode_weights(z.float(), mix).numpy(), ref, atol=1e-12)


def test_mode_weights_of_exact_samples():
    g = gen(8)
    p = two_mode_mixture()
    n = 4000
    w = M.mode_weights(p.sample(n, generator=g), p)
    assert torch.allclose(w, torch.tensor([0.8, 0.2], dtype=F64), atol=4 * math.sqrt(0.16 / n))
    fc = random_gmm(d=3, n_components=3, mean_scale=6.0, seed=1)
    assert M.mode_weight_error(fc.sample(n, generator=g), fc) < 0.04
    assert M.mode_weight_error(torch.full((50, 2), 5.0, dtype=F64), p) == pytest.approx(0.2)


# ---- KSD -------------------------------------------------------------------------------------------------

def dense_imq_ksd_v(x, s, h):
    diff = x[:, None, :] - x[None, :, :]
    r2 = (diff**2).sum(-1)
    k = (1 + r2 / h**2) ** -0.5
    d = x.shape[1]
    gx = -diff * (k**3 / h**2)[..., None]  # grad_x k(x_i, x_j)
    u = ((s @ s.T) * k + (s[:, None, :] * (-gx)).sum(-1) + (s[None, :, :] * gx).sum(-1)
         + d * k**3 / h**2 - 3 * r2 * k**5 / h**4)
    return float(u.mean())


def test_ksd_to_exact_is_the_v_statistic_with_the_exact_score():
    g = gen(11)
    p = two_mode_mixture(d=3)
    x = p.sample(19, 0.7, generator=g) + 0.3
    ref = dense_imq_ksd_v(x, p.score(x, 0.7), 2.3)
    assert M.ksd_to_exact(x, p, 0.7, bandwidth=2.3) == pytest.approx(ref, rel=1e-9)


def test_ksd_small_for_exact_samples_large_for_wrong_ones():
    g = gen(12)
    p = two_mode_mixture()
    good = M.ksd_to_exact(p.sample(800, generator=g), p)
    shifted = M.ksd_to_exact(p.sample(800, generator=g) + 0.5, p)
    too_wide = M.ksd_to_exact(GaussianMixture(p.weights, p.means, 1.3 * p.stds).sample(800, generator=g), p)
    assert 0 <= good < 0.2 * min(shifted, too_wide)
    # (KSD is blind to the mixing weights of well-separated modes: that is what mode_weight_error is for)
    rings = concentric_rings()
    with pytest.raises(ValueError, match="sigma"):
        M.ksd_to_exact(rings.sample(50, generator=g), rings)
    assert M.ksd_to_exact(rings.sample(300, 0.3, generator=g), rings, sigma=0.3) >= 0


# ---- Fisher errors ---------------------------------------------------------------------------------------

def test_relative_fisher_error_exact_values():
    s = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=F64)
    g = torch.tensor([[3.0, 1.0], [0.0, 4.0]], dtype=F64)
    assert M.relative_fisher_error(g, s) == pytest.approx((9 + 16) / 25)
    assert M.relative_fisher_error(s, s) == 0.0
    assert M.relative_fisher_error(torch.zeros(2, 2, dtype=F64), s) == pytest.approx(1.0)


def test_fisher_error_per_level_exact_values():
    p = two_mode_mixture()
    sigmas = torch.tensor([5.0, 1.0, 0.1], dtype=F64)
    seen = []

    def exact_fn(x, sigma):
        seen.append(sigma)
        return p.score(x, float(sigma[0]))

    assert M.fisher_error_per_level(exact_fn, p, sigmas, 37, generator=gen(13)) == pytest.approx([0, 0, 0], abs=1e-14)
    assert all(t.shape == (37,) and t.dtype == F64 for t in seen)
    assert [float(t[0]) for t in seen] == [5.0, 1.0, 0.1]
    double = lambda x, sigma: 2 * p.score(x, float(sigma[0]))  # noqa: E731  error |s|^2 / |s|^2 = 1
    np.testing.assert_allclose(M.fisher_error_per_level(double, p, [2.0, 0.5], 29), [1.0, 1.0], rtol=1e-12)
    nan_fn = lambda x, sigma: torch.full_like(x, float("nan"))  # noqa: E731
    assert M.fisher_error_per_level(nan_fn, p, [1.0], 5) == [math.inf]
    with pytest.raises(ValueError, match="sigmas"):
        M.fisher_error_per_level(exact_fn, concentric_rings(), [1.0, 0.0], 5)
    with pytest.raises(ValueError, match="score_fn"):
        M.fisher_error_per_level(lambda x, s: x[:, :1], p, [1.0], 5)


# ---- sample_metrics --------------------------------------------------------------------------------------

def test_sample_metrics_good_vs_bad_samples():
    p = two_mode_mixture()
    good = M.sample_metrics(p.sample(600, generator=gen(14)), p, generator=gen(15))
    assert set(good) == {"mmd", "energy", "sliced_w2", "ksd", "mode_weight_error"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in good.values())
    bad_mix = GaussianMixture([0.5, 0.5], p.means, 1.5 * p.stds)  # wrong weights (mode error) and too wide (KSD)
    bad = M.sample_metrics(bad_mix.sample(600, generator=gen(14)), p, generator=gen(15))
    for key in good:
        assert bad[key] > max(2 * good[key], good[key] + 0.005), key
    # deterministic given the generator; an explicit reference is used as is
    assert M.sample_metrics(p.sample(600, generator=gen(14)), p, generator=gen(15)) == good
    ref = p.sample(300, generator=gen(16))
    r = M.sample_metrics(bad_mix.sample(200, generator=gen(14)), p, reference=ref, generator=gen(1))
    assert r["mmd"] == pytest.approx(M.mmd(bad_mix.sample(200, generator=gen(14)), ref))


def test_sample_metrics_singular_law():
    rings = concentric_rings()
    x = rings.sample(200, generator=gen(17))
    r = M.sample_metrics(x, rings, n_reference=150, generator=gen(18))
    assert set(r) == {"mmd", "energy", "sliced_w2"}  # no clean score: ksd needs ksd_sigma > 0
    r = M.sample_metrics(x, rings, n_reference=150, generator=gen(18), ksd_sigma=0.2)
    assert set(r) == {"mmd", "energy", "sliced_w2", "ksd"} and r["ksd"] >= 0


# ---- bad input -------------------------------------------------------------------------------------------

X = torch.randn(10, 2, dtype=F64)
P = two_mode_mixture()


@pytest.mark.parametrize("fn", [M.mmd, M.energy_distance, M.sliced_wasserstein])
@pytest.mark.parametrize("x,y,exc,match", [
    (torch.randn(10, dtype=F64), X, ValueError, "x"),
    (X, torch.randn(2, 5, 2, dtype=F64), ValueError, "y"),
    (X, torch.randn(10, 3, dtype=F64), ValueError, "same dimension"),
    (X, torch.tensor([[1.0, float("nan")]] * 4, dtype=F64), ValueError, "y contains NaN"),
    (X.numpy(), X, TypeError, "x"),
    (X, torch.ones(10, 2, dtype=torch.long), TypeError, "y"),
    (torch.zeros(0, 2, dtype=F64), X, ValueError, "x needs at least"),
])
def test_two_sample_bad_input(fn, x, y, exc, match):
    with pytest.raises(exc, match=match):
        fn(x, y)


def test_bad_options():
    with pytest.raises(ValueError, match="x needs at least 2"):
        M.mmd(X[:1], X)
    with pytest.raises(ValueError, match="y needs at least 2"):
        M.energy_distance(X, X[:1])
    for bw in (0.0, -1.0, "silverman", float("inf")):
        with pytest.raises(ValueError, match="bandwidth"):
            M.mmd(X, X, bandwidth=bw)
    with pytest.raises(ValueError, match="p must"):
        M.sliced_wasserstein(X, X, p=0.5)
    with pytest.raises(ValueError, match="n_projections"):
        M.sliced_wasserstein(X, X, n_projections=0)
    with pytest.raises(TypeError, match="generator"):
        M.sliced_wasserstein(X, X, generator=3)
    with pytest.raises(TypeError, match="mixture"):
        M.mode_weights(X, concentric_rings())
    with pytest.raises(ValueError, match="samples"):
        M.mode_weights(torch.randn(5, 3, dtype=F64), P)
    with pytest.raises(ValueError, match="sigma"):
        M.ksd_to_exact(X, P, sigma=-1.0)
    with pytest.raises(ValueError, match="samples contains NaN"):
        M.ksd_to_exact(torch.full((4, 2), float("inf"), dtype=F64), P)
    with pytest.raises(ValueError, match="estimate and exact"):
        M.relative_fisher_error(X, X[:5])
    with pytest.raises(ValueError, match="exact is identically zero"):
        M.relative_fisher_error(X, torch.zeros_like(X))
    with pytest.raises(ValueError, match="estimate"):
        M.relative_fisher_error(torch.ones(3, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="n must"):
        M.fisher_error_per_level(lambda x, s: x, P, [1.0], 0)
    with pytest.raises(ValueError, match="samples"):
        M.sample_metrics(torch.randn(10, 3, dtype=F64), P)
    with pytest.raises(ValueError, match="n_reference"):
        M.sample_metrics(X, P, n_reference=1)
    with pytest.raises(ValueError, match="reference"):
        M.sample_metrics(X, P, reference=torch.randn(10, 3, dtype=F64))

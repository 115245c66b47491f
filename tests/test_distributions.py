"""Exact-score test distributions (steinops.distributions): scores against autograd of log_prob and
against formula-independent Monte-Carlo checks (Tweedie's identity by self-normalised importance
sampling from clean samples), sample moments, geometry of the manifold toys, argument checks."""
import math

import pytest
import torch

from steinops.distributions import (
    REGISTRY,
    Checkerboard,
    CurveDistribution,
    FullCovGaussianMixture,
    GaussianMixture,
    UniformSphere,
    concentric_rings,
    eight_gaussians,
    get_distribution,
    random_gmm,
    random_subspace_gmm,
    two_mode_mixture,
    two_moons,
)

DT = torch.float64

# (registry name, kwargs, sigma for the Monte-Carlo check)
CASES = [
    ("two_mode", {}, 0.5),
    ("eight_gaussians", {}, 0.3),
    ("rings", {}, 0.2),
    ("checkerboard", {}, 0.3),
    ("moons", {}, 0.15),
    ("spiral", {}, 0.15),
    ("gmm", {"d": 3}, 0.5),
    ("subspace_gmm", {"D": 10, "k": 2}, 0.3),
    ("sphere", {"D": 6, "k": 2}, 0.3),
    ("sphere", {"D": 4, "k": 1, "radius": 2.0}, 0.2),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw, _ in CASES]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_registry_covers_issue_names():
    for name in ["two_mode", "eight_gaussians", "rings", "checkerboard", "moons", "spiral", "gmm",
                 "subspace_gmm", "sphere"]:
        assert name in REGISTRY
    with pytest.raises(ValueError, match="name"):
        get_distribution("no_such_thing")


@pytest.mark.parametrize("name,kw,sigma", CASES, ids=IDS)
def test_score_matches_autograd_of_log_prob(name, kw, sigma):
    p = get_distribution(name, **kw)
    for s in (sigma, 1.3):
        x = p.sample(64, s, generator=gen(1))
        assert x.shape == (64, p.dim) and x.dtype == DT
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(p.log_prob(xr, s).sum(), xr)
        sc = p.score(x, s)
        assert sc.shape == x.shape
        torch.testing.assert_close(sc, g, rtol=1e-8, atol=1e-8)
        # batch shapes (..., d) are preserved
        assert p.score(x.reshape(4, 16, p.dim), s).shape == (4, 16, p.dim)
        assert p.log_prob(x.reshape(4, 16, p.dim), s).shape == (4, 16)


@pytest.mark.parametrize("name,kw,sigma", CASES, ids=IDS)
def test_tweedie_and_log_density_by_importance_sampling(name, kw, sigma):
    """E[x0 | x] = x + sigma^2 grad log q_sigma(x) and q_sigma(x) = E_x0 N(x; x0, sigma^2 I), with the
    expectations estimated from 200k clean samples -- independent of the score/log_prob formulas."""
    p = get_distribution(name, **kw)
    x = p.sample(12, sigma, generator=gen(2))
    x0 = p.sample(200_000, 0.0, generator=gen(3))
    d2 = (x * x).sum(-1, keepdim=True) - 2 * x @ x0.T + (x0 * x0).sum(-1)
    logk = -0.5 * d2 / sigma**2  # (12, M)
    w = torch.softmax(logk, -1)
    ess = 1.0 / (w**2).sum(-1)
    assert ess.min() > 200, ess.min()
    post_mean = w @ x0
    tweedie = x + sigma**2 * p.score(x, sigma)
    err = (tweedie - post_mean).norm(dim=-1) / sigma
    tol = 4.0 / ess.sqrt() + 0.005
    assert (err < tol).all(), (err, tol)
    log_mc = torch.logsumexp(logk, -1) - math.log(x0.shape[0]) - 0.5 * p.dim * math.log(2 * math.pi * sigma**2)
    assert (log_mc - p.log_prob(x, sigma)).abs().max() < 5.0 / ess.min().sqrt() + 0.01


def test_score_by_finite_differences_of_monte_carlo_log_density():
    """Central differences of the brute-force log q_sigma (one fixed clean sample) match the checkerboard score."""
    p = Checkerboard()
    x0 = p.sample(400_000, 0.0, generator=gen(4))
    sigma, h = 0.5, 1e-3
    x = torch.tensor([[0.3, -1.1], [2.2, 1.9], [-4.3, 0.2]], dtype=DT)

    def mc_logq(z):
        d2 = (z * z).sum(-1, keepdim=True) - 2 * z @ x0.T + (x0 * x0).sum(-1)
        return torch.logsumexp(-0.5 * d2 / sigma**2, -1)

    e = torch.eye(2, dtype=DT)
    fd = torch.stack([(mc_logq(x + h * e[i]) - mc_logq(x - h * e[i])) / (2 * h) for i in range(2)], -1)
    torch.testing.assert_close(p.score(x, sigma), fd, rtol=0.05, atol=0.03)


# --- exact special cases ------------------------------------------------------------------------------

def test_circle_matches_bessel_closed_form_all_scales():
    R = 1.5
    p = UniformSphere(2, 1, radius=R)
    x = torch.tensor([[1.49, 0.0], [0.0, 1.53], [0.3, 0.1], [10.0, -4.0], [1e-3, 0.0]], dtype=DT)
    for sigma in (1e-3, 0.01, 0.3, 5.0):
        rho = x.norm(dim=-1)
        kap = R * rho / sigma**2
        ref_lp = (-math.log(2 * math.pi * sigma**2) - (rho - R) ** 2 / (2 * sigma**2)
                  + torch.log(torch.special.i0e(kap)))
        # uniform on the circle: q = (2 pi s^2)^-1 exp(-(rho^2 + R^2) / 2 s^2) I0(kappa)
        torch.testing.assert_close(p.log_prob(x, sigma), ref_lp, rtol=1e-10, atol=1e-10)
        A = torch.special.i1e(kap) / torch.special.i0e(kap)
        ref = (-x + R * A[:, None] * x / rho[:, None]) / sigma**2
        torch.testing.assert_close(p.score(x, sigma), ref, rtol=1e-9, atol=1e-9)


def test_two_sphere_matches_elementary_closed_form():
    # S^2 in R^3: E exp(kappa cos) = sinh(kappa)/kappa, A = coth(kappa) - 1/kappa
    p = UniformSphere(3, 2, radius=1.0)
    x = torch.tensor([[0.99, 0.0, 0.05], [0.2, -0.3, 0.1], [3.0, 1.0, -2.0]], dtype=DT)
    for sigma in (0.01, 0.2, 2.0):
        rho = x.norm(dim=-1)
        kap = rho / sigma**2
        A = 1 / torch.tanh(kap) - 1 / kap
        ref = (-x + A[:, None] * x / rho[:, None]) / sigma**2
        torch.testing.assert_close(p.score(x, sigma), ref, rtol=1e-9, atol=1e-9)
        ref_lp = (-1.5 * math.log(2 * math.pi * sigma**2) - (rho - 1) ** 2 / (2 * sigma**2)
                  + torch.log(-torch.expm1(-2 * kap) / (2 * kap)))
        torch.testing.assert_close(p.log_prob(x, sigma), ref_lp, rtol=1e-10, atol=1e-10)


def test_curve_quadrature_converged_at_small_sigma():
    p = two_moons()
    fine = CurveDistribution([(fn, t0, t1, w, 3 * v) for fn, t0, t1, w, v in p.pieces])  # 3x more nodes
    x = p.sample(50, 0.02, generator=gen(5))
    torch.testing.assert_close(p.score(x, 0.02), fine.score(x, 0.02), rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(p.log_prob(x, 0.02), fine.log_prob(x, 0.02), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,kw,sigma", CASES, ids=IDS)
def test_small_sigma_and_far_points_are_finite(name, kw, sigma):
    p = get_distribution(name, **kw)
    x = torch.cat([p.sample(8, 0.01, generator=gen(6)), 40.0 * torch.ones(1, p.dim, dtype=DT)])
    for s in (0.01, 1e-3 if name not in ("moons", "spiral") else 0.005):
        assert torch.isfinite(p.score(x, s)).all()
        assert torch.isfinite(p.log_prob(x, s)).all()
    # far away the score points back towards the data with magnitude ~ dist / sigma^2
    far = p.score(x[-1:], 1.0)
    assert (far @ x[-1]).item() < 0


# --- full-covariance mixtures ---------------------------------------------------------------------

def _direct_gmm(p, x, sigma):
    lps, sols = [], []
    for k in range(p.weights.numel()):
        A = p.covs[k] + sigma**2 * torch.eye(p.dim, dtype=DT)
        Ainv = torch.linalg.inv(A)
        diff = x - p.means[k]
        maha = ((diff @ Ainv) * diff).sum(-1)
        lps.append(math.log(p.weights[k]) - 0.5 * maha - 0.5 * torch.linalg.slogdet(A)[1] - 0.5 * p.dim * math.log(2 * math.pi))
        sols.append(-diff @ Ainv)
    lps = torch.stack(lps, -1)
    r = torch.softmax(lps, -1)
    return torch.logsumexp(lps, -1), (r.unsqueeze(-1) * torch.stack(sols, -2)).sum(-2)


def test_anisotropic_gmm_d200_matches_direct_float64():
    p = random_gmm(200, 3, mean_scale=0.3, seed=11)
    for sigma in (0.0, 0.7):
        x = p.sample(40, sigma, generator=gen(7))
        lp, sc = _direct_gmm(p, x, sigma)
        torch.testing.assert_close(p.log_prob(x, sigma), lp, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(p.score(x, sigma), sc, rtol=1e-8, atol=1e-9)


def test_anisotropic_gmm_d1000_runs_and_is_consistent():
    p = random_gmm(1000, 2, mean_scale=0.1, seed=1)
    x = p.sample(6, 0.5, generator=gen(8))
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(p.log_prob(xr, 0.5).sum(), xr)
    torch.testing.assert_close(p.score(x, 0.5), g, rtol=1e-8, atol=1e-8)


def test_gmm_sample_moments():
    p = random_gmm(3, 3, seed=2)
    x = p.sample(200_000, 0.5, generator=gen(9))
    torch.testing.assert_close(x.mean(0), p.mean(), rtol=0, atol=0.05)
    torch.testing.assert_close(torch.cov(x.T), p.covariance(0.5), rtol=0.03, atol=0.08)


def test_full_cov_gmm_reduces_to_isotropic():
    iso = GaussianMixture([0.3, 0.7], [[1.0, 2.0], [-1.0, 0.0]], [0.5, 1.5])
    full = FullCovGaussianMixture(iso.weights, iso.means, torch.stack([0.25 * torch.eye(2), 2.25 * torch.eye(2)]).to(DT))
    x = iso.sample(30, 0.4, generator=gen(10))
    torch.testing.assert_close(full.score(x, 0.4), iso.score(x, 0.4))
    torch.testing.assert_close(full.log_prob(x, 0.4), iso.log_prob(x, 0.4))


# --- 2-D toys: sample laws ----------------------------------------------------------------------------

def test_two_mode_and_eight_gaussians_mode_weights():
    x = two_mode_mixture(2).sample(40_000, generator=gen(11))
    assert abs((x[:, 0] > 0).double().mean().item() - 0.8) < 0.01
    torch.testing.assert_close(x.mean(0), torch.full((2,), 3.0, dtype=DT), rtol=0, atol=0.06)
    p = eight_gaussians()
    x = p.sample(40_000, generator=gen(12))
    counts = torch.bincount(torch.cdist(x, p.means).argmin(-1), minlength=8).double() / x.shape[0]
    assert (counts - 1 / 8).abs().max() < 0.01
    assert abs(x.norm(dim=-1).mean().item() - 4.0) < 0.1


def test_rings_checkerboard_moons_supports():
    x = concentric_rings().sample(30_000, generator=gen(13))
    r = x.norm(dim=-1)
    ring = r.round()
    assert (r - ring).abs().max() < 1e-12
    frac = torch.stack([(ring == k).double().mean() for k in (1, 2, 3)])
    torch.testing.assert_close(frac, torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=DT), rtol=0, atol=0.01)

    cb = Checkerboard()
    x = cb.sample(30_000, generator=gen(14))
    assert torch.isfinite(cb.log_prob(x, 0.0)).all()
    assert x.abs().max() <= 4.0
    assert abs(x.mean(0)).max() < 0.05
    assert cb.log_prob(torch.tensor([[1.0, -1.0]], dtype=DT), 0.0).item() == -math.inf  # an empty cell
    torch.testing.assert_close(cb.log_prob(torch.tensor([[1.0, 1.0]], dtype=DT), 0.0), torch.tensor([-math.log(32.0)], dtype=DT))

    x = two_moons().sample(20_000, generator=gen(15))
    d_up = (x.norm(dim=-1) - 1).abs() + (x[:, 1] < 0) * 1.0
    d_low = ((x - torch.tensor([1.0, 0.5], dtype=DT)).norm(dim=-1) - 1).abs() + (x[:, 1] > 0.5) * 1.0
    assert torch.minimum(d_up, d_low).max() < 1e-12
    up = d_up < d_low
    assert abs(up.double().mean().item() - 0.5) < 0.02


def test_checkerboard_score_far_inside_and_outside():
    cb = Checkerboard()
    # deep inside a filled cell with small sigma: flat density, score ~ 0
    assert cb.score(torch.tensor([[1.0, 1.0]], dtype=DT), 0.05).abs().max() < 1e-10
    # just outside the board's right edge (x = 4 + delta), the score is ~ -delta / sigma^2 along e_1 plus
    # the tail term; compare with the 1-D closed form of a half-space (valid away from corners)
    sigma, delta = 0.1, 0.05
    s = cb.score(torch.tensor([[4.0 + delta, 3.0]], dtype=DT), sigma)
    u = torch.tensor(-delta / sigma, dtype=DT)
    ref = -torch.exp(-0.5 * u**2 - 0.5 * math.log(2 * math.pi) - torch.special.log_ndtr(u)) / sigma
    assert abs(s[0, 0].item() - ref.item()) < 1e-6 and abs(s[0, 1].item()) < 1e-6


# --- manifold toys --------------------------------------------------------------------------------------

@pytest.mark.parametrize("maker", [lambda: random_subspace_gmm(12, 3, seed=3), lambda: UniformSphere(7, 3, radius=2.0, seed=4)],
                         ids=["subspace_gmm", "sphere"])
def test_projections_idempotent_orthogonal(maker):
    p = maker()
    D, k = p.dim, p.intrinsic_dim
    x = p.sample(5, 0.3, generator=gen(16))
    PT, PN = p.tangent_projection(x), p.normal_projection(x)
    assert PT.shape == (5, D, D)
    eye = torch.eye(D, dtype=DT)
    torch.testing.assert_close(PT @ PT, PT, rtol=0, atol=1e-12)
    torch.testing.assert_close(PN @ PN, PN, rtol=0, atol=1e-12)
    torch.testing.assert_close(PT, PT.mT, rtol=0, atol=1e-12)
    torch.testing.assert_close(PT @ PN, torch.zeros_like(PT), rtol=0, atol=1e-12)
    torch.testing.assert_close(PT + PN, eye.expand(5, D, D), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(PT, dim1=-2, dim2=-1).sum(-1), torch.full((5,), float(k), dtype=DT))
    v = torch.randn(5, D, dtype=DT, generator=gen(17))
    torch.testing.assert_close(p.project_tangent(x, v), (PT @ v.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(p.project_normal(x, v), (PN @ v.unsqueeze(-1)).squeeze(-1))
    # x - project(x) is normal, and its length is distance(x)
    res = x - p.project(x)
    torch.testing.assert_close(p.project_tangent(x, res), torch.zeros_like(res), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.norm(dim=-1), p.distance(x))
    # clean samples lie on the manifold
    assert p.distance(p.sample(100, generator=gen(18))).max() < 1e-12


def test_sphere_normal_score_like_minus_dist_over_sigma2():
    p = UniformSphere(6, 2, radius=1.0, seed=5)
    pts = p.sample(20, generator=gen(19))
    radial = (pts - p.center) / p.radius
    off = torch.randn(20, 6, dtype=DT, generator=gen(20))
    off = off - (off @ p.basis) @ p.basis.T
    off = off / off.norm(dim=-1, keepdim=True)  # unit normals orthogonal to the sphere's subspace
    for sigma in (0.01, 0.03):
        delta = 0.5 * sigma
        for n in (radial, off):
            x = pts + delta * n
            s = p.score(x, sigma)
            normal = (s * n).sum(-1)
            # sigma^2 <s, n> -> -dist; exactly -delta/sigma^2 off the subspace, up to k/(2R) radially
            assert (normal + delta / sigma**2).abs().max() < p.k / p.radius + 1e-6
            # sigma^2 <s, n> / (-delta) = 1 + O(k sigma / R)
            assert (sigma**2 * normal / -delta - 1).abs().max() < 1.5 * p.k * sigma / p.radius
            # next order (radial): A_k(kappa) = 1 - k / (2 kappa) + O(kappa^-2) gives -k / (2 |x|)
            corr = p.k / (2 * (p.radius + delta)) if n is radial else 0.0
            assert (normal + delta / sigma**2 + corr).abs().max() < 1e-2
            # the tangent part vanishes by symmetry
            assert p.project_tangent(x, s).norm(dim=-1).max() < 1e-8 * s.norm(dim=-1).max()


@pytest.mark.parametrize("maker", [lambda: random_subspace_gmm(8, 2, seed=6), lambda: UniformSphere(8, 2, seed=7)],
                         ids=["subspace_gmm", "sphere"])
def test_normal_energy_sigma2_E_PNs2_to_codim(maker):
    """Research notes section 6: sigma^2 E|P_N s|^2 -> D - k as sigma -> 0."""
    p = maker()
    sigma = 0.005
    x = p.sample(4000, sigma, generator=gen(21))
    s = p.score(x, sigma)
    val = (sigma**2 * p.project_normal(x, s).norm(dim=-1) ** 2).mean().item()
    assert abs(val - (p.dim - p.intrinsic_dim)) < 0.15 * (p.dim - p.intrinsic_dim)


def test_subspace_and_sphere_sample_moments():
    p = random_subspace_gmm(10, 2, seed=8)
    x = p.sample(100_000, generator=gen(22))
    inner_cov = p.inner.covariance()
    torch.testing.assert_close(torch.cov(x.T), p.basis @ inner_cov @ p.basis.T, rtol=0, atol=0.15)
    q = UniformSphere(5, 2, radius=2.0, seed=9)
    x = q.sample(100_000, generator=gen(23))
    torch.testing.assert_close(x.mean(0), torch.zeros(5, dtype=DT), rtol=0, atol=0.03)
    torch.testing.assert_close(x.T @ x / x.shape[0], 4.0 / 3 * q.basis @ q.basis.T, rtol=0, atol=0.03)


# --- argument checks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw,sigma", CASES, ids=IDS)
def test_bad_sigma_and_x(name, kw, sigma):
    p = get_distribution(name, **kw)
    x = p.sample(3, 0.1, generator=gen(24))
    for bad in (-0.1, float("nan"), float("inf"), "a", torch.ones(2)):
        with pytest.raises(ValueError, match="sigma"):
            p.score(x, bad)
        with pytest.raises(ValueError, match="sigma"):
            p.sample(3, bad)
    if p.singular:
        with pytest.raises(ValueError, match="sigma"):
            p.score(x, 0.0)
    else:
        assert torch.isfinite(p.score(x, 0.0)).all()
    with pytest.raises(ValueError, match="x"):
        p.score(torch.zeros(3, p.dim + 1, dtype=DT), 0.5)
    with pytest.raises(ValueError, match="n"):
        p.sample(-1)


def test_singular_log_prob_at_zero_sigma_raises():
    for p in (UniformSphere(3, 1), random_subspace_gmm(5, 2), concentric_rings(), two_moons()):
        with pytest.raises(ValueError, match="sigma"):
            p.log_prob(torch.zeros(2, p.dim, dtype=DT), 0.0)


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="covs"):
        FullCovGaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, -1.0]]])
    with pytest.raises(ValueError, match="covs"):
        FullCovGaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="means"):
        FullCovGaussianMixture([1.0, 1.0], [[0.0, 0.0]], torch.eye(2))
    with pytest.raises(ValueError, match="k"):
        UniformSphere(3, 3)
    with pytest.raises(ValueError, match="radius"):
        UniformSphere(3, 2, radius=-1.0)
    with pytest.raises(ValueError, match="basis"):
        UniformSphere(3, 1, basis=torch.ones(3, 2))
    with pytest.raises(ValueError, match="radii"):
        concentric_rings(radii=(1.0, 0.0))
    with pytest.raises(ValueError, match="n_cells"):
        Checkerboard(0)
    with pytest.raises(ValueError, match="d"):
        random_gmm(0)
    with pytest.raises(ValueError, match="k"):
        random_subspace_gmm(3, 4)

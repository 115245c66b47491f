"""Samplers against exact answers: on a Gaussian every sampler driven by the exact score is a LINEAR chain
y <- c y + sqrt(v) z in the eigenbasis of the covariance, so the mean and covariance of its output are known
in closed form (for the ODE: the map itself); the NCSN toy (0.8 / 0.2 mixture) separates annealed from plain
Langevin; the training-free sampler is checked roughly."""
import math

import numpy as np
import pytest
import torch

import steinops
from steinops.distributions import FullCovGaussianMixture, two_mode_mixture
from steinops.sgm.networks import ScoreMLP
from steinops.sgm.noise import VESDE, NoiseSchedule
from steinops.sgm.samplers import (SAMPLERS, EstimatorScore, SampleResult, annealed_langevin, exact_score_fn,
                                   langevin, network_score_fn, pc_sampler, probability_flow_ode,
                                   training_free_sampler)

MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def gaussian(seed=0, d=3, mu=MU):
    """An anisotropic Gaussian N(mu, Sigma) with eigenvalues in [0.3, 2] and a random rotation."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    cov = U @ torch.diag(lam) @ U.T
    return FullCovGaussianMixture([1.0], mu[:d][None], cov[None]), lam, U


def predicted_moments(lam, m0, v0, steps):
    """Moments of y = U^T (x - mu) after the linear steps y <- c(lam) y + sqrt(v) z, steps = [(c_fn, v)]."""
    m, v = torch.as_tensor(m0, dtype=torch.float64).clone(), (torch.as_tensor(v0, dtype=torch.float64) + 0 * lam)
    for c_fn, nv in steps:
        c = c_fn(lam)
        m, v = c * m, c * c * v + nv
    return m, v


def langevin_step(a, sigma):  # x + a s + sqrt(2a) z with s = -(x - mu) / (lam + sigma^2)
    return (lambda lam: 1 - a / (lam + sigma**2)), 2 * a


def denoise_step(sigma):  # x + sigma^2 s
    return (lambda lam: lam / (lam + sigma**2)), 0.0


def check_moments(x, mu, U, m_pred, v_pred, n_sd=5.0):
    """Sample mean / covariance of y = U^T (x - mu) against the predicted ones, tolerance from the sample size."""
    y = (x.double() - mu) @ U
    N = y.shape[0]
    assert torch.all((y.mean(0) - m_pred).abs() <= n_sd * torch.sqrt(v_pred / N)), (y.mean(0), m_pred)
    C = torch.cov(y.T)
    sd = torch.sqrt((v_pred[:, None] * v_pred[None, :] + torch.diag(v_pred) ** 2) / N)
    assert torch.all((C - torch.diag(v_pred)).abs() <= n_sd * sd), (C, v_pred)


def box(n, gen, lim=8.0):
    return torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 * lim - lim


# -- score functions -----------------------------------------------------------------------------------
def test_exact_score_fn_per_row_sigma_and_dtype():
    p = two_mode_mixture()
    g = torch.Generator().manual_seed(1)
    x = (4 * torch.randn(37, 2, generator=g)).float()
    sig = torch.tensor([0.3, 1.7, 0.0])[torch.randint(0, 3, (37,), generator=g)]
    out = exact_score_fn(p)(x, sig)
    assert out.dtype == torch.float32 and out.shape == (37, 2)
    ref = torch.stack([p.score(x[i].double(), float(sig[i])) for i in range(37)])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact_score_fn(p)(x.double(), 0.7), p.score(x.double(), 0.7))  # scalar sigma


def test_network_score_fn_casts_and_no_grad():
    torch.manual_seed(0)
    model = ScoreMLP(3, hidden=16, depth=2, embed_dim=8).double()
    x = torch.randn(11, 3)
    sig = torch.full((11,), 0.4)
    out = network_score_fn(model)(x, sig)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, model(x.double(), sig.double()).detach().float())


# -- samplers with the exact score on a Gaussian (closed-form moments) --------------------------------------
def test_langevin_gaussian_exact_moments():
    p, lam, U = gaussian(0)
    g = torch.Generator().manual_seed(2)
    x0 = 2 * torch.randn(3001, 3, generator=g, dtype=torch.float64)  # N(0, 4 I): y0 ~ N(-U^T mu, 4)
    a, n = 0.05, 150
    r = langevin(exact_score_fn(p), x0, sigma=0.0, step_size=a, n_steps=n, generator=g)
    assert r.nfe == n and r.trajectory is None
    m, v = predicted_moments(lam, -(MU @ U), 4.0, [langevin_step(a, 0.0)] * n)
    check_moments(r.samples, MU, U, m, v)
    # the known ULA bias: stationary variance lam / (1 - a / (2 lam)), reached after enough steps
    torch.testing.assert_close(v, lam / (1 - a / (2 * lam)), rtol=2e-3, atol=0)


def test_annealed_langevin_gaussian_exact_moments():
    p, lam, U = gaussian(1)
    sch = NoiseSchedule(20.0, 0.05, 12)
    T, eps = 25, 0.5 * 0.05**2
    g = torch.Generator().manual_seed(3)
    x0 = p.sample(2500, sigma=20.0, generator=g)  # exactly q_{sigma_max}: y0 ~ N(0, lam + 400)
    r = annealed_langevin(exact_score_fn(p), x0, sch, eps=eps, n_steps_each=T, generator=g)
    assert r.nfe == 12 * T + 1
    steps = [langevin_step(eps * s**2 / 0.05**2, s) for s in sch.sigmas.tolist() for _ in range(T)]
    m, v = predicted_moments(lam, torch.zeros(3), lam + 400.0, steps + [denoise_step(0.05)])
    check_moments(r.samples, MU, U, m, v)
    torch.testing.assert_close(v, lam, rtol=0.1, atol=0)  # and that is close to Sigma: the sampler works
    assert torch.allclose(torch.cov(r.samples.T), p.covs[0], rtol=0.15, atol=0.1)


def pc_levels(sde, n_steps, t_min):
    return [float(sde.sigma(t)) for t in np.linspace(1.0, t_min, n_steps + 1)]


@pytest.mark.parametrize("n, denoise", [(100, True), (100, False), (8, True)])
def test_pc_predictor_only_gaussian_exact_moments(n, denoise):
    # n = 8: coarse steps, far from Sigma but still exactly predicted (sharp against off-by-one levels)
    p, lam, U = gaussian(2)
    sde = VESDE(20.0, 0.05)
    g = torch.Generator().manual_seed(4)
    x0 = sde.prior_sample(2500, 3, generator=g, dtype=torch.float64)  # y0 ~ N(-U^T mu, 400)
    r = pc_sampler(exact_score_fn(p), x0, sde, n_steps=n, n_corrector=0, denoise=denoise, generator=g)
    assert r.nfe == n + denoise
    sig = pc_levels(sde, n, 1e-3)
    steps = [((lambda lam, s=s, dv=s**2 - t**2: 1 - dv / (lam + s**2)), s**2 - t**2) for s, t in zip(sig[:-1], sig[1:])]
    m, v = predicted_moments(lam, -(MU @ U), 400.0, steps + ([denoise_step(sig[-1])] if denoise else []))
    check_moments(r.samples, MU, U, m, v)
    if n < 100:
        return
    torch.testing.assert_close(v, lam, rtol=0.08, atol=0)  # 100 steps: within 6% of Sigma
    torch.testing.assert_close(m, torch.zeros(3, dtype=torch.float64), rtol=0, atol=0.01)


def test_pc_with_corrector_recovers_gaussian():
    p, lam, U = gaussian(3)
    sde = VESDE(20.0, 0.05)
    g = torch.Generator().manual_seed(5)
    x0 = p.sample(2000, sigma=20.0, generator=g)
    r = pc_sampler(exact_score_fn(p), x0, sde, n_steps=60, snr=0.16, n_corrector=1, generator=g)
    assert r.nfe == 60 * 2 + 1
    x = r.samples
    assert torch.all((x.mean(0) - MU).abs() < 5 * torch.sqrt(torch.diag(p.covs[0]) / 2000) + 0.03)
    C = torch.cov(x.T)
    assert torch.allclose(C, p.covs[0], rtol=0.12, atol=0.12), C


def test_pc_one_step_by_hand():
    # corrector a = 2 (snr mean_n|z_n| / mean_n|s_n|)^2, x + a s + sqrt(2a) z, then the predictor, same noise draws
    sde = VESDE(7.0, 0.2)
    A = torch.tensor([[-1.0, 0.3], [0.3, -0.5]], dtype=torch.float64)
    score = lambda x, s: (x @ A) / (1 + s[:, None] ** 2)
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = pc_sampler(score, x0, sde, n_steps=1, snr=0.3, t_min=0.25, denoise=False,
                   generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    s0, s1 = 7.0, float(sde.sigma(0.25))
    sig0 = torch.full((6,), s0, dtype=torch.float64)
    s, z = score(x0, sig0), torch.randn(6, 2, generator=g, dtype=torch.float64)
    a = 2 * (0.3 * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2
    x = x0 + a * s + torch.sqrt(2 * a) * z
    x = x + (s0**2 - s1**2) * score(x, sig0) + math.sqrt(s0**2 - s1**2) * torch.randn(6, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(r.samples, x, rtol=1e-12, atol=1e-12)
    assert r.nfe == 2


@pytest.mark.parametrize("denoise", [False, True])
def test_probability_flow_ode_is_the_exact_gaussian_map(denoise):
    # dx/dt = 1/2 dsigma^2/dt (Sigma + sigma^2)^{-1} (x - mu) keeps (Sigma + sigma(t)^2)^{-1/2} (x - mu) constant
    p, lam, U = gaussian(4)
    sde = VESDE(20.0, 0.05)
    g = torch.Generator().manual_seed(6)
    x0 = p.sample(500, sigma=20.0, generator=g)
    r = probability_flow_ode(exact_score_fn(p), x0, sde, rtol=1e-6, atol=1e-6, t_min=1e-3, denoise=denoise)
    s_end = float(sde.sigma(1e-3))
    factor = torch.sqrt((lam + s_end**2) / (lam + 400.0))
    if denoise:
        factor = factor * lam / (lam + s_end**2)
    expected = MU + ((x0 - MU) @ U * factor) @ U.T
    torch.testing.assert_close(r.samples, expected, rtol=0, atol=2e-4)
    assert r.nfe > 10 and r.trajectory is None
    assert torch.allclose(torch.cov(r.samples.T), p.covs[0], rtol=0.25, atol=0.15)


# -- the NCSN toy: mode weights ------------------------------------------------------------------------
def test_annealed_recovers_mode_weights_plain_langevin_does_not():
    p = two_mode_mixture()  # 0.8 at +(5,5), 0.2 at -(5,5)
    sf = exact_score_fn(p)
    g = torch.Generator().manual_seed(0)
    x0 = box(2000, g)
    plain = langevin(sf, x0, sigma=0.0, step_size=0.1, n_steps=200, generator=g).samples
    sch = NoiseSchedule(20.0, 0.1, 10)
    ann = annealed_langevin(sf, x0, sch, eps=0.2 * 0.1**2, n_steps_each=40, generator=g).samples
    w_plain, w_ann = (plain.sum(1) > 0).double().mean(), (ann.sum(1) > 0).double().mean()
    assert abs(w_ann - 0.8) < 0.05, w_ann
    assert abs(w_plain - 0.5) < 0.06, w_plain  # stuck with the basins of the uniform start
    # both put the particles into the modes (unit std around +-(5, 5))
    for x in (plain, ann):
        centre = torch.where((x.sum(1) > 0)[:, None], p.means[0], p.means[1])
        assert abs(float(((x - centre) ** 2).sum(1).mean()) - 2.0) < 0.35


# -- training-free sampling ------------------------------------------------------------------------
def test_estimator_score_views_match_batched_prediction():
    p, _, _ = gaussian(5, d=2)
    g = torch.Generator().manual_seed(7)
    data = p.sample(150, generator=g)
    sig = torch.tensor([3.0, 1.0, 0.3], dtype=torch.float64)
    q = 2 * torch.randn(13, 2, generator=g, dtype=torch.float64)
    for name in sorted(steinops.ESTIMATORS):
        es = EstimatorScore(name, data, sig, max_samples=61, generator=g)
        assert es.noisy.shape == (3, 61, 2) and es.estimator.scores_.shape == (3, 61, 2)
        assert es._views is not None, name  # the cheap per-level path is used
        full = es.estimator.predict(q.expand(3, 13, 2))
        for l, s in enumerate(sig.tolist()):
            torch.testing.assert_close(es(q, torch.full((13,), s * (1 + 1e-8))), full[l], rtol=1e-9, atol=1e-10)
        mixed = torch.tensor([3.0, 0.3] * 6 + [1.0], dtype=torch.float64)
        ref = torch.stack([full[[0, 2] * 6 + [1]][i, i] for i in range(13)])
        torch.testing.assert_close(es(q, mixed), ref)
    with pytest.raises(ValueError, match="sigma"):
        es(q, 2.0)
    # all data, no subsampling; float32 queries come back float32
    es = EstimatorScore(steinops.score_estimator("stein", eta=0.1), data, sig, generator=g)
    assert es.noisy.shape == (3, 150, 2) and es(q.float(), 1.0).dtype == torch.float32


def test_training_free_sampler_recovers_gaussian_roughly():
    mu = torch.tensor([1.0, -1.0], dtype=torch.float64)
    p, lam, U = gaussian(6, d=2, mu=mu)
    g = torch.Generator().manual_seed(8)
    data = p.sample(600, generator=g)
    sch = NoiseSchedule(6.0, 0.3, 10)
    x0 = sch.sigma_max * torch.randn(400, 2, generator=g, dtype=torch.float64)
    r = training_free_sampler("stein", data, sch, x0, eps=0.5 * 0.3**2, n_steps_each=20, max_samples=300,
                              generator=g, record_every=50)
    assert r.nfe == 10 * 20 + 1 and r.trajectory.shape == (5, 400, 2)
    x = r.samples
    assert torch.isfinite(x).all()
    # Kernel estimates vanish far from the fitted samples, so a few tail particles of a coarse level get no
    # pull at the next, finer one and stay stranded (measured: 1-2 %): check that they are few and the bulk
    # is roughly right (measured: bulk covariance up to ~40 % too wide; the exact score gives Sigma within 10 %).
    y = (x - mu) @ U
    bulk = (y**2 / (lam + 0.3**2)).sum(1) < 30.0
    assert bulk.double().mean() > 0.97, bulk.double().mean()
    assert torch.all((x[bulk].mean(0) - mu).abs() < 0.2), x[bulk].mean(0)
    C = torch.cov(x[bulk].T)
    assert torch.allclose(C, p.covs[0], rtol=0.45, atol=0.15), (C, p.covs[0])


# -- trajectories, determinism, registry ------------------------------------------------------------
def test_trajectories_shapes_and_determinism():
    p = two_mode_mixture()
    sf = exact_score_fn(p)
    x0 = box(9, torch.Generator().manual_seed(0)).float()
    sde = VESDE(20.0, 0.1)
    runs = {
        "langevin": (lambda gen: langevin(sf, x0, sigma=0.5, step_size=0.1, n_steps=7, generator=gen, record_every=3), 3),
        "annealed": (lambda gen: annealed_langevin(sf, x0, [3.0, 1.0, 0.3], eps=1e-3, n_steps_each=4, generator=gen,
                                                   record_every=5), 3),
        "pc": (lambda gen: pc_sampler(sf, x0, sde, n_steps=5, generator=gen, record_every=2), 3),
        "pc1": (lambda gen: pc_sampler(sf, x0, sde, n_steps=5, generator=gen, record_every=1, denoise=False), 6),
    }
    for name, (run, T) in runs.items():
        a, b = run(torch.Generator().manual_seed(11)), run(torch.Generator().manual_seed(11))
        assert isinstance(a, SampleResult) and a.samples.dtype == torch.float32 and a.samples.shape == (9, 2)
        assert a.trajectory.shape == (T, 9, 2), name
        torch.testing.assert_close(a.trajectory[0], x0)
        assert torch.equal(a.samples, b.samples) and torch.equal(a.trajectory, b.trajectory)
        c = run(torch.Generator().manual_seed(12))
        assert not torch.equal(a.samples, c.samples)
    a = runs["pc1"][0](torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.trajectory[-1], a.samples)  # no denoising: the last state is the sample
    o = probability_flow_ode(sf, x0, sde, record_every=1)
    assert o.trajectory.shape[1:] == (9, 2) and o.trajectory.shape[0] >= 3 and o.samples.dtype == torch.float32
    torch.testing.assert_close(o.trajectory[0], x0)
    torch.testing.assert_close(o.trajectory[-1], o.samples)
    o2 = probability_flow_ode(sf, x0, sde, record_every=2)
    assert o2.trajectory.shape[0] == (o.trajectory.shape[0] - 1) // 2 + 1
    assert torch.equal(o.samples, o2.samples)  # deterministic


def test_progress_bar_and_registry(capsys):
    sf = exact_score_fn(two_mode_mixture())
    x0 = torch.zeros(4, 2)
    langevin(sf, x0, sigma=1.0, step_size=0.1, n_steps=3, progress=True)
    probability_flow_ode(sf, x0, VESDE(5.0, 0.5), progress=True)
    assert set(SAMPLERS) == {"langevin", "annealed", "pc", "ode", "training_free"}
    assert SAMPLERS["pc"] is pc_sampler and SAMPLERS["training_free"] is training_free_sampler


def test_zero_score_corrector_does_not_blow_up():
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    r = pc_sampler(lambda x, s: torch.zeros_like(x), x0, VESDE(2.0, 0.5), n_steps=3, generator=torch.Generator())
    assert torch.isfinite(r.samples).all()


# -- bad arguments -----------------------------------------------------------------------------------------
SF = exact_score_fn(two_mode_mixture())
X0 = torch.zeros(4, 2)
SDE = VESDE(5.0, 0.5)


@pytest.mark.parametrize("call, name", [
    (lambda: langevin(SF, X0, sigma=1.0, step_size=0.0, n_steps=3), "step_size"),
    (lambda: langevin(SF, X0, sigma=1.0, step_size=-1.0, n_steps=3), "step_size"),
    (lambda: langevin(SF, X0, sigma=-1.0, step_size=0.1, n_steps=3), "sigma"),
    (lambda: langevin(SF, X0, sigma=1.0, step_size=0.1, n_steps=0), "n_steps"),
    (lambda: langevin(SF, X0, sigma=1.0, step_size=0.1, n_steps=2.5), "n_steps"),
    (lambda: langevin(SF, X0, sigma=1.0, step_size=0.1, n_steps=True), "n_steps"),
    (lambda: langevin(SF, torch.zeros(4), sigma=1.0, step_size=0.1, n_steps=3), "x0"),
    (lambda: langevin(SF, torch.full((4, 2), float("nan")), sigma=1.0, step_size=0.1, n_steps=3), "x0"),
    (lambda: langevin(SF, np.zeros((4, 2)), sigma=1.0, step_size=0.1, n_steps=3), "x0"),
    (lambda: langevin(SF, torch.zeros(4, 2, dtype=torch.long), sigma=1.0, step_size=0.1, n_steps=3), "x0"),
    (lambda: langevin("nope", X0, sigma=1.0, step_size=0.1, n_steps=3), "score_fn"),
    (lambda: langevin(SF, X0, sigma=1.0, step_size=0.1, n_steps=3, record_every=-1), "record_every"),
    (lambda: langevin(SF, X0, sigma=1.0, step_size=0.1, n_steps=3, generator=0), "generator"),
    (lambda: langevin(lambda x, s: x[:, :1], X0, sigma=1.0, step_size=0.1, n_steps=3), "score_fn"),
    (lambda: annealed_langevin(SF, X0, [1.0, 2.0], eps=0.1, n_steps_each=2), "sigmas"),
    (lambda: annealed_langevin(SF, X0, [1.0, 0.0], eps=0.1, n_steps_each=2), "sigmas"),
    (lambda: annealed_langevin(SF, X0, [], eps=0.1, n_steps_each=2), "sigmas"),
    (lambda: annealed_langevin(SF, X0, [[1.0]], eps=0.1, n_steps_each=2), "sigmas"),
    (lambda: annealed_langevin(SF, X0, [1.0, 0.5], eps=0.0, n_steps_each=2), "eps"),
    (lambda: annealed_langevin(SF, X0, [1.0, 0.5], eps=0.1, n_steps_each=0), "n_steps_each"),
    (lambda: pc_sampler(SF, X0, "ve", n_steps=3), "sde"),
    (lambda: pc_sampler(SF, X0, SDE, n_steps=0), "n_steps"),
    (lambda: pc_sampler(SF, X0, SDE, n_steps=3, snr=0.0), "snr"),
    (lambda: pc_sampler(SF, X0, SDE, n_steps=3, n_corrector=-1), "n_corrector"),
    (lambda: pc_sampler(SF, X0, SDE, n_steps=3, t_min=1.0), "t_min"),
    (lambda: probability_flow_ode(SF, X0, SDE, rtol=0.0), "rtol"),
    (lambda: probability_flow_ode(SF, X0, SDE, atol=-1.0), "atol"),
    (lambda: probability_flow_ode(SF, X0, SDE, t_min=-0.1), "t_min"),
    (lambda: probability_flow_ode(SF, X0, SDE, method="Euler"), "method"),
    (lambda: probability_flow_ode(SF, X0, None), "sde"),
    (lambda: EstimatorScore("nope", torch.randn(10, 2), [1.0]), "estimator"),
    (lambda: EstimatorScore(42, torch.randn(10, 2), [1.0]), "estimator"),
    (lambda: EstimatorScore("stein", torch.randn(10), [1.0]), "data"),
    (lambda: EstimatorScore("stein", torch.randn(10, 2), [1.0], max_samples=1), "max_samples"),
    (lambda: training_free_sampler("stein", torch.randn(10, 2), [1.0], X0, eps=0.0, n_steps_each=2), "eps"),
])
def test_bad_arguments_raise_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()

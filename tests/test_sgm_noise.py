"""Noise schedules (NCSNv2 rules), the VE SDE, the score MLP and the weight EMA."""
import math

import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import norm

from steinops.sgm import VESDE, NoiseSchedule, ScoreMLP, ema_model
from steinops.sgm.noise import DEFAULT_LEVELS, max_pairwise_distance, ncsnv2_ratio, ncsnv2_step_size


def technique4(eps, gamma, s_min, T):
    s2 = s_min**2
    r = 1 - eps / s2
    c = 2 * eps / (s2 - s2 * r**2)
    return r ** (2 * T) * (gamma**2 - c) + c


def test_geometric_levels():
    s = NoiseSchedule(17.0, 0.03, 7)
    r = s.sigmas[:-1] / s.sigmas[1:]
    assert s.sigmas[0].item() == pytest.approx(17.0) and s.sigmas[-1].item() == pytest.approx(0.03)
    assert torch.allclose(r, torch.full_like(r, s.ratio), rtol=1e-12)
    assert len(s) == 7 and s.sigmas.dtype == torch.float64


def test_ncsnv2_rules_from_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(333, 2, generator=g) * torch.tensor([4.0, 0.5])
    s = NoiseSchedule.ncsnv2(x, sigma_min=0.01)
    assert s.sigma_max == pytest.approx(pdist(x.double().numpy()).max(), rel=1e-12)
    assert s.n_levels == DEFAULT_LEVELS  # technique 2 has no root in 2-D
    assert ncsnv2_ratio(2) is None
    for D in (30, 784, 3072):  # technique 2 holds at the root
        gam = ncsnv2_ratio(D)
        a = math.sqrt(2 * D)
        assert norm.cdf(a * (gam - 1) + 3 * gam) - norm.cdf(a * (gam - 1) - 3 * gam) == pytest.approx(0.5, abs=1e-9)
    x = torch.randn(50, 784, generator=g)
    s = NoiseSchedule.ncsnv2(x, sigma_min=0.01)
    assert s.ratio <= ncsnv2_ratio(784) + 1e-12 and s.n_levels == math.ceil(math.log(s.sigma_max / 0.01) / math.log(ncsnv2_ratio(784))) + 1
    assert NoiseSchedule.ncsnv2(x, n_levels=5, sigma_max=9.0).sigmas[0].item() == pytest.approx(9.0)


def test_max_pairwise_distance_subsamples_large_sets():
    x = torch.randn(5000, 3, generator=torch.Generator().manual_seed(0))
    d = max_pairwise_distance(x, max_points=1000, generator=torch.Generator().manual_seed(1))
    assert 0.8 * pdist(x[:1000].numpy()).max() < d <= pdist(x.double().numpy()).max() + 1e-9


def test_step_size_minimises_technique4_and_matches_the_paper():
    # NCSNv2 on CIFAR-10: gamma = 1.0376 (232 levels from 50 to 0.01), T = 5 -> eps = 6.2e-6
    assert ncsnv2_step_size(1.0376, 0.01, 5) == pytest.approx(6.2e-6, rel=0.02)
    for gamma, s_min, T in ((2.3, 0.01, 100), (1.27, 0.1, 7), (1.05, 0.02, 3)):
        eps = ncsnv2_step_size(gamma, s_min, T)
        v = technique4(eps, gamma, s_min, T)
        assert v >= 1 and v <= technique4(eps * 1.05, gamma, s_min, T) and v <= technique4(eps / 1.05, gamma, s_min, T)
    assert NoiseSchedule(20, 0.01, 10).langevin_step_size(100) == pytest.approx(
        ncsnv2_step_size(NoiseSchedule(20, 0.01, 10).ratio, 0.01, 100))


def test_vesde():
    sde = VESDE(25.0, 0.02)
    assert sde.sigma(0.0) == pytest.approx(0.02) and sde.sigma(1.0) == pytest.approx(25.0)
    t = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad((sde.sigma(t) ** 2).sum(), t)
    assert torch.allclose(sde.g2(t.detach()), d, rtol=1e-12)
    p = sde.prior_sample(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert p.std().item() == pytest.approx(25.0, rel=0.05)


@pytest.mark.parametrize("kw, match", [
    (dict(sigma_max=1.0, sigma_min=1.0, n_levels=3), "sigma_min"),
    (dict(sigma_max=1.0, sigma_min=2.0, n_levels=3), "sigma_min"),
    (dict(sigma_max=-1.0, sigma_min=0.1, n_levels=3), "sigma_max"),
    (dict(sigma_max=1.0, sigma_min=float("nan"), n_levels=3), "sigma_min"),
    (dict(sigma_max=1.0, sigma_min=0.1, n_levels=1), "n_levels"),
])
def test_bad_schedules(kw, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kw)


def test_score_mlp_shapes_and_sigma_scaling():
    torch.manual_seed(0)
    m = ScoreMLP(3, hidden=16, depth=2)
    x = torch.randn(7, 3)
    s = torch.rand(7) + 0.1
    out = m(x, s)
    assert out.shape == (7, 3)
    # output divided by sigma: scaling sigma while freezing the embedding's input scales the output by 1/c
    fixed = m.embed(s)
    m.embed.forward = lambda sig: fixed
    assert torch.allclose(m(x, 2 * s), out / 2, rtol=1e-6)
    del m.embed.forward
    assert torch.allclose(m(x, s[0].item()), m(x, s[0].expand(7)))
    with pytest.raises(ValueError, match="x must"):
        m(torch.randn(7, 2), s)
    with pytest.raises(ValueError, match="sigma"):
        m(x, torch.rand(6))
    with pytest.raises(ValueError, match="activation"):
        ScoreMLP(2, activation="relu6")
    with pytest.raises(ValueError, match="hidden"):
        ScoreMLP(2, hidden=0)


def test_ema_is_an_exponential_average():
    torch.manual_seed(0)
    m = ScoreMLP(2, hidden=8, depth=1)
    ema = ema_model(m, decay=0.9)
    ema.update_parameters(m)  # first update copies
    w0 = m.out.weight.detach().clone()
    with torch.no_grad():
        m.out.weight.add_(1.0)
    ema.update_parameters(m)
    assert torch.allclose(ema.module.out.weight, 0.9 * w0 + 0.1 * (w0 + 1.0), atol=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):
        ema_model(m, 1.0)

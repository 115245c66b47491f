"""Tests of steinops.sgm.objectives: perturb, the six objectives against closed forms on Gaussian data with a
linear (per-level) score model, their shared optimum, the JVP path against double backward, images, errors."""
import dataclasses
import math

import pytest
import torch
from torch import nn

import steinops
from steinops.bandwidth import median_distance
from steinops.sgm import ScoreMLP
from steinops.sgm.objectives import (
    OBJECTIVES, NoisyBatch, draw_projections, get_objective, perturb, score_and_vjv,
)

DT = torch.float64


class LevelLinear(nn.Module):
    """s(x, sigma) = A_l x + b_l with l the level of sigma (one linear field per noise level)."""

    def __init__(self, sigmas, A, b):
        super().__init__()
        self.register_buffer("sigmas", sigmas.clone())
        self.A, self.b = nn.Parameter(A.clone()), nn.Parameter(b.clone())

    def forward(self, x, sigma):
        idx = (sigma[:, None] - self.sigmas[None]).abs().argmin(-1)
        return torch.einsum("nij,nj->ni", self.A[idx], x) + self.b[idx]


class ImageLinear(nn.Module):
    """A LevelLinear model acting on images (N, C, H, W) through their flattening."""

    def __init__(self, flat):
        super().__init__()
        self.flat = flat

    def forward(self, x, sigma):
        return self.flat(x.flatten(1), sigma).view_as(x)


def gaussian(d, gen):
    mu = torch.randn(d, generator=gen, dtype=DT)
    Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))[0]
    Sigma = Q @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=DT)) @ Q.T
    return mu, Sigma


def sample(mu, Sigma, n, gen):
    return mu + torch.randn(n, mu.numel(), generator=gen, dtype=DT) @ torch.linalg.cholesky(Sigma).T


def same_level_batch(x, sigma, G, gen):
    """A NoisyBatch of G groups all at level sigma (to average many groups of one level)."""
    m = x.shape[0] // G
    clean = x[: G * m].reshape(G, m, *x.shape[1:])
    noise = torch.randn(clean.shape, generator=gen, dtype=x.dtype)
    return NoisyBatch(clean, clean + sigma * noise, noise, torch.full((G,), sigma, dtype=x.dtype),
                      torch.zeros(G, dtype=torch.long))


def split(batch, parts):
    """Split a batch (along the samples of each group) into `parts` independent batches."""
    m = batch.noisy.shape[1] // parts
    cut = lambda t, i: t[:, i * m:(i + 1) * m]  # noqa: E731
    return [NoisyBatch(cut(batch.clean, i), cut(batch.noisy, i), cut(batch.noise, i), batch.sigma, batch.level)
            for i in range(parts)]


# ---------------------------------------------------------------------------------------------- perturb
def test_perturb_groups_shapes_remainder_and_noise():
    gen = torch.Generator().manual_seed(0)
    sigmas = torch.tensor([3.0, 1.5, 0.7, 0.2, 0.05], dtype=DT)
    x = torch.randn(103, 3, dtype=torch.float32)
    b = perturb(x, sigmas, 4, generator=gen)
    assert b.noisy.shape == b.clean.shape == b.noise.shape == (4, 25, 3)  # 103 = 4 * 25 + 3 dropped
    assert b.sigma.shape == (4,) and b.sigma.dtype == torch.float32 and b.level.dtype == torch.long
    assert len(set(b.level.tolist())) == 4
    torch.testing.assert_close(b.sigma, sigmas[b.level].float())
    torch.testing.assert_close(b.clean.reshape(100, 3), x[:100], rtol=0, atol=0)
    torch.testing.assert_close(b.noisy, b.clean + b.sigma[:, None, None] * b.noise, rtol=0, atol=0)
    # more levels asked than exist: G = L; images keep their shape
    img = perturb(torch.randn(11, 2, 3, 4), sigmas[:2], 7, generator=gen)
    assert img.noisy.shape == (2, 5, 2, 3, 4) and sorted(img.level.tolist()) == [0, 1]
    torch.testing.assert_close(img.noisy, img.clean + img.sigma.view(2, 1, 1, 1, 1) * img.noise, rtol=0, atol=0)
    # deterministic given the generator
    b2 = perturb(x, sigmas, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b.noisy, b2.noisy) and torch.equal(b.level, b2.level)


def test_perturb_levels_uniform_and_noise_standard():
    gen = torch.Generator().manual_seed(1)
    sigmas = torch.tensor([2.0, 1.0, 0.5, 0.25, 0.125], dtype=DT)
    counts = torch.zeros(5)
    for _ in range(1000):
        counts[perturb(torch.zeros(4, 1), sigmas, 2, generator=gen).level] += 1
    # each level is chosen with probability 2/5: 400 +- 15.5 (std)
    assert ((counts - 400).abs() < 70).all(), counts
    z = perturb(torch.zeros(20000, 2, dtype=DT), sigmas, 2, generator=gen).noise
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.02


@pytest.mark.parametrize("kwargs, match", [
    (dict(levels_per_step=0), "levels_per_step"), (dict(levels_per_step=1.5), "levels_per_step"),
    (dict(levels_per_step=True), "levels_per_step"), (dict(sigmas=torch.tensor([1.0, -1.0])), "sigmas"),
    (dict(sigmas=torch.ones(2, 2)), "sigmas"), (dict(x=torch.ones(5)), "x"),
    (dict(x=torch.ones(2, 3), levels_per_step=3), "x"), (dict(x=torch.ones(4, 2, dtype=torch.long)), "x"),
])
def test_perturb_bad_input(kwargs, match):
    args = dict(x=torch.ones(8, 2), sigmas=torch.tensor([1.0, 0.5, 0.1]), levels_per_step=2) | kwargs
    with pytest.raises(ValueError, match=match):
        perturb(args["x"], args["sigmas"], args["levels_per_step"])


# ---------------------------------------------------------------------------------------------- closed forms
def linear_setup(d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu, Sigma = gaussian(d, gen)
    sigmas = torch.tensor([1.3, 0.45], dtype=DT)
    A = 0.4 * torch.randn(2, d, d, generator=gen, dtype=DT) - 0.5 * torch.eye(d, dtype=DT)
    b = 0.3 * torch.randn(2, d, generator=gen, dtype=DT)
    return gen, mu, Sigma, sigmas, LevelLinear(sigmas, A, b)


def expected_loss(method, mu, Sigma, sigma, A, b):
    """Population value of one group's loss for s(x) = A x + b, x ~ N(mu, Sigma), x~ = x + sigma z."""
    s2, I = sigma**2, torch.eye(mu.numel(), dtype=DT)
    C = Sigma + s2 * I
    c = A @ mu + b
    if method == "dsm":  # sigma s + z = sigma A (x - mu) + (sigma^2 A + I) z + sigma c
        B = s2 * A + I
        return 0.5 * (s2 * c @ c + s2 * torch.trace(A @ Sigma @ A.T) + torch.trace(B @ B.T))
    # ssm, ssm-vr, sm: E_v v^T A v = tr A and E_v (v^T s)^2 = |s|^2
    return s2 * (torch.trace(A) + 0.5 * (c @ c + torch.trace(A @ C @ A.T)))


@pytest.mark.parametrize("method, options", [
    ("dsm", {}), ("ssm", {}), ("ssm", dict(projection="gaussian", n_projections=2)), ("ssm-vr", {}), ("sm", {}),
])
def test_expected_value_linear_model(method, options):
    gen, mu, Sigma, sigmas, model = linear_setup()
    batch = perturb(sample(mu, Sigma, 60000, gen), sigmas, 2, generator=gen)
    obj = get_objective(method, **options)
    vals = torch.stack([obj(model, part, generator=gen)[0].detach() for part in split(batch, 12)])
    est, se = vals.mean(), vals.std() / math.sqrt(len(vals))
    exact = torch.stack([expected_loss(method, mu, Sigma, float(batch.sigma[g]), model.A[batch.level[g]].detach(),
                                       model.b[batch.level[g]].detach()) for g in range(2)]).mean()
    assert se < 0.02 * exact.abs()  # the check has power
    assert (est - exact).abs() < 5 * se, (est, exact, se)


def ksd_closed_form(mu, C, h, A, b):
    """KSD^2 (RBF, bandwidth h) of N(mu, C) against s(x) = A x + b: E[delta(x)^T delta(x') k(x, x')] with
    delta = s - grad log q linear; the kernel is a Gaussian factor, so the expectation is one under
    N((mu, mu), S) with S = (blockdiag(C, C)^-1 + P)^-1 times sqrt(det S / det blockdiag(C, C))."""
    d = mu.numel()
    I = torch.eye(d, dtype=DT)
    D = A + torch.linalg.inv(C)
    e = b - torch.linalg.solve(C, mu)
    S0 = torch.block_diag(C, C)
    P = torch.cat([torch.cat([I, -I], 1), torch.cat([-I, I], 1)], 0) / h**2
    S = torch.linalg.inv(torch.linalg.inv(S0) + P)
    Z = torch.sqrt(torch.linalg.det(S) / torch.linalg.det(S0))
    dm = D @ mu + e
    return Z * (dm @ dm + torch.trace(D.T @ D @ S[d:, :d]))


@pytest.mark.parametrize("wrong", [True, False])
def test_ksd_expected_value_linear_model(wrong):
    gen = torch.Generator().manual_seed(3)
    d, sigma, h = 2, 0.8, 1.7
    mu, Sigma = gaussian(d, gen)
    C = Sigma + sigma**2 * torch.eye(d, dtype=DT)
    A = -torch.linalg.inv(C) + (0.3 * torch.randn(d, d, generator=gen, dtype=DT) if wrong else 0)
    b = torch.linalg.solve(C, mu) + (0.5 * torch.randn(d, generator=gen, dtype=DT) if wrong else 0)
    model = LevelLinear(torch.tensor([sigma], dtype=DT), A[None], b[None])
    obj = get_objective("ksd", bandwidth=h)
    vals = []
    for _ in range(10):  # 10 batches of 40 groups of 33 samples
        batch = same_level_batch(sample(mu, Sigma, 40 * 33, gen), sigma, 40, gen)
        vals.append(obj(model, batch)[0].detach())
    vals = torch.stack(vals)
    est, se = vals.mean(), vals.std() / math.sqrt(len(vals))
    exact = sigma**2 * ksd_closed_form(mu, C, h, A, b)
    if wrong:
        assert se < 0.05 * exact
    assert (est - exact).abs() < 5 * se + 1e-12, (est, exact, se)


def test_stein_expected_value_linear_model():
    """With many samples per level the Stein targets are close to the exact score, so the loss is close to
    1/2 sigma^2 E|s - grad log q_sigma|^2 for a wrong model, and small for the exact one."""
    gen = torch.Generator().manual_seed(4)
    d, sigma = 2, 0.7
    mu, Sigma = gaussian(d, gen)
    C = Sigma + sigma**2 * torch.eye(d, dtype=DT)
    Astar, bstar = -torch.linalg.inv(C), torch.linalg.solve(C, mu)
    D, e = 0.5 * torch.randn(d, d, generator=gen, dtype=DT), 0.5 * torch.randn(d, generator=gen, dtype=DT)
    batch = same_level_batch(sample(mu, Sigma, 4 * 500, gen), sigma, 4, gen)
    obj = get_objective("stein")
    wrong = obj(LevelLinear(torch.tensor([sigma], dtype=DT), (Astar + D)[None], (bstar + e)[None]), batch)[0]
    exact = 0.5 * sigma**2 * ((D @ mu + e) @ (D @ mu + e) + torch.trace(D @ C @ D.T))
    assert abs(float(wrong.detach() / exact) - 1) < 0.15, (wrong, exact)
    right = obj(LevelLinear(torch.tensor([sigma], dtype=DT), Astar[None], bstar[None]), batch)[0]
    assert right < 0.1 * exact


# ---------------------------------------------------------------------------------------------- shared optimum
def solve_quadratic(obj, model, batch, seed):
    """Exact minimiser of a loss quadratic in the parameters: its gradient is H theta + c."""
    params = [model.A, model.b]
    n = sum(p.numel() for p in params)

    def grad(theta):
        with torch.no_grad():
            model.A.copy_(theta[: model.A.numel()].view_as(model.A))
            model.b.copy_(theta[model.A.numel():].view_as(model.b))
        loss = obj(model, batch, generator=torch.Generator().manual_seed(seed))[0]  # same v at every call
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    g0 = grad(torch.zeros(n, dtype=DT))
    H = torch.stack([grad(torch.eye(n, dtype=DT)[i]) - g0 for i in range(n)], 1)
    theta = torch.linalg.solve(H, -g0)
    return theta[: model.A.numel()].view_as(model.A), theta[model.A.numel():].view_as(model.b)


def test_dsm_ssm_sm_share_the_optimum():
    gen, mu, Sigma, sigmas, model = linear_setup(d=2, seed=5)
    batch = perturb(sample(mu, Sigma, 2 * 20000, gen), sigmas, 2, generator=gen)
    sols = {}
    for method, opts in [("dsm", {}), ("ssm", dict(n_projections=2)), ("ssm-vr", {}), ("sm", {})]:
        sols[method] = solve_quadratic(get_objective(method, **opts), model, batch, seed=11)
    for g in range(2):
        l, s2 = int(batch.level[g]), float(batch.sigma[g]) ** 2
        C = Sigma + s2 * torch.eye(2, dtype=DT)
        Astar, bstar = -torch.linalg.inv(C), torch.linalg.solve(C, mu)
        for method, (A, b) in sols.items():
            assert (A[l] - Astar).abs().max() < 0.03, (method, A[l], Astar)
            assert (b[l] - bstar).abs().max() < 0.06, (method, b[l], bstar)
    # the score-matching family minimises the same sample quantity up to v-noise: sm and ssm-vr agree closely
    assert (sols["sm"][0] - sols["ssm-vr"][0]).abs().max() < 0.03


# ---------------------------------------------------------------------------------------------- JVP / trace paths
def mlp(d, seed=0):
    torch.manual_seed(seed)
    return ScoreMLP(d, hidden=24, depth=2, embed_dim=8).double()


def vjv_double_backward(model, x, sigma, v):
    xr = x.clone().requires_grad_()
    s = model(xr, sigma)
    jtv = torch.autograd.grad((v * s).sum(), xr, create_graph=True)[0]  # J^T v per sample
    return s, (jtv * v).sum(-1)


def test_score_and_vjv_matches_double_backward_values_and_parameter_grads():
    model = mlp(3)
    x, v = torch.randn(7, 3, dtype=DT), torch.randn(7, 3, dtype=DT)
    sigma = torch.rand(7, dtype=DT) + 0.2
    s, q = score_and_vjv(model, x, sigma, v)
    s_ref, q_ref = vjv_double_backward(model, x, sigma, v)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q, q_ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(7, dtype=DT)
    params = list(model.parameters())
    g = torch.autograd.grad((w * q).sum() + (s**2).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((w * q_ref).sum() + (s_ref**2).sum(), params, allow_unused=True)
    for a, r in zip(g, g_ref):
        r = torch.zeros_like(a) if r is None else r
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    assert any(float(a.abs().max()) > 0 for a in g)


@pytest.mark.parametrize("method, K, projection", [("ssm", 1, "rademacher"), ("ssm", 3, "gaussian"),
                                                   ("ssm-vr", 2, "rademacher")])
def test_ssm_objective_equals_double_backward_reference(method, K, projection):
    model = mlp(2, seed=1)
    sigmas = torch.tensor([2.0, 1.0, 0.3], dtype=DT)
    batch = perturb(torch.randn(23, 2, dtype=DT), sigmas, 3, generator=torch.Generator().manual_seed(2))
    obj = get_objective(method, n_projections=K, projection=projection)
    loss = obj(model, batch, generator=torch.Generator().manual_seed(9))[0]
    x, sig = batch.flat()
    v = draw_projections((K * x.shape[0], 2), projection, generator=torch.Generator().manual_seed(9), dtype=DT)
    xr, sr = x.repeat(K, 1), sig.repeat(K)
    s, q = vjv_double_backward(model, xr, sr, v)
    quad = (s**2).sum(-1) if method == "ssm-vr" else ((v * s).sum(-1)) ** 2
    ref = (sr**2 * (q + 0.5 * quad)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    for a, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params, allow_unused=True)):
        torch.testing.assert_close(a, torch.zeros_like(a) if r is None else r, rtol=1e-9, atol=1e-12)


def test_sm_exact_trace_matches_jacobian_reference():
    model = mlp(3, seed=2)
    batch = perturb(torch.randn(10, 3, dtype=DT), torch.tensor([1.5, 0.4], dtype=DT), 2,
                    generator=torch.Generator().manual_seed(0))
    loss = get_objective("sm")(model, batch)[0]
    x, sig = batch.flat()
    xr = x.clone().requires_grad_()
    s = model(xr, sig)
    tr = sum(torch.autograd.grad(s[:, i].sum(), xr, create_graph=True)[0][:, i] for i in range(3))
    ref = (sig**2 * (tr + 0.5 * (s**2).sum(-1))).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    for a, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params, allow_unused=True)):
        torch.testing.assert_close(a, torch.zeros_like(a) if r is None else r, rtol=1e-9, atol=1e-12)


def test_dsm_exact_value_for_given_noise():
    gen, mu, Sigma, sigmas, model = linear_setup(d=2, seed=6)
    batch = perturb(sample(mu, Sigma, 9, gen), sigmas, 2, generator=gen)
    loss = get_objective("dsm")(model, batch)[0]
    ref = 0
    for g in range(2):
        l, sg = batch.level[g], batch.sigma[g]
        s = batch.noisy[g] @ model.A[l].T + model.b[l]
        ref = ref + 0.5 * ((sg * s + batch.noise[g]) ** 2).sum(-1).mean() / 2
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- stein / ksd
def test_stein_uses_only_noisy_data_and_matches_reference():
    model = mlp(2, seed=3)
    batch = perturb(torch.randn(38, 2, dtype=DT), torch.tensor([1.0, 0.3], dtype=DT), 2,
                    generator=torch.Generator().manual_seed(1))
    poisoned = dataclasses.replace(batch, clean=torch.full_like(batch.clean, float("nan")),
                                   noise=torch.full_like(batch.noise, float("nan")))
    loss, diag = get_objective("stein", estimator="kef", bandwidth=1.3)(model, poisoned)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in diag.values()) and "target_rms" in diag
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    m = batch.group_size  # the objective's default regularisation: the least-regularised grid value
    g = steinops.score_estimator("kef", bandwidth=1.3, lam=0.01 / m).fit(batch.noisy).scores_
    x, sig = batch.flat()
    ref = (0.5 * sig**2 * ((model(x, sig) - g.reshape(-1, 2)) ** 2).sum(-1)).mean()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    assert not g.requires_grad


def test_stein_state_dict_resumes_bit_exactly():
    model = mlp(2, seed=4)
    gen = torch.Generator().manual_seed(5)
    sigmas = torch.tensor([1.0, 0.5, 0.2], dtype=DT)
    b1, b2 = (perturb(torch.randn(48, 2, dtype=DT), sigmas, 3, generator=gen) for _ in range(2))
    make = lambda: get_objective("stein", bandwidth=steinops.AutoTune(warm_start=True, seed=0))  # noqa: E731
    a = make()
    a(model, b1)
    state = a.state_dict()
    assert state["n_fits"] == 1 and state["last_tuned"] is not None
    loss_a = a(model, b2)[0]
    c = make()
    c.load_state_dict(state)
    loss_c = c(model, b2)[0]
    assert torch.equal(loss_a, loss_c)
    assert c.state_dict()["n_fits"] == 2
    with pytest.raises(ValueError, match="n_fits"):
        make().load_state_dict({"last_tuned": None})


def test_ksd_objective_matches_reference_with_median_bandwidth():
    model = mlp(2, seed=5)
    batch = perturb(torch.randn(45, 2, dtype=DT), torch.tensor([1.2, 0.6, 0.3], dtype=DT), 3,
                    generator=torch.Generator().manual_seed(3))
    loss, diag = get_objective("ksd", kernel="imq")(model, batch)
    x, sig = batch.flat()
    s = model(x, sig).reshape(3, 15, 2)
    ref = (batch.sigma**2 * steinops.ksd(batch.noisy, s, kernel="imq", bandwidth="median")).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    loss.backward()
    assert any(float(p.grad.abs().max()) > 0 for p in model.parameters())


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("method, options", [("dsm", {}), ("ssm", dict(n_projections=2)), ("ssm-vr", {}),
                                             ("sm", {}), ("stein", dict(bandwidth=2.0)), ("ksd", {})])
def test_images_equal_flattened(method, options):
    gen, mu, Sigma, sigmas, flat = linear_setup(d=12, seed=7)
    x = sample(mu, Sigma, 34, gen)
    b = perturb(x, sigmas, 2, generator=torch.Generator().manual_seed(0))
    bi = perturb(x.view(34, 3, 2, 2), sigmas, 2, generator=torch.Generator().manual_seed(0))
    assert bi.noisy.shape == (2, 17, 3, 2, 2)
    lf = get_objective(method, **options)(flat, b, generator=torch.Generator().manual_seed(1))[0]
    li = get_objective(method, **options)(ImageLinear(flat), bi, generator=torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(li, lf, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- gradients, errors
@pytest.mark.parametrize("method", sorted(OBJECTIVES))
def test_every_objective_trains_a_float32_mlp(method):
    torch.manual_seed(0)
    model = ScoreMLP(2, hidden=16, depth=2, embed_dim=8)
    batch = perturb(torch.randn(40, 2), torch.tensor([2.0, 0.5]), 2, generator=torch.Generator().manual_seed(0))
    loss, diag = get_objective(method)(model, batch, generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in diag.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("name, options, match", [
    ("nope", {}, "method"), (3, {}, "method"),
    ("dsm", dict(n_projections=2), "n_projections"),
    ("ssm", dict(n_projections=0), "n_projections"), ("ssm", dict(n_projections=1.0), "n_projections"),
    ("ssm-vr", dict(n_projections=True), "n_projections"), ("ssm", dict(projection="sphere"), "projection"),
    ("ssm", dict(bandwidth=1.0), "bandwidth"),
    ("sm", dict(max_dim=0), "max_dim"), ("stein", dict(estimator="nope"), "estimator"),
    ("stein", dict(bandwidth="widest"), "bandwidth"), ("ksd", dict(kernel="laplace"), "kernel"),
    ("ksd", dict(bandwidth=-1.0), "bandwidth"), ("ksd", dict(bandwidth="auto"), "bandwidth"),
])
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_objective(name, **options)


def test_bad_calls():
    model = ScoreMLP(2, hidden=8, depth=1, embed_dim=4)
    small = perturb(torch.randn(14, 2), torch.tensor([1.0, 0.5]), 2)  # groups of 7 < 8
    for method in ("stein", "ksd"):
        with pytest.raises(ValueError, match="min_group"):
            get_objective(method)(model, small)
    get_objective("dsm")(model, small)  # fine for dsm
    with pytest.raises(TypeError, match="batch"):
        get_objective("dsm")(model, small.noisy)
    big = perturb(torch.randn(8, 70), torch.tensor([1.0]), 1)
    with pytest.raises(ValueError, match="max_dim"):
        get_objective("sm")(ScoreMLP(70, hidden=8, depth=1, embed_dim=4), big)
    with pytest.raises(ValueError, match="shape"):
        get_objective("dsm")(lambda x, s: x[:, :1], small)


@pytest.mark.parametrize("estimator,knob,value", [("stein", "eta", 0.01), ("kef", "lam", 0.01 / 41),
                                                   ("ssge", "eig_mass", 0.999), ("nu", "lam", 1e-4)])
def test_stein_targets_use_the_least_regularised_knob_unless_given(estimator, knob, value):
    batch = perturb(torch.randn(83, 2, dtype=DT), torch.tensor([2.0, 0.5], dtype=DT), 2,
                    generator=torch.Generator().manual_seed(2))
    obj = get_objective("stein", estimator=estimator)
    obj(mlp(2, seed=1), batch)
    assert getattr(obj.estimator, knob) == pytest.approx(value)
    given = get_objective("stein", estimator=estimator, **{knob: 0.5 if knob != "lam" else 0.05})
    given(mlp(2, seed=1), batch)
    assert getattr(given.estimator, knob) == (0.5 if knob != "lam" else 0.05)
    if estimator == "ssge":  # a fixed eigenpair count is left alone too
        fixed = get_objective("stein", estimator="ssge", n_eigen=3)
        fixed(mlp(2, seed=1), batch)
        assert fixed.estimator.n_eigen_.max() <= 3


def test_low_bias_targets_have_less_bias_than_the_one_shot_default():
    """The mean over groups of the in-sample estimate at a fixed tail point z (z plus m - 1 fresh samples of a
    standard Gaussian) is much closer to the exact score -z with the objective's eta than with the one-shot
    default 0.3, whose ridge shrinks the estimate towards zero where the density is low (measured: bias
    0.02 vs 0.40 at |z| = 2.5; near the centre both are small and 0.3 can be slightly better)."""
    gen = torch.Generator().manual_seed(11)
    R, m = 400, 128
    z = torch.tensor([[2.5, 0.0]], dtype=DT)
    x = torch.cat([z.expand(R, 1, 2), torch.randn(R, m - 1, 2, generator=gen, dtype=DT)], 1)
    bias = {}
    for eta in (0.01, 0.3):
        g = steinops.score_estimator("stein", eta=eta).fit(x).scores_[:, 0]
        bias[eta] = float((g.mean(0) + z[0]).norm())
    low = get_objective("stein").estimator.knob_least_regularised(m)
    assert low == 0.01 and bias[0.01] < 0.3 * bias[0.3], bias


def test_sigma_bandwidth_caps_the_rule_per_group():
    sig = torch.tensor([5.0, 0.2], dtype=DT)
    batch = perturb(3 * torch.randn(64, 2, dtype=DT), sig, 2, generator=torch.Generator().manual_seed(3))
    obj = get_objective("stein", sigma_bandwidth=4.0)
    obj(mlp(2, seed=2), batch)
    rule = 2 * median_distance(batch.noisy)
    expect = torch.minimum(rule, 4.0 * batch.sigma)
    torch.testing.assert_close(obj.estimator.bandwidth_, expect)
    assert bool((expect < rule).any()) and bool((expect == rule).any())  # the cap binds at one level only
    for bad in (0.0, -1.0, float("nan"), True, "4"):
        with pytest.raises(ValueError, match="sigma_bandwidth"):
            get_objective("stein", sigma_bandwidth=bad)
    with pytest.raises(ValueError, match="sigma_bandwidth"):
        get_objective("stein", sigma_bandwidth=2.0, bandwidth=steinops.AutoTune())


# ---------------------------------------------------------------------------------------------- window targets
class RecordingZero(nn.Module):
    """s = 0 (a leaf that keeps its gradient): the stein loss's gradient then hands back the targets,
    d loss / d s = sigma^2 (s - t) / (G m); records the inputs and levels the objective trained on."""

    def forward(self, x, sigma):
        self.x, self.sigma = x.detach(), sigma.detach()
        self.s = torch.zeros_like(x, requires_grad=True)
        return self.s


def targets_of(objective, batch, generator):
    model = RecordingZero()
    loss, diag = objective(model, batch, generator=generator)
    loss.backward()
    G, m = batch.noisy.shape[:2]
    t = -model.s.grad * (G * m) / model.sigma[:, None] ** 2
    return model.x, model.sigma, t, diag


def test_window_targets_train_the_coarser_level_against_exact_scores():
    """Each group with a coarser level gives targets for it at y ~ q_{sigma_c}; those targets are near the exact
    score of q_{sigma_c} (not of the group's own level); the finest level always keeps its regression targets."""
    from steinops.distributions import get_distribution
    dist = get_distribution("two_mode")
    gen = torch.Generator().manual_seed(11)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=DT)
    batch = perturb(dist.sample(4 * 384, generator=gen), sigmas, 4, generator=gen)
    obj = get_objective("stein", window_neff=5)
    x, sig, t, diag = targets_of(obj, batch, gen)
    assert diag["window_groups"] == 0.75 and diag["window_neff"] >= 5
    levels = sorted(set(sig.tolist()))
    # every level once: 8, 4 and 2 from the next finer group's windows, the finest by regression
    assert {s: int((sig == s).sum()) for s in levels} == {1.0: 384, 2.0: 384, 4.0: 384, 8.0: 384}
    noisy = batch.noisy.reshape(-1, 2)
    for s_c in (2.0, 4.0, 8.0):
        win = (sig == s_c).nonzero()[:, 0]
        assert not any(bool((noisy == x[r]).all(-1).any()) for r in win[:20])  # fresh points y, not samples
        err = lambda s: float((t[win] - dist.score(x[win], s)).square().sum(-1).mean()  # noqa: E731
                              / dist.score(x[win], s).square().sum(-1).mean())
        assert err(s_c) < 0.15 and err(s_c) < 0.5 * err(s_c / 2), (s_c, err(s_c), err(s_c / 2))
    fine = (sig == 1.0).nonzero()[:, 0]
    assert torch.equal(x[fine], batch.noisy[batch.level == 3][0])  # the finest group regresses in-sample
    assert obj.state_dict()["window_neff"].shape == (4,)


def test_window_targets_regress_a_level_until_its_finer_level_was_seen():
    from steinops.distributions import get_distribution
    dist = get_distribution("two_mode")
    gen = torch.Generator().manual_seed(13)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=DT)
    full = perturb(dist.sample(4 * 64, generator=gen), sigmas, 4, generator=gen)
    keep = (full.level <= 1).nonzero()[:, 0]  # the groups of levels 8 and 4 only
    top = dataclasses.replace(full, clean=full.clean[keep], noisy=full.noisy[keep], noise=full.noise[keep],
                              sigma=full.sigma[keep], level=full.level[keep])
    fresh = get_objective("stein", window_neff=5)
    _, sig, _, _ = targets_of(fresh, top, gen)  # 8 from 4's windows; 4 regresses (level 2 never seen)
    assert sorted(sig.tolist()) == [4.0] * 64 + [8.0] * 64
    seen = get_objective("stein", window_neff=5)
    targets_of(seen, full, gen)
    _, sig, _, _ = targets_of(seen, top, gen)  # level 2 was seen dense enough: 4 waits for its windows
    assert sig.tolist() == [8.0] * 64
    restored = get_objective("stein", window_neff=5)
    restored.load_state_dict(seen.state_dict())
    assert targets_of(restored, top, gen)[1].tolist() == [8.0] * 64
    k = int((top.level == 0).nonzero()[0, 0])  # the coarsest level alone, already covered by level 4's windows
    only_top = dataclasses.replace(top, clean=top.clean[k:k + 1], noisy=top.noisy[k:k + 1],
                                   noise=top.noise[k:k + 1], sigma=top.sigma[k:k + 1], level=top.level[k:k + 1])
    assert targets_of(seen, only_top, gen)[1].tolist() == [8.0] * 64


def test_window_targets_fall_back_where_windows_are_empty_and_need_the_schedule():
    gen = torch.Generator().manual_seed(12)
    sigmas = torch.tensor([1.0, 0.01], dtype=DT)
    batch = perturb(torch.randn(64, 8, dtype=DT) * 10, sigmas, 2, generator=gen)  # sparse in 8-D at h ~ 1
    obj = get_objective("stein", window_neff=20)
    _, sig, _, diag = targets_of(obj, batch, gen)
    assert diag["window_groups"] == 0.0 and sorted(set(sig.tolist())) == [0.01, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        obj(RecordingZero(), dataclasses.replace(batch, sigmas=None))
    for bad in (0.5, -1, float("nan"), True, "20"):
        with pytest.raises(ValueError, match="window_neff"):
            get_objective("stein", window_neff=bad)


def test_window_targets_keep_autotune_on_the_whole_batch():
    """AutoTune reuses its choice only for a fixed batch shape, so with window targets it still fits every
    group (and regresses only those that need it): tune_every is honoured."""
    from steinops.distributions import get_distribution
    gen = torch.Generator().manual_seed(14)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=DT)
    obj = get_objective("stein", window_neff=5, bandwidth=steinops.AutoTune(warm_start=True, tune_every=3, seed=0))
    tunes = []
    real_tune = steinops.estimators.base.tune
    try:
        steinops.estimators.base.tune = lambda *a, **k: tunes.append(1) or real_tune(*a, **k)
        for _ in range(6):
            batch = perturb(get_distribution("two_mode").sample(4 * 32, generator=gen), sigmas, 4, generator=gen)
            _, sig, _, _ = targets_of(obj, batch, gen)
            assert obj.estimator._last_tuned["bandwidth_mult"].shape == (4,)
    finally:
        steinops.estimators.base.tune = real_tune
    assert len(tunes) == 2 and sorted(set(sig.tolist())) == [1.0, 2.0, 4.0, 8.0]

"""Tests of steinops.sgm.unet.ScoreUNet: shapes at 8x8 / 28x28 / 32x32, the 1/sigma output scaling, sigma
conditioning, zero initialisation, gradient flow, double backward and forward mode, batch independence,
float64, argument and input validation."""
import pytest
import torch

from steinops.sgm import ScoreUNet
from steinops.sgm.objectives import score_and_vjv
from steinops.sgm.unet import ResBlock, SelfAttention

SMALL = dict(width=8, channel_mult=(1, 2), n_res_blocks=1, groups=4)


def zero_initialised(model: ScoreUNet):
    """The modules the constructor sets to zero: each residual block's conv2, the attention projection,
    the output conv."""
    mods = [m.conv2 for m in model.modules() if isinstance(m, ResBlock)]
    mods += [m.proj for m in model.modules() if isinstance(m, SelfAttention)]
    return mods + [model.conv_out]


def perturbed(model: ScoreUNet, std: float = 0.1) -> ScoreUNet:
    """Re-initialise the zero-initialised convs with small random weights, so every path carries signal."""
    with torch.no_grad():
        for m in zero_initialised(model):
            for p in m.parameters():
                p.normal_(0.0, std)
    return model


@pytest.mark.parametrize("shape,kw", [
    ((1, 8, 8), dict(width=8, groups=4)),              # 8 -> 4 -> 2
    ((1, 28, 28), dict(width=8, groups=4)),            # 28 -> 14 -> 7
    ((3, 32, 32), dict(width=8, channel_mult=(1, 2), n_res_blocks=1, groups=4)),
])
def test_output_shape_and_zero_init(shape, kw):
    model = ScoreUNet(shape, **kw)
    x = torch.randn(3, *shape)
    out = model(x, torch.tensor([0.1, 1.0, 10.0]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # output conv and residual branches start at zero
    perturbed(model)
    out = model(x, torch.tensor([0.1, 1.0, 10.0]))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().min() > 0


def test_zero_initialised_modules_are_zero_and_others_are_not():
    model = ScoreUNet((1, 8, 8), **SMALL)
    zero = {id(p) for m in zero_initialised(model) for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in zero:
            assert torch.count_nonzero(p) == 0, name
        elif p.dim() > 1:  # weight matrices / kernels are randomly initialised
            assert torch.count_nonzero(p) > 0, name


def test_scalar_and_per_sample_sigma_agree():
    model = perturbed(ScoreUNet((1, 8, 8), **SMALL))
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(model(x, 0.7), model(x, torch.full((4,), 0.7)))
    torch.testing.assert_close(model(x, torch.tensor(0.7)), model(x, torch.full((4,), 0.7)))


def test_output_is_raw_network_output_divided_by_sigma():
    model = perturbed(ScoreUNet((1, 8, 8), **SMALL))
    raw = {}
    model.conv_out.register_forward_hook(lambda mod, inp, out: raw.update(out=out))
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 1.0, 20.0])
    out = model(x, sigma)
    assert raw["out"].abs().min() > 0
    torch.testing.assert_close(out * sigma[:, None, None, None], raw["out"])
    assert not torch.allclose(out, raw["out"])  # the division happened (sigma != 1 for two samples)


def test_depends_on_sigma():
    model = perturbed(ScoreUNet((1, 8, 8), **SMALL))
    x = torch.randn(2, 1, 8, 8)
    # Compare sigma * s (the raw network) so the explicit 1/sigma factor alone cannot make the difference.
    a = model(x, 1.0) * 1.0
    b = model(x, 1.05) * 1.05
    c = model(x, 1.0) * 1.0
    torch.testing.assert_close(a, c)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_batch_independence():
    # Training mode (where batch statistics would couple samples; dropout is 0) and float64, so that a
    # genuine coupling cannot hide below rounding-level tolerances.
    model = perturbed(ScoreUNet((1, 8, 8), **SMALL)).double().train()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    full = model(x, sigma)
    for i in range(5):
        torch.testing.assert_close(model(x[i:i + 1], sigma[i:i + 1]), full[i:i + 1], rtol=1e-10, atol=1e-12)
    # Replacing the other samples leaves sample 0's output unchanged.
    y = torch.cat([x[:1], 10 * torch.randn(4, 1, 8, 8, dtype=torch.float64)])
    torch.testing.assert_close(model(y, sigma)[0], full[0], rtol=1e-10, atol=1e-12)


def test_gradients_reach_every_parameter():
    model = perturbed(ScoreUNet((1, 8, 8), width=8, channel_mult=(1, 2, 2), n_res_blocks=1, groups=4))
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 3.0])
    (model(x, sigma) * torch.randn(3, 1, 8, 8)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_double_backward():
    model = perturbed(ScoreUNet((1, 8, 8), **SMALL)).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(x)
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    s = model(x, sigma)
    (jtv,) = torch.autograd.grad((v * s).sum(), x, create_graph=True)  # J^T v, differentiable in theta
    (jtv * v).sum().backward()  # v^T J v, as in sliced score matching
    for name, p in model.named_parameters():
        if name == "conv_out.bias":  # a constant offset of s: v^T J v does not depend on it
            assert p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    # The second-order gradient is numerically correct: central difference of v^T J v (computed by the
    # first-order forward-mode path) along a random parameter direction d, against <grad, d>.
    params = dict(model.named_parameters())
    d = {n: torch.randn_like(p) for n, p in params.items()}
    expected = sum(float((params[n].grad * d[n]).sum()) for n in params if params[n].grad is not None)

    def vjv_at(eps):
        shifted = {n: p.detach() + eps * d[n] for n, p in params.items()}
        shifted_model = lambda y, s_: torch.func.functional_call(model, shifted, (y, s_))  # noqa: E731
        return float(score_and_vjv(shifted_model, x.detach(), sigma, v)[1].sum())

    eps = 1e-6  # float64: truncation ~eps^2, rounding ~1e-16/eps, both far below rel=1e-5
    fd = (vjv_at(eps) - vjv_at(-eps)) / (2 * eps)
    assert fd == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_forward_mode_vjv_matches_double_backward():
    """objectives.score_and_vjv uses torch.func.jvp (forward mode) on the score network."""
    model = perturbed(ScoreUNet((1, 8, 8), **SMALL)).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    s, vjv = score_and_vjv(model, x, sigma, v)
    xr = x.clone().requires_grad_()
    (jtv,) = torch.autograd.grad((v * model(xr, sigma)).sum(), xr)
    torch.testing.assert_close(s, model(x, sigma))
    torch.testing.assert_close(vjv, (jtv * v).flatten(1).sum(1))
    vjv.sum().backward()  # reverse over forward reaches the parameters
    assert model.conv_out.weight.grad.abs().max() > 0


def test_float64():
    model = perturbed(ScoreUNet((1, 8, 8), **SMALL)).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out = model(x, 0.5)
    assert out.dtype == torch.float64
    out32 = model.float()(x.float(), 0.5)
    torch.testing.assert_close(out.float(), out32, rtol=1e-4, atol=1e-4)


def test_without_attention_and_with_dropout():
    model = ScoreUNet((1, 8, 8), attention=False, dropout=0.2, **SMALL)
    assert not any(isinstance(m, SelfAttention) for m in model.modules())
    assert any(isinstance(m, SelfAttention) for m in ScoreUNet((1, 8, 8), **SMALL).modules())
    perturbed(model)
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    torch.testing.assert_close(model(x, 1.0), model(x, 1.0))
    model.train()
    assert not torch.allclose(model(x, 1.0), model(x, 1.0))  # dropout is active in training


def test_parameter_count_is_reasonable():
    n = sum(p.numel() for p in ScoreUNet((1, 28, 28), width=32).parameters())
    assert 1_000_000 <= n <= 3_000_000
    assert sum(p.numel() for p in ScoreUNet((1, 8, 8), width=16).parameters()) < n / 2


@pytest.mark.parametrize("kwargs,name", [
    (dict(image_shape=(1, 28, 28), channel_mult=(1, 2, 2, 2)), "image_shape"),  # 28 not divisible by 8
    (dict(image_shape=(1, 8, 6), channel_mult=(1, 2, 2)), "image_shape"),        # 6 not divisible by 4
    (dict(image_shape=(8, 8)), "image_shape"),
    (dict(image_shape=(1, 0, 8)), "image_shape"),
    (dict(image_shape=(1, 8, 8), width=0), "width"),
    (dict(image_shape=(1, 8, 8), width=8.0), "width"),
    (dict(image_shape=(1, 8, 8), channel_mult=()), "channel_mult"),
    (dict(image_shape=(1, 8, 8), channel_mult=(1, 0)), "channel_mult"),
    (dict(image_shape=(1, 8, 8), n_res_blocks=0), "n_res_blocks"),
    (dict(image_shape=(1, 8, 8), embed_dim=0), "embed_dim"),
    (dict(image_shape=(1, 8, 8), dropout=1.0), "dropout"),
    (dict(image_shape=(1, 8, 8), groups=0), "groups"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ScoreUNet(**kwargs)


def test_bad_inputs():
    model = ScoreUNet((1, 8, 8), **SMALL)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 1, 8, 4), 1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(1, 8, 8), 1.0)
    x = torch.randn(2, 1, 8, 8)
    for sigma in (0.0, -1.0, torch.tensor([1.0, -0.5]), float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma"):
            model(x, sigma)
    with pytest.raises(ValueError, match="sigma"):
        model(x, torch.ones(3))


# torch.compile: not tested here. Checked by hand (width 8, 8x8, 1 thread on this 2-core CPU): the compiled
# forward matches eager to 1e-5, but compiling forward (~33 s) and backward (~38 s) exceeds the time budget
# of this file. The sigma value check is skipped while compiling (it would force a host sync / graph break).

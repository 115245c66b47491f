"""Image metrics (classifier features, FD, KID, nearest-neighbour memorisation check, image grids) and
the probability-flow likelihood in bits/dim."""
import math
import os

import numpy as np
import pytest
import torch

from steinops.sgm import image_metrics as im
from steinops.sgm.image_metrics import (FeatureClassifier, cached_classifier, frechet_distance, image_metrics,
                                        kernel_inception_distance, nearest_neighbour_ratios, save_image_grid,
                                        train_classifier)
from steinops.sgm.likelihood import bits_per_dim
from steinops.sgm.noise import VESDE
from steinops.sgm.samplers import network_score_fn


def _with_moments(n, mean, cov, seed):
    """n points whose SAMPLE mean and (N-1)-normalised sample covariance equal mean, cov exactly."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample cov = I
    return mean + z @ np.linalg.cholesky(cov).T


def _psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# ---- Fréchet distance ------------------------------------------------------------------------------------

def test_frechet_identical_sets_is_zero():
    a = torch.randn(500, 16, dtype=torch.float64) * 3 + 1
    scale = float(torch.cov(a.T).trace())
    assert frechet_distance(a, a) < 1e-6 * scale


def test_frechet_matches_closed_form_diagonal():
    F = 6
    mu_a, mu_b = np.arange(F) * 0.1, np.ones(F) * 0.3
    va, vb = np.linspace(0.5, 3.0, F), np.linspace(2.0, 0.2, F)
    a = _with_moments(400, mu_a, np.diag(va), 0)
    b = _with_moments(300, mu_b, np.diag(vb), 1)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert frechet_distance(torch.from_numpy(a), b) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_frechet_matches_eigh_formula_full_covariance():
    # tr (S_a S_b)^{1/2} = tr (S_a^{1/2} S_b S_a^{1/2})^{1/2}: a symmetric-PSD formula via eigh, independent of sqrtm
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((250, 5)) @ rng.standard_normal((5, 5)) + 0.7
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = _psd_sqrt(sa)
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb)
                - 2 * np.trace(_psd_sqrt(ra @ sb @ ra)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_grows_with_shift():
    a = torch.randn(400, 8, dtype=torch.float64)
    shifts = [0.25, 0.5, 1.0, 2.0]
    fds = [frechet_distance(a, a + c) for c in shifts]
    assert all(f > 0 for f in fds) and fds == sorted(fds)
    # same covariance: FD = |shift|^2 = F c^2 exactly
    assert fds == pytest.approx([8 * c**2 for c in shifts], rel=1e-6)


def test_frechet_validation():
    with pytest.raises(ValueError, match="feat_a"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="feat_b"):
        frechet_distance(torch.randn(5, 4), torch.randn(5))
    with pytest.raises(ValueError, match="feature dimension"):
        frechet_distance(torch.randn(5, 4), torch.randn(5, 3))


# ---- KID -------------------------------------------------------------------------------------------------

def test_kid_same_law_near_zero_and_shift_positive():
    x = torch.randn(2000, 16, dtype=torch.float64)
    same, _ = kernel_inception_distance(x[:1000], x[1000:], n_subsets=5, subset_size=500)
    shifted, std = kernel_inception_distance(x[:1000], x[1000:] + 0.5, n_subsets=5, subset_size=500)
    assert shifted > 0 and shifted > 10 * std
    assert abs(same) < 0.05 * shifted


def test_kid_identical_set_matches_formula():
    x = np.random.default_rng(3).standard_normal((60, 7))
    k = (x @ x.T / 7 + 1) ** 3
    m = 60
    expected = 2 * (k.sum() - np.trace(k)) / (m * (m - 1)) - 2 * k.sum() / m**2
    mean, std = kernel_inception_distance(x, x, n_subsets=4, subset_size=1000)  # capped at m: whole set
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == pytest.approx(0, abs=1e-12)


def test_kid_deterministic_and_validation():
    a, b = torch.randn(300, 4), torch.randn(200, 4) + 0.2
    assert kernel_inception_distance(a, b, subset_size=100, seed=5) == kernel_inception_distance(
        a, b, subset_size=100, seed=5)
    with pytest.raises(ValueError, match="n_subsets"):
        kernel_inception_distance(a, b, n_subsets=0)
    with pytest.raises(ValueError, match="feat_b"):
        kernel_inception_distance(a, torch.randn(1, 4))


# ---- nearest neighbours ----------------------------------------------------------------------------------

def test_nearest_neighbour_copies_and_fresh(monkeypatch):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(300, 1, 8, 8, generator=g)
    heldout = torch.rand(200, 1, 8, 8, generator=g)
    copies = nearest_neighbour_ratios(train[:50].clone(), train, heldout)
    assert copies["nn_ratio"] < 1e-6 and copies["frac_copies"] == 1.0
    assert copies["median_nn_sample"] == 0.0
    fresh = nearest_neighbour_ratios(torch.rand(200, 1, 8, 8, generator=g), train, heldout)
    assert 0.85 < fresh["nn_ratio"] < 1.15 and fresh["frac_copies"] == 0.0
    # small chunks (many cdist blocks) give the same numbers
    monkeypatch.setattr(im, "_CHUNK_ELEMENTS", 1000)
    assert nearest_neighbour_ratios(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(9)),
                                    train, heldout) == pytest.approx(nearest_neighbour_ratios(
                                        torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(9)),
                                        train, heldout.clone()))
    with pytest.raises(ValueError, match="heldout"):
        nearest_neighbour_ratios(train[:5], train, torch.rand(4, 1, 4, 4))
    with pytest.raises(ValueError, match="train"):
        nearest_neighbour_ratios(train[:5], train[:1], heldout)


# ---- classifier ------------------------------------------------------------------------------------------

def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(x))
    return x[:n], y[:n], x[n:], y[n:]


def test_classifier_on_digits():
    xtr, ytr, xte, yte = _digits()
    model, acc = train_classifier(xtr, ytr, heldout_images=xte, heldout_labels=yte, epochs=5)
    assert acc >= 0.9
    assert not model.training
    with torch.no_grad():
        assert model.features(xte[:7]).shape == (7, 128)
        assert model(xte[:7]).shape == (7, 10)


def _tiny_data(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(40) % 2
    x = torch.rand(40, 1, 8, 8, generator=g) * 0.3 + y.view(-1, 1, 1, 1) * 0.5
    return x[:32], y[:32], x[32:], y[32:]


def test_train_classifier_deterministic():
    xtr, ytr, xte, yte = _tiny_data(0)
    m1, a1 = train_classifier(xtr, ytr, heldout_images=xte, heldout_labels=yte, epochs=2, batch_size=8, seed=3)
    m2, a2 = train_classifier(xtr, ytr, heldout_images=xte, heldout_labels=yte, epochs=2, batch_size=8, seed=3)
    assert a1 == a2
    for (k, v), w in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(TypeError, match="labels"):
        train_classifier(xtr, ytr.float(), heldout_images=xte, heldout_labels=yte)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(xtr, ytr, heldout_images=xte, heldout_labels=yte, epochs=0)


def test_cached_classifier_trains_once_and_retrains_on_new_data(tmp_path, monkeypatch):
    calls = []
    original = im.train_classifier

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(im, "train_classifier", counting)
    data = _tiny_data(0)
    kw = dict(epochs=1, batch_size=16)
    m1, a1 = cached_classifier(tmp_path, "tiny", *data, **kw)
    path = tmp_path / "tiny.pt"
    assert path.exists() and len(calls) == 1
    mtime = os.stat(path).st_mtime_ns
    m2, a2 = cached_classifier(tmp_path, "tiny", *data, **kw)
    assert len(calls) == 1 and a2 == a1 and os.stat(path).st_mtime_ns == mtime
    assert not m2.training
    for v, w in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(v, w)
    cached_classifier(tmp_path, "tiny", *_tiny_data(1), **kw)  # other images: retrain
    assert len(calls) == 2
    cached_classifier(tmp_path, "tiny", *_tiny_data(1), epochs=2, batch_size=16)  # other options: retrain
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]  # no temporary files left
    with pytest.raises(ValueError, match="key"):
        cached_classifier(tmp_path, "a/b", *data, **kw)


def test_image_metrics_end_to_end():
    torch.manual_seed(0)
    clf = FeatureClassifier(1, 3, feature_dim=16).eval()
    g = torch.Generator().manual_seed(1)
    train, heldout = torch.rand(100, 1, 8, 8, generator=g), torch.rand(50, 1, 8, 8, generator=g)
    out = image_metrics(train[:60], train[:60], clf, train=train, heldout=heldout)
    # one set twice: FD 0; the unbiased KID of a set with itself is 2 (sum K / m - tr K) / (m (m - 1)) <= 0
    assert out["fd"] < 1e-6 and out["kid_mean"] <= 1e-12 and out["kid_std"] < 1e-12
    assert out["frac_copies"] == 1.0
    far = image_metrics(heldout, train * 0.5, clf)
    assert set(far) == {"fd", "kid_mean", "kid_std"} and far["fd"] > out["fd"]
    with pytest.raises(ValueError, match="train and heldout"):
        image_metrics(train, train, clf, train=train)


# ---- image grid ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_grid_png(tmp_path, channels):
    mpl_image = pytest.importorskip("matplotlib.image")
    imgs = torch.rand(10, channels, 8, 8) * 2 - 1
    path = save_image_grid(imgs, tmp_path / f"grid{channels}.png", value_range=(-1, 1), title="samples")
    arr = mpl_image.imread(path)
    assert arr.ndim == 3 and arr.shape[0] > 8 and arr.shape[1] > 8 and np.isfinite(arr).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"grid{channels}.png"]
    with pytest.raises(ValueError, match="images"):
        save_image_grid(torch.rand(2, 2, 8, 8), tmp_path / "bad.png")


# ---- bits per dimension ----------------------------------------------------------------------------------

def _gaussian_case(D=8, N=8, seed=0):
    """Data N(m, diag(s^2)) with the exact noisy score -(x - m) / (s^2 + sigma^2): its Jacobian is diagonal,
    so Rademacher probes (eps_i^2 = 1) give the exact trace and the only errors are the ODE solver's and
    the prior N(0, sigma_max^2 I) standing in for N(m, s^2 + sigma_max^2)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.linspace(-0.5, 0.5, D, dtype=torch.float64)
    s = torch.linspace(0.5, 1.5, D, dtype=torch.float64)
    sde = VESDE(100.0, 0.01)
    x = m + s * torch.randn(N, D, generator=g, dtype=torch.float64)

    def score(x, sigma):
        return -(x - m) / (s**2 + sigma.view(-1, 1) ** 2)

    var0 = s**2 + sde.sigma_min**2
    exact_nll = 0.5 * (torch.log(2 * math.pi * var0) + (x - m) ** 2 / var0).sum(1)
    return score, x, sde, exact_nll / (D * math.log(2))


def test_bits_per_dim_exact_gaussian():
    score, x, sde, expected = _gaussian_case()
    out = bits_per_dim(score, x, sde, bin_width=1.0, dequantize=False, generator=torch.Generator().manual_seed(0))
    assert out["bpd"].shape == (8,) and out["nfe"] > 0
    np.testing.assert_allclose(out["bpd"].numpy(), expected.numpy(), rtol=0.01)
    assert out["bpd_mean"] == pytest.approx(float(expected.mean()), rel=0.01)
    # Gaussian probes are unbiased but noisy (relative std ~ sqrt(2 / (D n_probes)) of the log-volume change,
    # several bits here). For this diagonal Jacobian their error is known exactly given the probes:
    # delta_gauss - delta_exact = sum_i (mean_k eps_ki^2 - 1) I_i with
    # I_i = int 1/2 g^2 / (s_i^2 + sigma^2) dt = 1/2 log((s_i^2 + sigma_max^2) / (s_i^2 + sigma_min^2)).
    P, D = 4, x.shape[1]
    gauss = bits_per_dim(score, x, sde, bin_width=1.0, dequantize=False, probe="gaussian", n_probes=P,
                         generator=torch.Generator().manual_seed(1))
    eps = torch.randn((P, *x.shape), generator=torch.Generator().manual_seed(1), dtype=x.dtype)  # the same draw
    s2 = torch.linspace(0.5, 1.5, D, dtype=torch.float64) ** 2
    integral = 0.5 * torch.log((s2 + sde.sigma_max**2) / (s2 + sde.sigma_min**2))
    shift = -((eps**2).mean(0) - 1) @ integral / (D * math.log(2))
    np.testing.assert_allclose(gauss["bpd"].numpy(), (expected + shift).numpy(), rtol=0.01)
    assert shift.abs().max() > 0.1  # the probe noise is visible: the check above is not vacuous
    # the bin width only adds -log2(bin_width) per dimension
    half = bits_per_dim(score, x, sde, bin_width=0.5, dequantize=False, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(half["bpd"].numpy(), out["bpd"].numpy() + 1.0, rtol=1e-10)


def test_bits_per_dim_dequantization_is_deterministic():
    score, x, sde, _ = _gaussian_case(D=4, N=4)
    # a nonlinear score so the probes matter too
    nonlinear = lambda x, sigma: score(x, sigma) + 0.1 * torch.tanh(x) ** 2
    kw = dict(bin_width=1 / 255, rtol=1e-4, atol=1e-4, n_probes=2)
    a = bits_per_dim(nonlinear, x, sde, generator=torch.Generator().manual_seed(7), **kw)
    b = bits_per_dim(nonlinear, x, sde, generator=torch.Generator().manual_seed(7), **kw)
    c = bits_per_dim(nonlinear, x, sde, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a["bpd"], b["bpd"]) and not torch.equal(a["bpd"], c["bpd"])
    # the same as dequantising by hand (u first, then the probes, from one generator)
    g = torch.Generator().manual_seed(7)
    u = torch.rand(x.shape, generator=g, dtype=x.dtype)
    manual = bits_per_dim(nonlinear, x + kw["bin_width"] * u, sde, generator=g, dequantize=False, **kw)
    np.testing.assert_allclose(manual["bpd"].numpy(), a["bpd"].numpy(), rtol=1e-12)


def test_bits_per_dim_network_images():
    class TinyScore(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, sigma):
            return torch.tanh(self.conv(x)) / sigma.view(-1, 1, 1, 1) - x / (1 + sigma.view(-1, 1, 1, 1) ** 2)

    net = TinyScore().eval()
    x = torch.rand(3, 1, 4, 4)
    out = bits_per_dim(net, x, VESDE(5.0, 0.01), bin_width=1 / 255, generator=torch.Generator().manual_seed(0),
                       rtol=1e-3, atol=1e-3)
    assert out["bpd"].shape == (3,) and torch.isfinite(out["bpd"]).all()
    with pytest.raises(ValueError, match="score_fn"):  # no_grad wrapper: no divergence possible
        bits_per_dim(network_score_fn(net), x, VESDE(5.0, 0.01), bin_width=1 / 255)


def test_bits_per_dim_validation():
    score, x, sde, _ = _gaussian_case(D=2, N=2)
    with pytest.raises(ValueError, match="x must"):
        bits_per_dim(score, x.long(), sde, bin_width=1.0)
    with pytest.raises(ValueError, match="x must"):
        bits_per_dim(score, x[0], sde, bin_width=1.0)
    with pytest.raises(ValueError, match="bin_width"):
        bits_per_dim(score, x, sde, bin_width=0.0)
    with pytest.raises(ValueError, match="n_probes"):
        bits_per_dim(score, x, sde, bin_width=1.0, n_probes=0)
    with pytest.raises(ValueError, match="probe"):
        bits_per_dim(score, x, sde, bin_width=1.0, probe="sphere")
    with pytest.raises(ValueError, match="t_min"):
        bits_per_dim(score, x, sde, bin_width=1.0, t_min=0.0)
    with pytest.raises(ValueError, match="sde"):
        bits_per_dim(score, x, "ve", bin_width=1.0)

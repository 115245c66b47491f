"""train/plots.py: every figure is a valid, non-empty PNG of a sensible size; bad input raises ValueError."""
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from steinops.distributions import concentric_rings, random_subspace_gmm, two_mode_mixture
from train import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path, min_w=300, min_h=200):
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_h and img.shape[1] >= min_w
    # not a blank canvas: several distinct colours
    assert np.unique(img.reshape(-1, img.shape[-1])[::97], axis=0).shape[0] > 10
    return img


@pytest.fixture(scope="module")
def dist():
    return two_mode_mixture()


def perturbed(dist, eps=0.3):
    def f(x, sigma):
        assert x.shape[0] == sigma.shape[0] and sigma.dim() == 1
        return dist.score(x, float(sigma[0])) + eps * torch.sin(x.flip(-1))

    return f


def test_score_field(tmp_path, dist):
    p = plots.score_field(tmp_path / "sub" / "field.png", perturbed(dist), dist, 0.5, lim=9, grid=13, title="t")
    img = check_png(p, min_w=1000)
    assert img.shape[1] > img.shape[0]  # two panels side by side


def test_score_field_module_and_high_dim(tmp_path):
    """A float32 nn.Module is evaluated in its own dtype; d > 2 draws the slice of the first two coords."""
    d3 = two_mode_mixture(3)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(-0.5, dtype=torch.float32))

        def forward(self, x, sigma):
            assert x.dtype == torch.float32 and sigma.dtype == torch.float32
            return self.w * x

    check_png(plots.score_field(tmp_path / "f3.png", Lin(), d3, 1.0, lim=(-8, 8), grid=7))


def test_samples_over_density(tmp_path, dist):
    g = torch.Generator().manual_seed(0)
    s = {"exact": dist.sample(517, generator=g), "bad": dist.sample(333, generator=g) * 1.7,
         "float32": dist.sample(50, generator=g).float()}
    check_png(plots.samples_over_density(tmp_path / "s.png", s, dist, lim=9, title="x"))
    # singular law at sigma = 0: background drawn at a small positive sigma instead of raising
    rings = concentric_rings()
    check_png(plots.samples_over_density(tmp_path / "r.png", {"r": rings.sample(200, generator=g)}, rings, lim=4))
    # d > 2 uses a histogram of the first two coordinates
    sub = random_subspace_gmm(D=5, k=2)
    check_png(plots.samples_over_density(tmp_path / "h.png", {"a": sub.sample(100, 0.1, generator=g)}, sub,
                                         lim=((-6, 6), (-5, 7)), sigma=0.1))


def test_trajectories(tmp_path, dist):
    g = torch.Generator().manual_seed(1)
    T, N = 9, 41
    tr = torch.cumsum(torch.randn(T, N, 2, generator=g, dtype=torch.float64), 0)
    check_png(plots.trajectories(tmp_path / "t.png", tr, dist, lim=9, n_show=7))
    check_png(plots.trajectories(tmp_path / "t1.png", tr[:1], dist, lim=9, n_show=100))  # T = 1, n_show > N


def test_curves(tmp_path):
    rows = [{"step": i, "loss": 1.0 / (i + 1), "ksd": (0.5 - i / 100) if i % 3 else None, "name": "a"}
            for i in range(80)]
    rows.append({"loss": 3.0})  # no step: skipped
    check_png(plots.curves(tmp_path / "c.png", rows, keys=["loss", "ksd", "absent"], title="curves"))
    check_png(plots.curves(tmp_path / "c2.png", rows[:5], keys=["loss"], logy=False))
    with pytest.raises(ValueError, match="keys"):
        plots.curves(tmp_path / "c3.png", rows, keys=["absent"])
    with pytest.raises(ValueError, match="rows"):
        plots.curves(tmp_path / "c4.png", [], keys=["loss"])
    with pytest.raises(ValueError, match="keys"):
        plots.curves(tmp_path / "c5.png", rows, keys=[])


def test_fisher_per_level(tmp_path):
    sig = torch.logspace(1, -2, 7, dtype=torch.float64)
    per = {"dsm": (0.1 * sig**-0.5).tolist(), "stein": [0.2, 0.1, 0.0, float("nan"), 0.05, 0.04, 0.1]}
    check_png(plots.fisher_per_level(tmp_path / "fl.png", per, sig, title="f"))
    with pytest.raises(ValueError, match="per_method"):
        plots.fisher_per_level(tmp_path / "x.png", {}, sig)
    with pytest.raises(ValueError, match="per_method"):
        plots.fisher_per_level(tmp_path / "x.png", {"a": [1.0, 2.0]}, sig)
    with pytest.raises(ValueError, match="sigmas"):
        plots.fisher_per_level(tmp_path / "x.png", {"a": [1.0]}, [0.0])


def test_comparison(tmp_path, dist):
    g = torch.Generator().manual_seed(2)
    s = {m: dist.sample(300, generator=g) + 0.2 * i for i, m in enumerate(["dsm", "ssm", "stein"])}
    table = {"dsm": {"mmd": 0.01, "energy": 0.02}, "ssm": {"mmd": 0.03}, "stein": {"mmd": 0.005, "sw": 0.1},
             "extra": {"mmd": 1.0}}
    img = check_png(plots.comparison(tmp_path / "cmp.png", s, dist, table, lim=9))
    assert img.shape[1] > img.shape[0]
    check_png(plots.comparison(tmp_path / "cmp2.png", {"only": s["dsm"]}, dist, {}, lim=9))  # no table


def test_bad_input(tmp_path, dist):
    x = dist.sample(10)
    with pytest.raises(ValueError, match="samples"):
        plots.samples_over_density(tmp_path / "a.png", {}, dist, lim=5)
    with pytest.raises(ValueError, match="samples"):
        plots.samples_over_density(tmp_path / "a.png", {"a": torch.zeros(10, 3)}, dist, lim=5)
    with pytest.raises(ValueError, match="samples"):
        plots.comparison(tmp_path / "a.png", {}, dist, {}, lim=5)
    with pytest.raises(ValueError, match="samples"):
        plots.comparison(tmp_path / "a.png", {"a": x[:, :1]}, dist, {}, lim=5)
    with pytest.raises(ValueError, match="trajectory"):
        plots.trajectories(tmp_path / "a.png", x, dist, lim=5)
    with pytest.raises(ValueError, match="trajectory"):
        plots.trajectories(tmp_path / "a.png", torch.zeros(3, 4, 5), dist, lim=5)
    with pytest.raises(ValueError, match="lim"):
        plots.samples_over_density(tmp_path / "a.png", {"a": x}, dist, lim=-1)
    with pytest.raises(ValueError, match="lim"):
        plots.samples_over_density(tmp_path / "a.png", {"a": x}, dist, lim=((0, 1), (2, 1)))
    with pytest.raises(ValueError, match="dim"):
        plots.samples_over_density(tmp_path / "a.png", {"a": x[:, :1]}, two_mode_mixture(1), lim=5)
    with pytest.raises(ValueError, match="score_fn"):
        plots.score_field(tmp_path / "a.png", lambda x, s: x[:, :1], dist, 1.0, lim=5, grid=5)
    with pytest.raises(ValueError, match="grid"):
        plots.score_field(tmp_path / "a.png", perturbed(dist), dist, 1.0, lim=5, grid=1)
    with pytest.raises(ValueError, match="sigma"):
        plots.score_field(tmp_path / "a.png", perturbed(dist), concentric_rings(), 0.0, lim=5, grid=5)
    assert not list(tmp_path.glob("*.png"))  # nothing written on bad input

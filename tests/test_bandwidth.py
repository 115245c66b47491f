"""Bandwidth rules: the compiled per-set median against the cdist/numpy path and a brute-force reference, the
k-nearest-neighbour rule against its definition, and their failure modes."""
import itertools
import warnings

import numpy as np
import pytest
import torch

import steinops.bandwidth as bw
from steinops.ops.backends import compiled_extension


def brute_median(x):
    """Lower median of the pairwise distances of each set, from the definition (float64 numpy)."""
    x = x.double().numpy()
    out = np.empty(x.shape[:-2])
    for idx in np.ndindex(*x.shape[:-2]):
        pts = x[idx]
        d = sorted(np.linalg.norm(a - b) for a, b in itertools.combinations(pts, 2))
        out[idx] = d[(len(d) - 1) // 2]
    return torch.from_numpy(out)


@pytest.mark.parametrize("shape", [(2, 1), (3, 2), (4, 37, 2), (2, 3, 128, 5), (1, 64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_median_matches_the_definition_on_both_paths(shape, dtype, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 100.0).to(dtype)  # offset: centring matters
    ref = brute_median(x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    got = bw.median_distance(x)
    assert got.dtype == dtype and got.shape == shape[:-2]
    assert torch.allclose(got.double(), ref, rtol=tol * 10)
    monkeypatch.setattr(bw, "_compiled_cpu", lambda x: False)  # the cdist + numpy path
    assert torch.allclose(bw.median_distance(x).double(), ref, rtol=tol * 10)


@pytest.mark.skipif(compiled_extension() is None, reason="steinops._C not built")
@pytest.mark.parametrize("case", ["lattice", "wide_range", "clusters"])
def test_compiled_median_selection_is_exact(case):
    """The compiled op selects on a coarse histogram key first: ties (lattice: many equal distances), keys
    spread over many binades, and a rank that falls in a crowded bin must still give the exact lower median."""
    g = torch.Generator().manual_seed(7)
    if case == "lattice":
        x = torch.randint(0, 4, (3, 61, 2), generator=g).double()
    elif case == "wide_range":
        x = torch.randn(3, 73, 3, generator=g, dtype=torch.float64) * torch.logspace(-4, 4, 73, dtype=torch.float64)[:, None]
    else:  # two tight clusters far apart: the within-cluster distances share a few bins
        x = torch.randn(3, 90, 2, generator=g, dtype=torch.float64) * 1e-3
        x[:, 50:] += 10.0
    med, _ = torch.ops.steinops_C.pairwise_median(x)
    assert torch.allclose(med, brute_median(x), rtol=1e-13, atol=0)


@pytest.mark.skipif(compiled_extension() is None, reason="steinops._C not built")
def test_the_compiled_median_is_used_for_small_cpu_sets():
    x = torch.randn(3, 50, 2)
    assert bw._compiled_cpu(x) and not bw._compiled_cpu(torch.randn(3, 50, 17))
    med, mean = torch.ops.steinops_C.pairwise_median(x)
    assert med.dtype == mean.dtype == torch.float64 and med.shape == mean.shape == (3,)
    for b in range(3):
        assert torch.allclose(mean[b], torch.pdist(x[b].double()).mean())
    with pytest.raises(RuntimeError, match="x must be 3-D"):
        torch.ops.steinops_C.pairwise_median(torch.randn(4, 2))


@pytest.mark.parametrize("compiled", [True, False])
def test_coincident_points_fall_back_or_raise(compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(bw, "_compiled_cpu", lambda x: False)
    x = torch.zeros(1, 10, 2)
    x[0, 8:] = 1.0  # 28 + 1 of 45 pairs coincide
    with pytest.warns(RuntimeWarning, match="mean pairwise distance"):
        h = bw.median_distance(x)
    assert torch.allclose(h.double(), torch.pdist(x[0].double()).mean()[None])
    with pytest.raises(ValueError, match="all samples of a set coincide"):
        bw.median_distance(torch.ones(2, 5, 3))


def test_non_finite_input_gives_nan_not_a_hang():
    x = torch.randn(2, 40, 2)
    x[1, 3, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = bw.median_distance(x)
    assert torch.isfinite(h[0]) and torch.isnan(h[1])


def brute_knn(x, k):
    x = x.double()
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    d = d + torch.diag_embed(torch.full(d.shape[:-1], float("inf"), dtype=d.dtype))  # exclude the point itself
    return d.sort(-1).values[..., k - 1].median(-1).values


@pytest.mark.parametrize("shape, k", [((3, 2), None), ((2, 37, 2), None), ((2, 37, 2), 5), ((128, 3), None)])
def test_knn_distance_matches_the_definition(shape, k):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    M = shape[-2]
    kk = min(M - 1, int(np.ceil(np.sqrt(M)))) if k is None else k
    assert torch.allclose(bw.knn_distance(x, k), brute_knn(x, kk))
    assert torch.allclose(bw.select_bandwidth(x, "knn"), bw.KNN_FACTOR * bw.knn_distance(x))


def test_knn_follows_the_local_spacing_not_the_global_spread():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-20.0, 0.0], [20.0, 0.0], [0.0, 20.0], [0.0, -20.0]])
    x = (centres.repeat_interleave(32, 0) + 0.5 * torch.randn(128, 2, generator=g))
    assert bw.knn_distance(x) < 1.0 < 20.0 < bw.median_distance(x)


def test_knn_rejects_duplicates_and_tiny_sets():
    with pytest.raises(ValueError, match="coincident neighbours"):
        bw.knn_distance(torch.zeros(20, 2))
    with pytest.raises(ValueError, match="at least 2 points"):
        bw.knn_distance(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="one of"):
        bw.select_bandwidth(torch.randn(5, 2), "nearest")

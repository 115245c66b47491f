"""How bandwidth and eta drive the Stein gradient estimator's error, against EXACT scores.

For each case (kernel, d, sigma, M) it draws M samples of a Gaussian mixture convolved with
N(0, sigma^2 I), and evaluates the in-sample SGE's relative Fisher error

    E|G - grad log q_sigma|^2 / E|grad log q_sigma|^2

on a grid of bandwidths (multiples of the median pairwise distance) and ridge values eta (one
eigendecomposition of K per bandwidth serves every eta). It then scores fixed rules by their
ratio to the grid's best: the steinops default, the literature's ``median / sqrt(2 log(M+1))`` with
eta = 0.01, and ``median`` with eta = 1. Results: a table on stdout and JSON.

    python benchmarks/hyperparameters.py [--quick] [--out benchmarks/results/hyperparameters.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import steinops
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import steinops
from steinops.bandwidth import MEDIAN_FACTOR, median_distance
from steinops.distributions import GaussianMixture, two_mode_mixture
from steinops.estimators.stein import DEFAULT_ETA

MULTS = [0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6]
ETAS = [1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]


def mixture(d: int) -> GaussianMixture:
    """d = 2: the NCSN toy (0.8/0.2 at +-(5,5)); otherwise 0.7/0.3 at +-1.5 (1, ..., 1), unit std."""
    if d == 2:
        return two_mode_mixture(2)
    mu = torch.full((d,), 1.5, dtype=torch.float64)
    return GaussianMixture([0.7, 0.3], torch.stack([mu, -mu]), [1.0, 1.0])


def error_grid(x, exact, kernel, bandwidths, etas):
    """(len(bandwidths), len(etas)) relative Fisher errors of the in-sample SGE."""
    out = torch.empty(len(bandwidths), len(etas), dtype=torch.float64)
    denom = (exact**2).sum()
    for i, h in enumerate(bandwidths):
        K, S = steinops.gram(x, kernel=kernel, bandwidth=float(h), stein_term=True)
        lam, U = torch.linalg.eigh(K)
        US = U.T @ S
        for j, eta in enumerate(etas):
            G = -U @ (US / (lam + eta)[:, None])
            out[i, j] = ((G - exact) ** 2).sum() / denom
    return out


def rule_errors(x, exact, kernel, med):
    M = x.shape[0]
    rules = {
        "default": (MEDIAN_FACTOR * med, DEFAULT_ETA),
        "literature (median/sqrt(2 log(M+1)), eta=0.01)": (med / math.sqrt(2 * math.log(M + 1)), 0.01),
        "median, eta=1": (med, 1.0),
    }
    return {name: float(error_grid(x, exact, kernel, [h], [eta])[0, 0]) for name, (h, eta) in rules.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 10, 50])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--samples", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--kernels", nargs="+", default=["rbf", "imq"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny grid for a smoke test")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "hyperparameters.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.dims, a.sigmas, a.samples, a.kernels = [2], [0.5], [128], ["rbf"]
    torch.manual_seed(a.seed)
    rows = []
    t0 = time.time()
    for kernel, d, sigma, M in itertools.product(a.kernels, a.dims, a.sigmas, a.samples):
        dist = mixture(d)
        x = dist.sample(M, sigma)
        exact = dist.score(x, sigma)
        med = float(median_distance(x))
        grid = error_grid(x, exact, kernel, [m * med for m in MULTS], ETAS)
        best = float(grid.min())
        i, j = divmod(int(grid.argmin()), len(ETAS))
        rules = rule_errors(x, exact, kernel, med)
        rows.append(dict(kernel=kernel, d=d, sigma=sigma, M=M, best=best, best_mult=MULTS[i], best_eta=ETAS[j],
                         rules=rules, grid=grid.tolist()))
        print(f"{kernel} d={d:<3} sigma={sigma:<4} M={M:<5} best {best:.4f} (x{MULTS[i]} median, eta {ETAS[j]}) | "
              + " | ".join(f"{n.split(' ')[0]} {e:.4f} ({e / best:.2f}x)" for n, e in rules.items()), flush=True)
    summary = {}
    for name in rows[0]["rules"]:
        ratios = torch.tensor([r["rules"][name] / r["best"] for r in rows])
        summary[name] = dict(geo_mean_ratio=float(ratios.log().mean().exp()), max_ratio=float(ratios.max()))
        print(f"{name:50s} geo-mean ratio to grid best {summary[name]['geo_mean_ratio']:.2f}, worst {summary[name]['max_ratio']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(dict(settings=vars(a), mults=MULTS, etas=ETAS, rows=rows, summary=summary,
                       machine=platform.machine(), torch=torch.__version__, seconds=time.time() - t0), f, indent=1)
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

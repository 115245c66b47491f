"""Short estimator demo (the estimators alone; ``make demo`` runs the train driver, ``python -m train.demo``).

Samples the NCSN toy mixture (0.8 / 0.2 at +-(5, 5), unit std) convolved with Gaussian noise at
several levels, estimates the scores of every level in ONE batched ``steinops.stein_score`` call, and
prints the relative Fisher error ``E|g - grad log q_sigma|^2 / E|grad log q_sigma|^2`` against the
exact score, in-sample and at fresh query points, next to the literature's bandwidth rule.

    python -m steinops.demo [--samples 2048] [--dim 2] [--kernel rbf] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import torch

import steinops
from steinops.distributions import two_mode_mixture
from steinops.ops.backends import resolve


def fisher_error(est, exact):
    return float(((est - exact) ** 2).sum((-2, -1)).sum() / (exact**2).sum((-2, -1)).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2048, help="samples per noise level (M)")
    p.add_argument("--queries", type=int, default=512, help="fresh query points per level for the out-of-sample error")
    p.add_argument("--dim", type=int, default=2, help="dimension d of the mixture")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0, 5.0], help="noise levels")
    p.add_argument("--kernel", choices=["rbf", "imq"], default="rbf")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    dtype = getattr(torch, a.dtype)
    dist = two_mode_mixture(a.dim)
    x = torch.stack([dist.sample(a.samples, s) for s in a.sigmas]).to(dtype)  # (L, M, d)
    q = torch.stack([dist.sample(a.queries, s) for s in a.sigmas]).to(dtype)
    exact_x = torch.stack([dist.score(x[i].double(), s) for i, s in enumerate(a.sigmas)])
    exact_q = torch.stack([dist.score(q[i].double(), s) for i, s in enumerate(a.sigmas)])

    print(f"steinops {steinops.__version__} | backend {resolve(None, x.device)} | {a.kernel} kernel | "
          f"{len(a.sigmas)} noise levels x M = {a.samples} samples, d = {a.dim}, {a.dtype}")
    t0 = time.perf_counter()
    est = steinops.SteinScoreEstimator(a.kernel).fit(x)
    g_in = est.scores_
    t1 = time.perf_counter()
    g_out = est.predict(q)
    t2 = time.perf_counter()
    lit = steinops.stein_score(x, kernel=a.kernel, bandwidth="svgd", eta=0.01)
    print(f"fit (all levels, one call): {1e3 * (t1 - t0):.0f} ms; predict {a.queries} queries/level: {1e3 * (t2 - t1):.0f} ms\n")
    print(f"{'sigma':>7} {'bandwidth':>10} {'in-sample':>10} {'queries':>10} {'literature rule':>16}")
    for i, s in enumerate(a.sigmas):
        print(f"{s:7.2f} {float(est.bandwidth_[i]):10.3f} {fisher_error(g_in[i].double(), exact_x[i]):10.4f} "
              f"{fisher_error(g_out[i].double(), exact_q[i]):10.4f} {fisher_error(lit[i].double(), exact_x[i]):16.4f}")
    print("\nrelative Fisher error E|g - grad log q_sigma|^2 / E|grad log q_sigma|^2 (0 is perfect); "
          "'literature rule' = median/sqrt(2 log(M+1)) bandwidth with eta = 0.01")


if __name__ == "__main__":
    main()

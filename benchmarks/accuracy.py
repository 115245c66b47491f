"""Accuracy of every registered score estimator against EXACT scores.

For each (estimator, distribution, M, sigma) it draws M samples of q_sigma = q * N(0, sigma^2 I) and
N fresh query points, and reports the relative Fisher error

    E|g - grad log q_sigma|^2 / E|grad log q_sigma|^2

at the samples (in-sample) and at the queries (out-of-sample), for
  (a) the estimator's default hyper-parameters (``score_estimator(name)``),
  (auto) ``bandwidth="auto"``: held-out score matching on the samples alone (and the estimator's
      knob too where it has a tuning grid, e.g. the SGE's eta), and
  (b) the oracle: the best of the defaults and a grid of bandwidth multiples x the estimator's
      parameter, chosen by the in-sample error against the exact score (what no sample-only rule
      can beat on this grid).

    python benchmarks/accuracy.py [--quick] [--samples 128 1024 8192] [--estimators stein ssge ...]

Prints a table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

try:
    import steinops
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import steinops
from steinops.bandwidth import median_distance
from steinops.distributions import get_distribution
from steinops.estimators import ESTIMATORS

BANDWIDTH_MULTS = [0.5, 1.0, 2.0, 4.0]
# The estimator-specific knob searched by the oracle; values relative to M where the knob is.
PARAM_GRIDS = {
    "stein": ("eta", [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]),
    "ssge": ("eig_mass", [0.9, 0.95, 0.99, 0.999]),
    "kef": ("lam", [1e-4, 1e-3, 1e-2, 1e-1]),
    "landweber": ("lam", [1e-3, 1e-2, 1e-1]),
    "nu": ("lam", [1e-4, 1e-3, 1e-2, 1e-1]),
}
DISTRIBUTIONS = ["two_mode", "eight_gaussians", "rings", "checkerboard", "moons", "gmm", "subspace_gmm"]


def fisher(est: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((est.double() - exact) ** 2).sum() / (exact**2).sum())


def evaluate(name, kwargs, x, q, sx, sq):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.no_grad():
            est = steinops.score_estimator(name, **kwargs).fit(x)
            return fisher(est.scores_, sx), fisher(est.predict(q), sq)


def run_case(name, x, q, sx, sq):
    default_in, default_out = evaluate(name, {}, x, q, sx, sq)
    auto_in, auto_out = evaluate(name, {"bandwidth": "auto"}, x, q, sx, sq)
    med = float(median_distance(x))
    knob, values = PARAM_GRIDS.get(name, (None, [None]))
    best = (default_in, default_out, {"default": True})  # the oracle may always fall back on the default
    for mult, val in itertools.product(BANDWIDTH_MULTS, values):
        kw = {"bandwidth": mult * med, **({knob: val} if knob else {})}
        try:
            e_in, e_out = evaluate(name, kw, x, q, sx, sq)
        except ValueError:
            continue
        if e_in < best[0]:
            best = (e_in, e_out, {"bandwidth_mult": mult, **({knob: val} if knob else {})})
    return dict(default_in=default_in, default_out=default_out, auto_in=auto_in, auto_out=auto_out,
                oracle_in=best[0], oracle_out=best[1], oracle_params=best[2])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", nargs="+", default=sorted(ESTIMATORS), help="registered estimator names")
    p.add_argument("--distributions", nargs="+", default=DISTRIBUTIONS, help="steinops.distributions registry names")
    p.add_argument("--samples", type=int, nargs="+", default=[128, 1024, 8192], help="sample sizes M")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.5], help="noise levels")
    p.add_argument("--queries", type=int, default=512, help="fresh query points per case")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny grid: smoke test")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "accuracy.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.distributions, a.samples, a.sigmas, a.queries = ["two_mode"], [128], [0.5], 64
    unknown = [e for e in a.estimators if e not in ESTIMATORS]
    if unknown:
        p.error(f"unknown estimators {unknown}; registered: {sorted(ESTIMATORS)}")
    dtype = getattr(torch, a.dtype)
    rows, t0 = [], time.time()
    print(f"{'estimator':10} {'distribution':16} {'M':>5} {'sigma':>5} | {'default in':>10} {'out':>7} | "
          f"{'auto in':>8} {'out':>7} | {'oracle in':>9} {'out':>7} | default/oracle auto/oracle")
    for dname, M, sigma in itertools.product(a.distributions, a.samples, a.sigmas):
        gen = torch.Generator().manual_seed(a.seed)
        dist = get_distribution(dname)
        x = dist.sample(M, sigma, generator=gen)
        q = dist.sample(a.queries, sigma, generator=gen)
        sx, sq = dist.score(x, sigma), dist.score(q, sigma)
        for name in a.estimators:
            t = time.time()
            r = run_case(name, x.to(dtype), q.to(dtype), sx, sq)
            r.update(estimator=name, distribution=dname, M=M, sigma=sigma, d=dist.dim, seconds=time.time() - t)
            rows.append(r)
            print(f"{name:10} {dname:16} {M:5d} {sigma:5.2f} | {r['default_in']:10.4f} {r['default_out']:7.4f} | "
                  f"{r['auto_in']:8.4f} {r['auto_out']:7.4f} | {r['oracle_in']:9.4f} {r['oracle_out']:7.4f} | "
                  f"{r['default_in'] / r['oracle_in']:13.2f}x {r['auto_in'] / r['oracle_in']:10.2f}x", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(settings=vars(a), bandwidth_mults=BANDWIDTH_MULTS, param_grids=PARAM_GRIDS,
                                   rows=rows, machine=platform.processor() or platform.machine(),
                                   torch=torch.__version__, seconds=time.time() - t0), indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Bias of Stein training targets: why ``--method stein`` regularises less than a one-shot estimate.

The stein objective regresses the network on the in-sample estimate g(x) of each noisy group, so after many
steps the network approaches the conditional mean E[g(x) | x] over the random group that x was drawn with:
the target's *bias* ``E[g(x) | x] - grad log q_sigma(x)`` is what the network inherits, its variance is
averaged away. A one-shot estimate (``steinops.stein_score``) is judged by its total error instead, and
its defaults (e.g. eta = 0.3) trade bias for variance. This benchmark measures both, per noise level of the
driver's NCSN schedule, for each estimator and value of its regularisation knob, at the driver's group size:

    total = E|g(z) - s(z)|^2 / E|s(z)|^2,   bias = E|mean_r g_r(z) - s(z)|^2 / E|s(z)|^2

where z ~ q_sigma are query points and g_r(z) is the in-sample estimate at z fitted on z plus m - 1 fresh
samples of q_sigma (replicate r = 1..R). ``bias`` still holds the replicate noise total / R; the table
prints it with that part subtracted (``bias - total / R``, clipped at 0), the JSON keeps both.

    python benchmarks/target_bias.py [--data two_mode eight_gaussians] [--group-size 128] [--queries 96]
                                     [--replicates 8] [--estimators stein kef ssge nu] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from kernels import cpu_model, versions  # noqa: E402

import steinops  # noqa: E402
from steinops.distributions import get_distribution  # noqa: E402
from steinops.sgm.noise import NoiseSchedule  # noqa: E402

from train.checkpoint import write_text_atomic  # noqa: E402
from train.config import PRESETS  # noqa: E402


def level_errors(est_name: str, knob_value, dist, sigma: float, *, m: int, n: int, R: int, bandwidth,
                 generator) -> dict:
    """total and bias (relative Fisher errors) at n query points of q_sigma with R replicate groups each."""
    z = dist.sample(n, sigma, generator=generator)
    exact = dist.score(z, sigma)
    others = dist.sample(n * R * (m - 1), sigma, generator=generator).reshape(n, R, m - 1, -1)
    x = torch.cat([z[:, None, None, :].expand(n, R, 1, z.shape[-1]), others], 2).float()  # (n, R, m, d)
    est = steinops.score_estimator(est_name, bandwidth=bandwidth, **{steinops.ESTIMATORS[est_name].knob: knob_value})
    g = est.fit(x).scores_[:, :, 0].double()  # (n, R, d): the estimate at z in each replicate
    return replicate_errors(g, exact)


def replicate_errors(g: torch.Tensor, exact: torch.Tensor) -> dict:
    """total and bias (relative to E|exact|^2) of estimates g (n, R, d) of exact (n, d) over R replicates, and
    bias_corrected = max(0, bias - total / R) (the replicate noise left in the mean removed)."""
    norm = exact.square().sum(-1).mean()
    total = float((g - exact[:, None]).square().sum(-1).mean() / norm)
    bias = float((g.mean(1) - exact).square().sum(-1).mean() / norm)
    return dict(total=total, bias=bias, bias_corrected=max(0.0, bias - total / g.shape[1]))


def knob_values(est_name: str, m: int) -> tuple:
    est = steinops.score_estimator(est_name)
    return tuple(sorted(est.knob_grid(m)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["two_mode", "eight_gaussians"])
    p.add_argument("--estimators", nargs="+", default=["stein", "ssge", "nu"],
                   choices=sorted(steinops.ESTIMATORS))
    p.add_argument("--group-size", type=int, default=128, help="samples per group (the driver: 512 / 4 levels)")
    p.add_argument("--queries", type=int, default=96, help="query points per level")
    p.add_argument("--replicates", type=int, default=8, help="groups per query point")
    p.add_argument("--bandwidth", default="median", help="bandwidth rule or number")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "target-bias.json"))
    a = p.parse_args(argv)
    bw = a.bandwidth if a.bandwidth in ("median", "svgd") else float(a.bandwidth)
    gen = torch.Generator().manual_seed(a.seed)
    rows, t0 = [], time.perf_counter()
    for data in a.data:
        dist = get_distribution(data)
        preset = PRESETS.get("toy" if data == "two_mode" else data, {})  # the driver's preset of this data set
        train = dist.sample(10000, generator=torch.Generator().manual_seed(a.seed)).float()
        sched = NoiseSchedule.ncsnv2(train, sigma_min=preset.get("sigma_min", 0.1))
        sigmas = [float(s) for s in sched.sigmas]
        jobs = [(e, k) for e in a.estimators for k in knob_values(e, a.group_size)]
        for est_name, k in tqdm(jobs, desc=data):
            per = [level_errors(est_name, k, dist, s, m=a.group_size, n=a.queries, R=a.replicates, bandwidth=bw,
                                generator=gen) for s in sigmas]
            rows.append(dict(data=data, estimator=est_name, knob=steinops.ESTIMATORS[est_name].knob, value=k,
                             sigmas=sigmas, **{key: [r[key] for r in per] for key in per[0]}))
    out = dict(device=cpu_model(), versions=versions(), args=vars(a), seconds=time.perf_counter() - t0, rows=rows)
    write_text_atomic(json.dumps(out, indent=1), Path(a.out))
    print(table(rows))
    print(f"\nwrote {a.out}")


def table(rows) -> str:
    """Markdown: per data set and estimator, the mean over levels of bias and total for each knob value."""
    lines = ["| data | estimator | knob | mean bias (levels) | mean total (levels) | worst-level bias |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        b, t = r["bias_corrected"], r["total"]
        lines.append(f"| {r['data']} | {r['estimator']} | {r['knob']} = {r['value']:.3g} | {sum(b) / len(b):.3f} | "
                     f"{sum(t) / len(t):.3f} | {max(b):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

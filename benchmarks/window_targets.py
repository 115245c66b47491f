"""Bias of the stein objective's two kinds of targets, per noise level, against exact scores.

For each level sigma_l of the driver's schedule (groups of m samples, as in training):

- regression: the estimator fitted in-sample on a group of q_{sigma_l} (the objective's default: the SGE at
  eta = 0.01 with the median bandwidth), judged against grad log q_{sigma_l} at its samples;
- window: ``window_score`` of a group of the next finer level q_{sigma_{l+1}} with h = sqrt(sigma_l^2 -
  sigma_{l+1}^2), at queries y ~ q_{sigma_l}, leaving out each query's own sample (the objective's window
  targets), judged against grad log q_{sigma_l}(y); with the median effective number of samples n_eff.

    total = E|g - s|^2 / E|s|^2,   bias = E|mean_r g_r - s|^2 / E|s|^2 - total / R   (R replicate groups)

The network regressed on these targets converges to their conditional mean, so ``bias`` is what it inherits.

    python benchmarks/window_targets.py [--data two_mode moons] [--group-size 128] [--queries 96]
                                        [--replicates 8] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from kernels import cpu_model, versions  # noqa: E402

from steinops.distributions import get_distribution  # noqa: E402
from steinops.estimators.window import window_score  # noqa: E402
from steinops.sgm.noise import NoiseSchedule  # noqa: E402

from target_bias import level_errors, replicate_errors  # noqa: E402
from train.checkpoint import write_text_atomic  # noqa: E402

DATA = ("two_mode", "eight_gaussians", "rings", "checkerboard", "spiral", "moons")


def _bias_total(e: dict, R: int) -> dict:
    """target_bias's errors with the replicate noise removed but not clipped (a bias at the noise floor stays
    visible as a small negative number)."""
    return dict(bias=e["bias"] - e["total"] / R, total=e["total"])


def regression_level(dist, sigma, *, m, n, R, eta, generator) -> dict:
    """The SGE's in-sample targets at eta with the median bandwidth (target_bias.py's replicate design)."""
    e = level_errors("stein", eta, dist, sigma, m=m, n=n, R=R, bandwidth="median", generator=generator)
    return _bias_total(e, R)


def window_level(dist, sigma, finer, *, m, n, R, generator) -> dict:
    h = math.sqrt(sigma ** 2 - finer ** 2)
    y = dist.sample(n, sigma, generator=generator)  # the law of x + h z with x ~ q_finer
    x = dist.sample(n * R * (m - 1), finer, generator=generator).reshape(n, R, m - 1, -1).float()
    g, neff = window_score(x, y[:, None, None, :].expand(n, R, 1, y.shape[-1]).float().contiguous(), h,
                           return_neff=True)
    return dict(_bias_total(replicate_errors(g[:, :, 0].double(), dist.score(y, sigma)), R),
                neff_median=float(neff.median()), neff_p10=float(neff.quantile(0.1)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=list(DATA), choices=DATA)
    p.add_argument("--group-size", type=int, default=128, help="samples per group (the driver: 512 / 4 levels)")
    p.add_argument("--queries", type=int, default=96, help="query points per level")
    p.add_argument("--replicates", type=int, default=8, help="groups per query point")
    p.add_argument("--eta", type=float, default=0.01, help="the SGE's eta (the objective's default)")
    p.add_argument("--sigma-min", type=float, default=0.1, help="the 2-D presets' sigma_min")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "window-targets.json"))
    a = p.parse_args(argv)
    gen = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)  # the schedule's sigma_max subsamples with the global generator
    rows, t0 = [], time.perf_counter()
    kw = dict(m=a.group_size, n=a.queries, R=a.replicates, generator=gen)
    for data in tqdm(a.data, desc="data sets"):
        dist = get_distribution(data)
        train = dist.sample(10000, generator=torch.Generator().manual_seed(a.seed)).float()
        sigmas = [float(s) for s in NoiseSchedule.ncsnv2(train, sigma_min=a.sigma_min).sigmas]
        for level, sigma in enumerate(sigmas[:-1]):
            rows.append(dict(data=data, level=level, sigma=sigma, finer=sigmas[level + 1], group_size=a.group_size,
                             regression=regression_level(dist, sigma, eta=a.eta, **kw),
                             window=window_level(dist, sigma, sigmas[level + 1], **kw)))
    out = dict(device=cpu_model(), versions=versions(), args=vars(a), seconds=time.perf_counter() - t0, rows=rows)
    write_text_atomic(json.dumps(out, indent=1), Path(a.out))
    png = Path(a.out).with_suffix(".png")
    plot(rows, png)
    print(table(rows))
    print(f"\nwrote {a.out} and {png}")


def plot(rows, path: Path) -> Path:
    """One panel per data set: both targets' bias against sigma (log-log), the windows' median n_eff beside."""
    from matplotlib import ticker
    from matplotlib.figure import Figure

    from train.plots import _save
    data = list(dict.fromkeys(r["data"] for r in rows))
    cols = min(3, len(data))
    fig = Figure(figsize=(4.8 * cols, 3.6 * math.ceil(len(data) / cols) + 0.6))
    axes = fig.subplots(math.ceil(len(data) / cols), cols, squeeze=False).ravel()
    floor = 1e-5  # the replicate-corrected bias can be ~0 or slightly negative: drawn at the floor
    for ax, name in zip(axes, data):
        rs = [r for r in rows if r["data"] == name]
        sig = [r["sigma"] for r in rs]
        for key, label, marker in (("regression", "regression (SGE, in-sample)", "o"),
                                   ("window", "window (from the finer level)", "s")):
            ax.plot(sig, [max(r[key]["bias"], floor) for r in rs], marker=marker, label=label)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # narrow ranges: minor labels would collide
        ax.set_title(name), ax.set_xlabel("noise level sigma"), ax.set_ylabel("relative bias")
        ax.grid(True, which="both", alpha=0.3)
        twin = ax.twinx()
        twin.plot(sig, [r["window"]["neff_median"] for r in rs], color="grey", ls=":", label="window n_eff")
        twin.axhline(20, color="grey", lw=0.8, ls="--")
        twin.set_yscale("log"), twin.set_ylabel("median n_eff (dotted; dashed: 20)", color="grey")
    for ax in axes[len(data):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("bias of the stein objective's targets against exact scores, per level (groups of "
                 f"{rows[0].get('group_size', 128)})")
    fig.tight_layout()
    return _save(fig, path)


def table(rows) -> str:
    lines = ["| data | sigma | regression bias | regression total | window bias | window total "
             "| window n_eff (median) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        g, w = r["regression"], r["window"]
        lines.append(f"| {r['data']} | {r['sigma']:.3g} | {g['bias']:.4f} | {g['total']:.3f} | {w['bias']:.4f} | "
                     f"{w['total']:.3f} | {w['neff_median']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

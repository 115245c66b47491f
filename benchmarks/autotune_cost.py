#!/usr/bin/env python
"""What ``bandwidth="auto"`` costs and buys in a training-like loop: refits on fresh batches of noisy samples.

Each refit draws ``--levels`` sample sets (one per noise level, sigma geometric from ``--sigma-max`` down to
``--sigma-min``) of M samples of the 2-D ``gmm`` convolved with N(0, sigma^2 I), fits one batched estimator, and
records the wall time of the fit and the mean over levels of the in-sample relative Fisher error
``E|G - grad log q_sigma|^2 / E|grad log q_sigma|^2`` against the EXACT score. The settings (the same estimator
instance across the refits of a setting, so warm starts and ``tune_every`` act as in training) are

    median      the default bandwidth rule and knob
    auto        bandwidth="auto": a cold search at every fit (default criterion)
    kfold       AutoTune(criterion="kfold"): cold 4-fold search at every fit
    warm        AutoTune(warm_start=True): the 3 x 3 neighbourhood of the previous choice
    warm10      AutoTune(warm_start=True, tune_every=10): re-tuned at every 10th fit only

Settings are interleaved refit by refit (same batches for all), so a shared machine's load hits them alike.

    python benchmarks/autotune_cost.py [--estimators stein ssge] [--refits 10] [--samples 512] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import steinops  # noqa: E402
from steinops.distributions import get_distribution  # noqa: E402
from steinops.estimators import ESTIMATORS  # noqa: E402
from kernels import device_info, versions  # noqa: E402

SETTINGS = {
    "median": lambda: "median",
    "auto": lambda: "auto",
    "kfold": lambda: steinops.AutoTune(criterion="kfold"),
    "warm": lambda: steinops.AutoTune(warm_start=True),
    "warm10": lambda: steinops.AutoTune(warm_start=True, tune_every=10),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", nargs="+", default=["stein", "ssge"], choices=sorted(ESTIMATORS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--refits", type=int, default=10)
    p.add_argument("--samples", type=int, default=512, help="M per noise level")
    p.add_argument("--levels", type=int, default=8)
    p.add_argument("--sigma-max", type=float, default=1.0)
    p.add_argument("--sigma-min", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "autotune-cost-cpu.json"))
    a = p.parse_args(argv)
    if a.refits < 1 or a.samples < 8 or a.levels < 1 or not 0 < a.sigma_min <= a.sigma_max:
        p.error("need refits >= 1, samples >= 8, levels >= 1 and 0 < sigma-min <= sigma-max")
    device = device_info(torch.device("cpu"))  # at the start: it records the load average
    dist = get_distribution("gmm")
    sigmas = torch.logspace(math.log10(a.sigma_max), math.log10(a.sigma_min), a.levels, dtype=torch.float64)
    gen = torch.Generator().manual_seed(a.seed)
    rows = []
    for name in a.estimators:
        torch.manual_seed(a.seed)
        ests = {s: steinops.score_estimator(name, bandwidth=SETTINGS[s]()) for s in a.settings}
        times = {s: [] for s in a.settings}
        errors = {s: [] for s in a.settings}
        for _ in range(a.refits):
            x64 = torch.stack([dist.sample(a.samples, float(s), generator=gen) for s in sigmas])  # (L, M, 2)
            score = torch.stack([dist.score(x64[i], float(s)) for i, s in enumerate(sigmas)])
            x = x64.float()
            for s, est in ests.items():
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    t = time.perf_counter()
                    G = est.fit(x).scores_
                    times[s].append(time.perf_counter() - t)
                rel = ((G.double() - score) ** 2).sum((-1, -2)) / (score ** 2).sum((-1, -2))
                errors[s].append(float(rel.mean()))
        for s in a.settings:
            t = times[s]
            rows.append(dict(estimator=name, setting=s, mean_fit_s=sum(t) / len(t), first_fit_s=t[0],
                             mean_rel_fisher=sum(errors[s]) / len(errors[s]), refits=a.refits))
            print(f"{name:8s} {s:8s} mean fit {rows[-1]['mean_fit_s']:7.3f} s (first {t[0]:.3f} s)  "
                  f"mean relative Fisher error {rows[-1]['mean_rel_fisher']:.4f}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if k != "out"}
    out.write_text(json.dumps(dict(device=device, versions=versions(), settings=settings,
                                   load_average_end=os.getloadavg(), rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Wall time of the one-call in-sample SGE, ``steinops.stein_score(x)``, at M = 8192, d = 784 in float32.

The estimator-family target: it completes on the 2-core CPU in under a minute and on one H100 in under
100 ms. ``x`` is a noisy group as score-based training makes it (``large_m.make_data``): MNIST images in [0, 1]
(``--mnist-dir``; drawn with replacement) plus N(0, sigma^2) noise, or, without the IDX files, a Gaussian
mixture on a random 16-dimensional subspace of R^784 plus noise. Everything is the default call: bandwidth 2 x the median distance,
eta = 0.3, solver "auto" (the dense Cholesky path at this size: 8192^2 Gram entries fit its 2^27 budget).

Each repeat is timed end to end (median distance, Gram matrix with the Stein term, factorisation, solve; CUDA
synchronised) after one untimed warm-up call; the median and range are reported with the device and the
machine load (a speed check: images have no exact score).

    python benchmarks/sge_time.py [--device cpu|cuda] [--repeats 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import steinops  # noqa: E402
from kernels import device_info, versions  # noqa: E402
from large_m import make_data  # noqa: E402

TARGET_S = {"cpu": 60.0, "cuda": 0.1}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=8192, help="M")
    p.add_argument("--dim", type=int, default=784, help="d")
    p.add_argument("--sigma", type=float, default=0.1, help="noise level of the group")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mnist-dir", default=str(HERE.parent.parent / "shared" / "data" / "mnist"))
    p.add_argument("--out", default=None, help="JSON path (default: results/sge-time-<device>.json)")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.samples < 2 or a.dim < 1:
        p.error("--repeats, --samples and --dim must be positive (samples >= 2)")
    dev = torch.device(a.device)
    mnist = Path(a.mnist_dir)
    x, source = make_data(a.samples, a.dim, a.sigma, mnist if mnist.is_dir() else None, seed=0)
    x = x.to(device=dev, dtype=torch.float32)

    def call():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            G = steinops.stein_score(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, G

    call()  # warm-up: first-call compilation / autotuning is not counted
    times = []
    for _ in range(a.repeats):
        t, G = call()
        times.append(t)
    ok = bool(torch.isfinite(G).all())
    info = device_info(dev)
    row = dict(M=a.samples, d=a.dim, dtype="float32", source=source, seconds=times, median_s=statistics.median(times),
               finite=ok, target_s=TARGET_S.get(dev.type) if (a.samples, a.dim) == (8192, 784) else None, threads=torch.get_num_threads(),
               load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    verdict = "" if row["target_s"] is None else (" (target < %g s: %s)" % (row["target_s"], "met" if row["median_s"] < row["target_s"] else "NOT met"))
    print(f"stein_score M={a.samples} d={a.dim} float32 on {info.get('name', dev.type)}: median {row['median_s']:.3f} s "
          f"(min {min(times):.3f}, max {max(times):.3f}; {a.repeats} repeats){verdict}; finite: {ok}")
    out = Path(a.out) if a.out else HERE / "results" / f"sge-time-{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=info, versions=versions(), rows=[row]), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

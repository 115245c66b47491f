"""Training-step time of every score objective at the same batch (the driver's CPU target: stein no
more than 1.3x dsm at batch 512).

Each method runs the real ``train.loop.Run.train_step`` (batch draw, noise, objective, backward, clip,
Adam, EMA) of the toy preset; methods are interleaved in rounds so that load from other processes hits
them alike; the median over rounds of the mean step time is reported with its ratio to dsm.

    python benchmarks/train_step.py [--batch-size 512] [--steps 100] [--rounds 5] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from kernels import cpu_isa, cpu_model, versions  # noqa: E402

from train.config import resolve  # noqa: E402
from train.loop import Run  # noqa: E402

CASES = {  # label -> extra options
    "dsm": ["--method", "dsm"],
    "ssm": ["--method", "ssm"],
    "ssm-vr": ["--method", "ssm-vr"],
    "sm": ["--method", "sm"],
    "stein": ["--method", "stein"],
    "stein (auto bandwidth, tune_every 25)": ["--method", "stein", "--bandwidth", "auto"],
    "stein, estimator at every level (--window-neff 0)": ["--method", "stein", "--window-neff", "0"],
    "ssge": ["--method", "stein", "--estimator", "ssge"],
    "kef": ["--method", "stein", "--estimator", "kef"],
    "ksd": ["--method", "ksd"],
}


def interleaved_step_times(runs: dict, steps: int, rounds: int, sync=lambda: None) -> dict[str, list[float]]:
    """Seconds per ``train_step`` of each run, one mean per round over ``steps`` steps; the runs take turns
    in every round so background load hits them alike. ``sync`` is called around each timed block
    (e.g. ``torch.cuda.synchronize``)."""
    times = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                run.train_step()
            sync()
            times[label].append((time.perf_counter() - t0) / steps)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--levels-per-step", type=int, default=4)
    p.add_argument("--steps", type=int, default=100, help="timed steps per method and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train-step-cpu.json"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in a.cases:
            cfg = resolve(["--preset", "toy", "--no-progress", "--batch-size", str(a.batch_size),
                           "--levels-per-step", str(a.levels_per_step), "--out", tmp] + CASES[label])
            runs[label] = Run(cfg)
            for _ in range(a.warmup):
                runs[label].train_step()
    times = interleaved_step_times(runs, a.steps, a.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med.get("dsm")
    print(f"training step, batch {a.batch_size} in {a.levels_per_step} noise groups, toy MLP, "
          f"{torch.get_num_threads()} threads, {cpu_model()} ({cpu_isa()})")
    print("| method | ms / step | vs dsm |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.2f} | {v / base:.2f}x |" if base else f"| {k} | {v * 1e3:.2f} | |")
    res = dict(device=cpu_model(), isa=cpu_isa(), threads=torch.get_num_threads(), batch_size=a.batch_size,
               levels_per_step=a.levels_per_step, steps=a.steps, rounds=a.rounds, versions=versions(),
               ms_per_step={k: v * 1e3 for k, v in med.items()},
               ratio_to_dsm={k: v / base for k, v in med.items()} if base else None,
               all_rounds_ms={k: [t * 1e3 for t in v] for k, v in times.items()})
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

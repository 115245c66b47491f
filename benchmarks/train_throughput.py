"""Image training throughput: steps/s and images/s of every score objective on the same U-Net, batch and
device, in one run, as ratios to DSM (the issue's targets: stein within 1.15x of dsm on a GPU and 1.3x on
CPU, MNIST U-Net, batch 128).

Each case runs the real ``train.loop.Run.train_step`` of an image preset (batch draw, noise, objective,
backward, clip, Adam, EMA); the cases are interleaved in rounds so that load from other processes hits
them alike, CUDA is synchronised around every timed block, and the median over rounds is reported.

    python benchmarks/train_throughput.py [--preset mnist] [--batch-size 128] [--device auto]
                                          [--steps 20] [--rounds 5] [--cases dsm stein ...] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from kernels import cpu_model, versions  # noqa: E402
from train_step import interleaved_step_times  # noqa: E402

from train.config import resolve  # noqa: E402
from train.loop import Run  # noqa: E402

CASES = {  # label -> extra options
    "dsm": ["--method", "dsm"],
    "ssm": ["--method", "ssm"],
    "ssm-vr": ["--method", "ssm-vr"],
    "stein": ["--method", "stein"],
    "ssge": ["--method", "stein", "--estimator", "ssge"],
    "kef": ["--method", "stein", "--estimator", "kef"],
    "landweber": ["--method", "stein", "--estimator", "landweber"],
    "nu": ["--method", "stein", "--estimator", "nu"],
    "ksd": ["--method", "ksd"],
}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist", help="image preset of the driver (mnist, digits)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: the driver's --data-dir)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--extra", default="", help="more driver options for every case, e.g. '--width 64'")
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/train-throughput-<device>.json)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in a.cases:
            argv_run = ["--preset", a.preset, "--no-progress", "--batch-size", str(a.batch_size), "--device", a.device,
                        "--out", tmp] + CASES[label] + a.extra.split()
            if a.data_dir:
                argv_run += ["--data-dir", a.data_dir]
            runs[label] = Run(resolve(argv_run))
            for _ in range(a.warmup):
                runs[label].train_step()
    run0 = next(iter(runs.values()))
    device = run0.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = interleaved_step_times(runs, a.steps, a.rounds, sync)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med.get("dsm")
    name = device_name(device)
    shape = tuple(run0.data.shape[1:])
    n_params = sum(q.numel() for q in run0.model.parameters())
    print(f"{a.preset}: U-Net {n_params / 1e6:.2f} M parameters, images {shape}, batch {a.batch_size} in "
          f"{run0.cfg.levels_per_step} noise groups, {name}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""))
    print("| method | ms / step | steps/s | images/s | vs dsm |\n|---|---|---|---|---|")
    for k, v in med.items():
        ratio = f"{v / base:.2f}x" if base else ""
        print(f"| {k} | {v * 1e3:.1f} | {1 / v:.2f} | {a.batch_size / v:.0f} | {ratio} |")
    res = dict(device=name, device_type=device.type, threads=torch.get_num_threads(), preset=a.preset,
               batch_size=a.batch_size, image_shape=list(shape), n_params=n_params,
               levels_per_step=run0.cfg.levels_per_step, steps=a.steps, rounds=a.rounds, extra=a.extra,
               versions=versions(), ms_per_step={k: v * 1e3 for k, v in med.items()},
               images_per_s={k: a.batch_size / v for k, v in med.items()},
               ratio_to_dsm={k: v / base for k, v in med.items()} if base else None,
               all_rounds_ms={k: [t * 1e3 for t in v] for k, v in times.items()})
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = Path(a.out or REPO / "benchmarks" / "results" / f"train-throughput-{a.preset}-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

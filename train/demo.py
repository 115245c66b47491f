"""``make demo``: the project's main job on built-in data, in minutes on 2 CPU cores.

Trains the same noise-conditional score model on the NCSN toy (0.8 / 0.2 mixture at +-(5, 5), unit std)
with denoising score matching, sliced score matching and Stein score estimation (the objective is the
only thing that changes), samples each with every sampler, and writes to ``runs/demo/``:
    <method>/                 each run's folder (config, metrics.jsonl, metrics.json, checkpoint, plots/)
    comparison.png            annealed-Langevin samples of each method (and of the exact score) side by side
    comparison.md / .json     the metrics table, and the classic mode-weight check: plain Langevin gets the
                              0.8 / 0.2 weights wrong, annealed Langevin recovers them

    python -m train.demo [--methods dsm ssm stein] [--steps N] [--out runs/demo] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from steinops.sgm import metrics

from . import plots
from .checkpoint import write_text_atomic
from .config import METHODS, PRESETS, resolve
from .loop import NonFiniteLoss, train_and_evaluate
from .report import _fmt, method_table, panel_table


def mode_weight_table(runs: dict) -> str:
    """Weight given to the heavier mode by plain and annealed Langevin (exact score and each network)."""
    any_run = next(iter(runs.values()))
    dist = any_run.dist
    heavy = int(dist.weights.argmax())
    lines = ["| score | plain Langevin | annealed Langevin |", "|---|---|---|"]

    def w(r):
        return float(metrics.mode_weights(r.samples.double(), dist)[heavy]) if r is not None else None
    rows = [("exact", any_run.samples.get("exact:langevin"), any_run.samples.get("exact:annealed"))]
    rows += [(m, run.samples.get("langevin"), run.samples.get("annealed")) for m, run in runs.items()]
    for name, plain, annealed in rows:
        lines.append(f"| {name} | {_fmt(w(plain))} | {_fmt(w(annealed))} |")
    return f"Weight of the heavier mode (true value {float(dist.weights[heavy]):.2f}):\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["dsm", "ssm", "stein"], choices=METHODS,
                   help="score objectives to train and compare")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per method (default: the preset's)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="preset of every run (smoke: seconds)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed (the same data, initialisation and noise for every method)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    a = p.parse_args(argv)
    out = Path(a.out)
    runs, summaries = {}, {}
    t0 = time.perf_counter()
    for method in a.methods:
        # the training-free sampler needs no network: run it once (with the stein run), it is the slow one
        samplers = [s for s in PRESETS[a.preset].get("samplers", ("annealed", "pc", "ode", "langevin"))
                    if s != "training_free" or method == "stein"]
        cfg = resolve(["--preset", a.preset, "--method", method, "--seed", str(a.seed), "--out", str(out / method),
                       "--samplers", *samplers]
                      + ([] if a.steps is None else ["--steps", str(a.steps)])
                      + ([] if a.progress else ["--no-progress"]))
        print(f"== {method}: training {cfg.steps} steps on {cfg.data} -> {cfg.out}", flush=True)
        try:
            runs[method], summaries[method] = train_and_evaluate(cfg)
        except NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    any_run = next(iter(runs.values()))
    panels = {"exact score": any_run.samples["exact:annealed"].samples}
    panels.update({m: r.samples["annealed"].samples for m, r in runs.items()})
    tf = next((r.samples["training_free"] for r in runs.values() if "training_free" in r.samples), None)
    if tf is not None:
        panels["training-free Stein (no network)"] = tf.samples
    table = {"exact score": {k: v for k, v in summaries[a.methods[0]]["samplers"]["exact:annealed"].items()
                             if k in ("energy", "mmd", "sliced_w2", "mode_weight_error")}}
    keys = ("energy", "mmd", "sliced_w2", "mode_weight_error")
    for m, s in summaries.items():
        table[m] = {k: v for k, v in s["samplers"]["annealed"].items() if k in keys}
        if "training_free" in s["samplers"]:
            table["training-free Stein (no network)"] = {k: v for k, v in s["samplers"]["training_free"].items() if k in keys}
    plots.comparison(out / "comparison.png", panels, any_run.dist, table, lim=(-10.0, 10.0))
    modes = mode_weight_table({m: r for m, r in runs.items()}) if hasattr(any_run.dist, "weights") else ""
    text = ("# steinops demo: score objectives on the NCSN toy\n\nAnnealed-Langevin samples "
            f"({summaries[a.methods[0]]['samplers']['annealed'].get('nfe', '?')} score evaluations), "
            f"{cfg.steps} steps each, total wall time {time.perf_counter() - t0:.0f} s.\n\n"
            + method_table(summaries) + "\n\nThe panels of comparison.png (the exact score and the training-free "
            "sampler use annealed Langevin too):\n\n" + panel_table(table) + "\n\n" + modes + "\n")
    write_text_atomic(text, out / "comparison.md")
    write_text_atomic(json.dumps(dict(summaries=summaries, table=table), indent=2), out / "comparison.json")
    print("\n" + text + f"\npictures: {out}/comparison.png and {out}/<method>/plots/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

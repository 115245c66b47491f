"""Which noise levels make a trained model's sample error: annealed Langevin with the network's score on some
levels and the exact score on the rest.

For a run folder (``python -m train ... --out DIR``; its ``checkpoint.pt`` holds the EMA network), each row
samples with the network on the levels ``[0, k)`` (the largest sigmas) and the exact score below, and with the
reverse split; all rows share the prior draw and the Langevin noise, so they differ only by the score. A level
range whose switch to the network moves the metrics is where the network's error matters:

    high[k]: network on levels < k, exact on levels >= k     (k = 0: all exact, k = L: all network)
    low[k]:  exact on levels < k, network on levels >= k

    python benchmarks/level_attribution.py RUN_DIR [RUN_DIR ...] [--n-samples 2000] [--every 1] [--out FILE]

Prints, per run, energy distance, MMD² and (for mixtures) the mode weights and their error; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from kernels import cpu_model, versions  # noqa: E402

from steinops.sgm import samplers  # noqa: E402
from steinops.distributions import FullCovGaussianMixture, GaussianMixture  # noqa: E402
from steinops.sgm.metrics import energy_distance, mmd, mode_weight_error, mode_weights  # noqa: E402
from train.checkpoint import write_text_atomic  # noqa: E402
from train.config import from_dict  # noqa: E402
from train.loop import Run  # noqa: E402


def load_run(run_dir: Path) -> Run:
    """The run of ``run_dir/checkpoint.pt`` with its saved configuration and weights."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"run folder {run_dir} has no checkpoint.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = from_dict(dict(state["config"], progress=False, out=str(run_dir)))
    run = Run(cfg)
    run.load_state_dict(state)
    return run


def split_score(net, exact, sigmas: torch.Tensor, k: int, network_high: bool):
    """Score function using ``net`` on levels < k (``network_high``) or >= k, ``exact`` elsewhere."""
    def score(x, sigma):
        level = int((sigmas - float(sigma.reshape(-1)[0])).abs().argmin())
        return (net if (level < k) == network_high else exact)(x, sigma)
    return score


def attribute(run: Run, *, n_samples: int, every: int, seed: int) -> list[dict]:
    cfg, dist, sigmas = run.cfg, run.dist, run.sigmas
    net, exact = samplers.network_score_fn(run.ema.module), samplers.exact_score_fn(dist)
    eps = cfg.step_eps or run.schedule.langevin_step_size(cfg.n_steps_each)
    prior = run.schedule.sde().prior_sample(n_samples, dist.dim, generator=torch.Generator().manual_seed(seed),
                                            dtype=run.dtype)
    ref = dist.sample(n_samples, generator=torch.Generator().manual_seed(seed + 1)).to(run.dtype)
    is_mixture = isinstance(dist, (GaussianMixture, FullCovGaussianMixture))  # what mode_weights accepts
    rows, L = [], len(sigmas)
    for k in sorted(set(range(0, L + 1, every)) | {L}):
        for high in (True, False):
            if (k in (0, L)) and not high:  # the same as high[L - k]
                continue
            x = samplers.annealed_langevin(split_score(net, exact, sigmas, k, high), prior, sigmas, eps=eps,
                                           n_steps_each=cfg.n_steps_each,
                                           generator=torch.Generator().manual_seed(seed + 2)).samples
            row = dict(split="high" if high else "low", k=k,
                       network_levels=[i for i in range(L) if (i < k) == high],
                       energy=energy_distance(x, ref), mmd=mmd(x, ref))
            if is_mixture:
                row.update(mode_weights=[float(v) for v in mode_weights(x, dist)],
                           mode_weight_error=mode_weight_error(x, dist))
            rows.append(row)
    return rows


def table(name: str, sigmas, rows) -> str:
    lines = [f"{name}: sigmas " + " ".join(f"{float(s):.3g}" for s in sigmas),
             "| network on levels | energy | MMD² | mode weights | mode-weight error |", "|---|---|---|---|---|"]
    for r in rows:
        lv = r["network_levels"]  # always one contiguous range
        lv = f"{lv[0]}-{lv[-1]}" if lv else "none"
        w = " / ".join(f"{v:.3f}" for v in r.get("mode_weights", [])) or "-"
        err = f"{r['mode_weight_error']:.3f}" if "mode_weight_error" in r else "-"
        lines.append(f"| {lv} | {r['energy']:.4f} | {r['mmd']:.2e} | {w} | {err} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding checkpoint.pt")
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--every", type=int, default=1, help="split points k = 0, every, 2 every, ..., L")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "level-attribution.json"))
    a = p.parse_args(argv)
    if a.n_samples < 2 or a.every < 1:
        p.error("--n-samples must be >= 2 and --every >= 1")
    out = dict(device=cpu_model(), versions=versions(), args={k: str(v) for k, v in vars(a).items()}, runs=[])
    for run_dir in a.runs:
        try:
            run = load_run(run_dir)
        except ValueError as e:
            p.error(str(e))
        rows = attribute(run, n_samples=a.n_samples, every=a.every, seed=a.seed)
        out["runs"].append(dict(run=str(run_dir), method=run.cfg.method, data=run.cfg.data, seed=run.cfg.seed,
                                step=run.step, sigmas=[float(s) for s in run.sigmas], rows=rows))
        print(table(f"{run_dir} ({run.cfg.method}, {run.cfg.data}, seed {run.cfg.seed}, step {run.step})",
                    run.sigmas, rows), flush=True)
        write_text_atomic(json.dumps(out, indent=1), Path(a.out))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()

"""Final evaluation of an image run (no exact score): samples of each sampler, download-free metrics and
pictures.

    FD-<data> / KID-<data>   Frechet distance and kernel inception-style distance in the feature space of a
                             small classifier trained on the run's training split (cached; NOT Inception FID)
    fd_real                  the same FD between held-out and training images: the floor a perfect model reaches
    nn_ratio, frac_copies    memorisation: nearest-training-image distances of samples vs of held-out images
    bpd                      bits/dim of held-out images, probability-flow ODE with dequantisation
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from steinops.sgm.image_metrics import cached_classifier, image_metrics, save_image_grid
from steinops.sgm.likelihood import bits_per_dim

from . import plots
from .checkpoint import write_text_atomic
from .evaluate import run_samplers


def _classifier(run):
    cfg, img = run.cfg, run.images
    key = f"{img.name}-{cfg.pixel_scale}-pad{cfg.pad_to}-heldout{cfg.heldout}-seed{cfg.seed}"
    return cached_classifier(Path(cfg.cache_dir), key, img.train, img.train_labels, img.heldout, img.heldout_labels,
                             seed=cfg.seed, progress=cfg.progress)


def final_image_evaluation(run) -> dict:
    """Sample with each configured sampler, score the samples, write metrics.json and plots/; returns the summary."""
    cfg, img, out = run.cfg, run.images, Path(run.cfg.out)
    lo, hi = (0.0, 1.0) if img.scale == "01" else (-1.0, 1.0)
    results = run_samplers(run)
    classifier, accuracy = _classifier(run)
    n = cfg.n_samples
    g = torch.Generator().manual_seed(cfg.seed + 79)
    train_ref = img.train[torch.randperm(img.train.shape[0], generator=g)[:min(n, img.train.shape[0])]]
    real = image_metrics(img.heldout, train_ref, classifier, seed=cfg.seed)  # the floor: real vs real
    table = {}
    for name, r in results.items():
        x = r.samples.float()
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(-1)
        if finite.sum() < 2:
            table[name] = dict(non_finite_fraction=1.0, seconds=r.seconds, nfe=r.nfe)
            continue
        x = x[finite].clamp(lo, hi)  # images are stored in the pixel range
        m = image_metrics(x, img.heldout, classifier, train=img.train, heldout=img.heldout, seed=cfg.seed)
        table[name] = dict(m, non_finite_fraction=1.0 - finite.double().mean().item(), seconds=r.seconds, nfe=r.nfe)
    bpd = None
    if cfg.n_bpd:
        t0 = time.perf_counter()
        x = img.heldout[:cfg.n_bpd]
        net = run.ema.module.eval()  # differentiable: the divergence is a vector-Jacobian product
        res = bits_per_dim(net, x, run.schedule.sde(), bin_width=img.bin_width, rtol=cfg.bpd_tol, atol=cfg.bpd_tol,
                           generator=torch.Generator().manual_seed(cfg.seed + 80), progress=cfg.progress)
        bpd = dict(mean=res["bpd_mean"], std=res["bpd_std"], n_images=int(x.shape[0]), nfe=res["nfe"], tol=cfg.bpd_tol,
                   seconds=time.perf_counter() - t0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    train_rows = [r for r in rows if "loss" in r]
    summary = dict(
        method=cfg.method, data=cfg.data, steps=run.step, world_size=run.world,
        schedule=dict(sigma_max=run.schedule.sigma_max, sigma_min=run.schedule.sigma_min, n_levels=len(run.schedule)),
        sigmas=[float(s) for s in run.sigmas],
        sec_per_step=(sum(r["sec_per_step"] for r in train_rows[1:]) / max(1, len(train_rows) - 1)) if train_rows else None,
        n_params=sum(p.numel() for p in run.model.parameters()),
        classifier_accuracy=accuracy, fd_real=real["fd"], kid_real=real["kid_mean"],
        heldout=evals[-1] if evals else None, bpd=bpd, samplers=table,
    )
    write_text_atomic(json.dumps(summary, indent=2), out / "metrics.json")
    run.samples = results
    if cfg.plots:
        _plots(run, results, rows, (lo, hi))
    return summary


def _plots(run, results, rows, value_range):
    cfg = run.cfg
    pdir = Path(cfg.out) / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    k = min(64, cfg.n_samples)
    save_image_grid(run.images.heldout[:k], pdir / "real.png", value_range=value_range, title=f"held-out {cfg.data}")
    for name, r in results.items():
        save_image_grid(r.samples[:k].float().clamp(*value_range), pdir / f"samples_{name}.png",
                        value_range=value_range, title=f"{cfg.method}: {name} samples")
    plots.curves(pdir / "loss.png", [r for r in rows if "loss" in r], keys=["loss"], logy=False,
                 title=f"{cfg.method} training loss")
    evals = [r for r in rows if r.get("kind") == "eval"]
    if evals:
        plots.curves(pdir / "heldout.png", evals, keys=["dsm_heldout_mean"],
                     title="held-out denoising loss per dimension (mean over levels)")
        plots.fisher_per_level(pdir / "heldout_per_level.png", {"network (EMA)": evals[-1]["dsm_heldout"]},
                               [float(s) for s in run.sigmas], ylabel="held-out denoising loss per dimension",
                               title=f"{cfg.method}: held-out denoising loss per noise level")

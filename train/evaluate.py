"""Evaluation of a run: exact-score Fisher errors per noise level during training, and at the end the
samplers, the sample metrics against the true distribution, and the pictures."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

import steinops
from steinops.estimators.window import window_score
from steinops.sgm import metrics, samplers
from steinops.sgm.objectives import window_ladder

from . import plots
from .config import estimator_options


@torch.no_grad()
def fisher_row(model, dist, sigmas, n, *, step, generator, estimator=None, group_size=None,
               window: float = 0.0) -> dict:
    """Relative Fisher error E|s - s*|^2 / E|s*|^2 per level at n fresh samples of q_sigma, for the network
    ``model`` and (if given) the raw ``estimator`` fitted in-sample on ``group_size`` of those samples per level
    (what the stein objective regresses on). With ``window`` > 0 (the objective's n_eff threshold), also the
    stein objective's window targets of each level (``fisher_window``; None for the finest level, which has
    none) as it makes them: from ``group_size`` samples of the next finer level at y = x + h z, their median
    n_eff (``window_neff``), and the mean error over the levels whose median n_eff reaches the threshold
    (``fisher_window_mean``: the levels the windows train; None if there are none)."""
    xs = torch.stack([dist.sample(n, float(s), generator=generator) for s in sigmas])  # (L, n, d) float64
    exact = torch.stack([dist.score(x, float(s)) for x, s in zip(xs, sigmas)])
    x32 = xs.to(sigmas.dtype)
    net = torch.stack([model(x, s.expand(n)) for x, s in zip(x32, sigmas)]).double()
    row = dict(step=step, kind="eval", fisher_net=[metrics.relative_fisher_error(a, b) for a, b in zip(net, exact)])
    row["fisher_net_mean"] = sum(row["fisher_net"]) / len(sigmas)
    if estimator is not None:
        m = min(n, group_size)
        g = estimator.fit(x32[:, :m]).scores_.double()
        row["fisher_estimator"] = [metrics.relative_fisher_error(a, b) for a, b in zip(g, exact[:, :m])]
        row["fisher_estimator_mean"] = sum(row["fisher_estimator"]) / len(sigmas)
    if window > 0:
        m = min(n, group_size)
        errs, neffs = [None] * len(sigmas), [None] * len(sigmas)
        _, h_of, finer_of = window_ladder(sigmas)
        for level in (finer_of >= 0).nonzero()[:, 0].tolist():  # every level with a finer one
            finer = int(finer_of[level])
            h = float(h_of[finer])  # the finer group's window, which reaches this level
            x = x32[finer, :m]
            y = x + h * torch.randn(x.shape, generator=generator, dtype=x.dtype)
            g, neff = window_score(x, y, h, exclude=torch.arange(m), return_neff=True)
            errs[level] = metrics.relative_fisher_error(g.double(), dist.score(y.double(), float(sigmas[level])))
            neffs[level] = float(neff.median())
        row["fisher_window"], row["window_neff"] = errs, neffs
        used = [e for e, k in zip(errs, neffs) if k is not None and k >= window]
        row["fisher_window_mean"] = sum(used) / len(used) if used else None
    return row


@torch.no_grad()
def heldout_row(model, heldout: torch.Tensor, sigmas, n, *, step, generator) -> dict:
    """Held-out denoising loss per level, per dimension: mean over n held-out images x and z ~ N(0, I) of
    |sigma s(x + sigma z, sigma) + z|^2 / (2 D). It equals sigma^2 E|s - grad log q_sigma|^2 / (2 D) plus a
    constant of the data (Vincent 2011), so it ranks networks like the Fisher error that image data lack."""
    p = next(model.parameters())
    x = heldout[:n].to(device=p.device, dtype=p.dtype)
    D = x[0].numel()
    losses = []
    for s in sigmas:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        sig = float(s)
        out = model(x + sig * z, torch.full((x.shape[0],), sig, dtype=x.dtype, device=x.device))
        losses.append(float((sig * out + z).square().sum() / (2 * D * x.shape[0])))
    return dict(step=step, kind="eval", dsm_heldout=losses, dsm_heldout_mean=sum(losses) / len(losses))


def _box(data: torch.Tensor, margin: float = 0.1):
    lo, hi = data.min(0).values, data.max(0).values
    pad = margin * (hi - lo)
    return lo - pad, hi + pad


def run_samplers(run, *, exact: bool = True) -> dict[str, samplers.SampleResult]:
    """Draw cfg.n_samples with each configured sampler from the EMA network (and, with ``exact`` and a
    distribution with exact scores, the classic toy check: plain and annealed Langevin with the exact score).
    Works on vectors (n, d) and images (n, C, H, W); plain Langevin starts uniformly in the data's bounding box."""
    cfg, sigmas = run.cfg, run.sigmas
    n, shape = cfg.n_samples, tuple(run.data.shape[1:])
    sde = run.schedule.sde()
    eps = cfg.step_eps or run.schedule.langevin_step_size(cfg.n_steps_each)
    net = samplers.network_score_fn(run.ema.module)
    g = lambda k: torch.Generator().manual_seed(cfg.seed * 1000 + k)
    prior = sde.prior_sample(n, math.prod(shape), generator=g(0), dtype=run.dtype).reshape(n, *shape)
    lo, hi = (b.cpu() for b in _box(run.data))
    box = lo + (hi - lo) * torch.rand(n, *shape, generator=g(1), dtype=run.dtype)  # NCSN toy: plain Langevin from a box
    n_langevin = cfg.n_steps_each * len(sigmas)
    record = max(1, cfg.n_steps_each // 4)
    exact = exact and run.dist is not None
    score_fns = dict(net=net)
    if exact:
        score_fns["exact"] = samplers.exact_score_fn(run.dist)
    out = {}
    for src, fn in score_fns.items():
        for name in cfg.samplers:
            if name == "training_free" or (src == "exact" and name not in ("annealed", "langevin")):
                continue
            key = name if src == "net" else f"exact:{name}"
            t0 = time.perf_counter()
            if name == "annealed":
                r = samplers.annealed_langevin(fn, prior, sigmas, eps=eps, n_steps_each=cfg.n_steps_each,
                                               generator=g(2), record_every=record, progress=cfg.progress)
            elif name == "langevin":
                r = samplers.langevin(fn, box, sigma=float(sigmas[-1]), step_size=cfg.langevin_step,
                                      n_steps=n_langevin, generator=g(3), record_every=record * len(sigmas) // 4 or 1,
                                      progress=cfg.progress)
            elif name == "pc":
                r = samplers.pc_sampler(fn, prior, sde, n_steps=cfg.pc_steps, snr=cfg.snr, generator=g(4),
                                        progress=cfg.progress)
            elif name == "ode":
                r = samplers.probability_flow_ode(fn, prior, sde, rtol=cfg.ode_tol, atol=cfg.ode_tol)
            r.seconds = time.perf_counter() - t0
            out[key] = r
    if "training_free" in cfg.samplers:
        est = steinops.score_estimator(cfg.estimator, **estimator_options(cfg))
        t0 = time.perf_counter()
        flat = lambda t: t.reshape(t.shape[0], -1)  # the estimator sees images as vectors (pixel-space kernel)
        r = samplers.training_free_sampler(est, flat(run.data.cpu()), sigmas, flat(prior), eps=eps,
                                           n_steps_each=cfg.n_steps_each, max_samples=cfg.tf_samples, generator=g(5),
                                           progress=cfg.progress)
        r.samples = r.samples.reshape(n, *shape)
        if r.trajectory is not None:
            r.trajectory = r.trajectory.reshape(r.trajectory.shape[0], n, *shape)
        r.seconds = time.perf_counter() - t0
        out["training_free"] = r
    return out


def final_evaluation(run) -> dict:
    """Samples, metrics.json and plots/ of a finished run; returns the metrics dict."""
    if run.images is not None:
        from .evaluate_images import final_image_evaluation
        return final_image_evaluation(run)
    cfg, dist, out = run.cfg, run.dist, Path(run.cfg.out)
    results = run_samplers(run)
    ref = dist.sample(max(cfg.n_samples, 2000), generator=torch.Generator().manual_seed(cfg.seed + 77))
    table = {}
    ksd_sigma = run.schedule.sigma_min if getattr(dist, "singular", False) else None  # no score at sigma = 0
    for name, r in results.items():
        x = r.samples.double()
        finite = torch.isfinite(x).all(-1)
        if finite.sum() < 2:  # a diverged sampler still gets a row
            table[name] = dict(non_finite_fraction=1.0, seconds=r.seconds, nfe=r.nfe)
            continue
        m = metrics.sample_metrics(x[finite], dist, reference=ref, ksd_sigma=ksd_sigma,
                                   generator=torch.Generator().manual_seed(cfg.seed + 78))
        table[name] = dict(m, non_finite_fraction=1.0 - finite.double().mean().item(), seconds=r.seconds, nfe=r.nfe)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    train_rows = [r for r in rows if "loss" in r]
    summary = dict(
        method=cfg.method, data=cfg.data, steps=run.step,
        schedule=dict(sigma_max=run.schedule.sigma_max, sigma_min=run.schedule.sigma_min, n_levels=len(run.schedule)),
        sigmas=[float(s) for s in run.sigmas],
        sec_per_step=(sum(r["sec_per_step"] for r in train_rows[1:]) / max(1, len(train_rows) - 1)) if train_rows else None,
        n_params=sum(p.numel() for p in run.model.parameters()),
        fisher=evals[-1] if evals else None,
        samplers=table,
    )
    from .checkpoint import write_text_atomic
    write_text_atomic(json.dumps(summary, indent=2), out / "metrics.json")
    run.samples = results
    if cfg.plots:
        make_plots(run, results, rows)
    return summary


def make_plots(run, results, rows):
    """The run's pictures under OUT/plots/."""
    cfg, dist, sigmas = run.cfg, run.dist, run.sigmas
    pdir = Path(cfg.out) / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    lo, hi = _box(run.data, 0.15)
    lim = (float(lo[:2].min()), float(hi[:2].max()))
    net = samplers.network_score_fn(run.ema.module)
    L = len(sigmas)
    for i in sorted({L - 1, L // 2, max(0, L // 2 - 2)}):
        s = float(sigmas[i])
        plots.score_field(pdir / f"score_field_sigma{i:02d}.png", net, dist, s, lim=lim,
                          title=f"{cfg.method}: learned (EMA) vs exact score, sigma = {s:.3g}")
    plots.samples_over_density(pdir / "samples.png", {k: r.samples for k, r in results.items()}, dist, lim=lim,
                               title=f"{cfg.method} on {cfg.data}: samples of each sampler")
    for key in ("annealed", "langevin", "exact:langevin", "exact:annealed"):
        r = results.get(key)
        if r is not None and r.trajectory is not None:
            plots.trajectories(pdir / f"trajectories_{key.replace(':', '_')}.png", r.trajectory, dist, lim=lim,
                               title=f"{key} trajectories ({cfg.method})")
    plots.curves(pdir / "loss.png", [r for r in rows if "loss" in r], keys=["loss"], logy=False,
                 title=f"{cfg.method} training loss")
    evals = [r for r in rows if r.get("kind") == "eval"]
    if evals:
        keys = ["fisher_net_mean", "fisher_estimator_mean"] + (["fisher_window_mean"] if cfg.window_neff else [])
        plots.curves(pdir / "fisher.png", evals, keys=keys,
                     title="relative Fisher error vs exact score (mean over levels)")
        per = {"network (EMA)": evals[-1]["fisher_net"]}
        if "fisher_estimator" in evals[-1]:
            per[f"raw {cfg.estimator} estimates"] = evals[-1]["fisher_estimator"]
        if "fisher_window" in evals[-1]:
            per[f"window targets (trained where n_eff >= {cfg.window_neff:g})"] = evals[-1]["fisher_window"]
        plots.fisher_per_level(pdir / "fisher_per_level.png", per, [float(s) for s in sigmas],
                               title=f"{cfg.method}: relative Fisher error per noise level")

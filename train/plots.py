"""PNG figures for the score-based-model driver: score fields, samples, trajectories, curves, tables.

Every function draws on a fresh ``matplotlib.figure.Figure`` rendered by the Agg canvas (no pyplot
state, no global backend switch, nothing left open), writes a PNG to ``path`` (parent folders are
created) and returns it as a ``Path``.

Data are 2-D; for ``d > 2`` the first two coordinates are drawn and the title says so. The density
background is ``log q_sigma`` on a grid (``dist.log_prob``) for ``d == 2`` and the log of a 2-D
histogram of exact samples of ``q_sigma`` (the marginal of the first two coordinates) for ``d > 2``.
Singular clean laws (``dist.singular``) have no density at ``sigma = 0``; their background is then
drawn at a small positive sigma (2% of the plotting box) and the panel title says which.

Score functions follow ``f(x (N, d), sigma (N,)) -> (N, d)``; they are evaluated under
``torch.no_grad`` in the dtype/device of a ``torch.nn.Module``'s parameters, else in float64 on CPU.

``lim`` is ``L`` (the box [-L, L]^2), ``(lo, hi)`` (both axes) or ``((x_lo, x_hi), (y_lo, y_hi))``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import textwrap

from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

DPI = 120
# light half of "Blues": dark enough to read the modes, light enough for points and arrows on top
DENSITY_CMAP = mcolors.ListedColormap(colormaps["Blues"](np.linspace(0.0, 0.55, 256)), name="light_blues")
# warm, saturated colours that stand out on the blue background
SAMPLE_COLOURS = ["#d62728", "#ff7f0e", "#7b1fa2", "#000000", "#c2185b", "#8c564b", "#2e7d32", "#bcbd22"]
LEARNED_COLOUR = "tab:red"
EXACT_COLOUR = "black"
_MAX_POINTS = 4000  # scatter at most this many points per panel (random subset, for speed and legibility)
_N_HIST = 40000  # exact samples for the d > 2 marginal histogram
_LOG_RANGE = 9.0  # the density background spans [max - 9, max] nats of log q_sigma

__all__ = ["score_field", "samples_over_density", "trajectories", "curves", "fisher_per_level", "comparison"]


# ----------------------------------------------------------------------------------------------- helpers
def _parse_lim(lim) -> tuple[tuple[float, float], tuple[float, float]]:
    """lim -> ((x_lo, x_hi), (y_lo, y_hi)); ValueError naming ``lim`` on anything else."""
    try:
        if isinstance(lim, (int, float, np.floating, np.integer)) and not isinstance(lim, bool):
            L = float(lim)
            if not (math.isfinite(L) and L > 0):
                raise ValueError
            return (-L, L), (-L, L)
        lim = tuple(lim)
        if len(lim) == 2 and all(isinstance(v, (int, float, np.floating, np.integer)) for v in lim):
            lim = (lim, lim)
        (a, b), (c, d) = lim
        box = (float(a), float(b)), (float(c), float(d))
    except (TypeError, ValueError):
        raise ValueError(f"lim must be L > 0, (lo, hi) or ((x_lo, x_hi), (y_lo, y_hi)), got {lim!r}") from None
    for lo, hi in box:
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"lim must have finite lo < hi on both axes, got {lim!r}")
    return box


def _check_dist(dist) -> int:
    d = getattr(dist, "dim", None)
    if not isinstance(d, int) or not all(hasattr(dist, a) for a in ("sample", "log_prob", "score")):
        raise TypeError(f"dist must be a steinops distribution (dim, sample, log_prob, score), got {type(dist).__name__}")
    if d < 2:
        raise ValueError(f"dist must have dim >= 2 for a 2-D plot, got dim = {d}")
    return d


def _as_points(x, dim: int, name: str) -> np.ndarray:
    """Tensor/array (N, dim) -> float64 numpy (N, 2) of the first two coordinates."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (N, {dim}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must contain at least one point")
    return x[:, :2]


def _check_samples(samples, dim: int, name: str = "samples") -> dict[str, np.ndarray]:
    if not isinstance(samples, Mapping):
        raise TypeError(f"{name} must be a dict name -> (N, d) tensor, got {type(samples).__name__}")
    if len(samples) == 0:
        raise ValueError(f"{name} must not be empty")
    return {str(k): _as_points(v, dim, f"{name}[{k!r}]") for k, v in samples.items()}


def _subset(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    if x.shape[0] <= n:
        return x
    return x[np.random.default_rng(seed).choice(x.shape[0], n, replace=False)]


def _density_sigma(dist, sigma: float, box) -> tuple[float, str]:
    """sigma at which the background is drawn, and a note for the title when it differs from ``sigma``."""
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    if sigma == 0 and getattr(dist, "singular", False):
        span = max(box[0][1] - box[0][0], box[1][1] - box[1][0])
        s = float(f"{0.02 * span:.2g}")
        return s, f"density of q at σ={s:g} (singular law)"
    return sigma, f"density of q_σ, σ={sigma:g}"


def _grid(box, n: int) -> tuple[np.ndarray, np.ndarray]:
    xs = np.linspace(box[0][0], box[0][1], n)
    ys = np.linspace(box[1][0], box[1][1], n)
    return np.meshgrid(xs, ys)  # (n, n) each, row = y


def _log_density(dist, sigma: float, box, n: int = 120, *, anchor=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, Y, log q) on an n x n grid: exact for d == 2 (or on the slice at ``anchor``), log histogram otherwise."""
    d = dist.dim
    X, Y = _grid(box, n)
    if d == 2 or anchor is not None:
        pts = torch.as_tensor(np.stack([X.ravel(), Y.ravel()], -1), dtype=torch.float64)
        if d > 2:
            pts = torch.cat([pts, torch.as_tensor(anchor, dtype=torch.float64).expand(pts.shape[0], d - 2)], -1)
        with torch.no_grad():
            lp = dist.log_prob(pts, sigma).to(torch.float64).reshape(n, n).numpy()
        return X, Y, lp
    # d > 2: the marginal of (x_0, x_1) is not available in closed form in general -> histogram of samples
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        s = dist.sample(_N_HIST, sigma, generator=g)[:, :2].to(torch.float64).numpy()
    n = min(n, 64)  # ~10 samples per occupied bin: a readable, not speckled, histogram
    edges = [np.linspace(box[0][0], box[0][1], n + 1), np.linspace(box[1][0], box[1][1], n + 1)]
    h, _, _ = np.histogram2d(s[:, 0], s[:, 1], bins=edges)
    k = np.array([1.0, 2.0, 1.0]) / 4  # light binomial smoothing against Monte Carlo speckle
    for axis in (0, 1):
        h = sum(w * np.roll(np.pad(h, [(1, 1) if a == axis else (0, 0) for a in (0, 1)]), sh, axis)
                for w, sh in zip(k, (-1, 0, 1)))
        h = h[1:-1] if axis == 0 else h[:, 1:-1]
    with np.errstate(divide="ignore"):
        lp = np.log(np.where(h > 0.05, h, 0.0).T)  # histogram2d is (x, y); the grid is (y, x)
    cx = 0.5 * (edges[0][1:] + edges[0][:-1])
    cy = 0.5 * (edges[1][1:] + edges[1][:-1])
    X, Y = np.meshgrid(cx, cy)
    return X, Y, lp


def _draw_density(ax, X, Y, lp, *, with_contours: bool = True):
    """Filled contours of log density over [max - _LOG_RANGE, max]; returns the mappable (for a colour bar)."""
    finite = np.isfinite(lp)
    if not finite.any():
        return None
    top = float(lp[finite].max())
    levels = ticker.MaxNLocator(10).tick_values(top - _LOG_RANGE, top)  # round numbers for the colour bar
    levels = levels[(levels >= top - _LOG_RANGE - 1e-9)]
    if levels[-1] < top:
        levels = np.append(levels, top)
    z = np.where(finite, np.clip(lp, levels[0], top), levels[0])
    cf = ax.contourf(X, Y, z, levels=levels, cmap=DENSITY_CMAP, extend="neither", zorder=0)
    if with_contours:
        ax.contour(X, Y, z, levels=levels[1:-1:2], colors="steelblue", linewidths=0.5, alpha=0.5, zorder=1)
    return cf


def _style_2d(ax, box, d: int):
    ax.set_xlim(*box[0])
    ax.set_ylim(*box[1])
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")


def _dims_note(d: int) -> str:
    return "" if d == 2 else f" [d={d}: first two coords]"


def _suptitle(fig: Figure, text: str, fontsize: float = 11):
    """Figure title wrapped to the figure width (long titles would otherwise be clipped)."""
    width = max(30, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    fig.suptitle(textwrap.fill(text, width), fontsize=fontsize)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI)
    fig.clear()
    return path


def _eval_score(score_fn: Callable, pts: torch.Tensor, sigma: float) -> np.ndarray:
    """score_fn(pts, sigma * ones) in the model's dtype (float64 for plain functions) -> float64 numpy (N, d)."""
    dtype, device = torch.float64, torch.device("cpu")
    if isinstance(score_fn, torch.nn.Module):
        p = next(iter(score_fn.parameters()), None)
        if p is not None:
            dtype, device = p.dtype, p.device
    x = pts.to(device, dtype)
    s = torch.full((x.shape[0],), float(sigma), dtype=dtype, device=device)
    with torch.no_grad():
        out = score_fn(x, s)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"score_fn must map x (N, d) = {tuple(x.shape)}, sigma (N,) to (N, d), got {got}")
    return out.detach().to("cpu", torch.float64).numpy()


# ----------------------------------------------------------------------------------------------- figures
def score_field(path, score_fn, dist, sigma, *, lim, grid: int = 21, title: str = "", anchor=None) -> Path:
    """Learned vs exact score of q_sigma on a grid, and the log10 relative error.

    Left: arrows of ``score_fn(x, sigma)`` (red) and ``dist.score(x, sigma)`` (black) on a ``grid x grid``
    lattice over filled contours of log q_sigma. Arrows share one scale, with length proportional to
    sqrt|s| (so that the large scores far from the modes do not swamp those near them).
    Right: log10 of ``|s - s*|^2 / |s*|^2`` on a finer lattice, with the density-weighted relative
    Fisher error ``sum q |s - s*|^2 / sum q |s*|^2`` over that lattice in the title.

    For d > 2 the field is drawn on the 2-D slice ``x[2:] = anchor`` (default: the remaining coordinates
    of the most likely of 512 samples of q_sigma, i.e. a slice through a mode); the arrows show the first
    two score components and the error uses all d components.
    """
    d = _check_dist(dist)
    box = _parse_lim(lim)
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable f(x, sigma), got {type(score_fn).__name__}")
    sigma = float(sigma.item() if isinstance(sigma, torch.Tensor) else sigma)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    if sigma == 0 and getattr(dist, "singular", False):
        raise ValueError(f"sigma must be > 0 for the singular law {type(dist).__name__}: its exact score is undefined at 0")

    if d > 2:
        if anchor is None:
            with torch.no_grad():
                s = dist.sample(512, sigma, generator=torch.Generator().manual_seed(0))
                anchor = s[dist.log_prob(s, sigma).argmax(), 2:]
        anchor = torch.as_tensor(anchor, dtype=torch.float64).reshape(-1)
        if anchor.numel() != d - 2:
            raise ValueError(f"anchor must have {d - 2} entries (coordinates 3..d), got {anchor.numel()}")

    def lift(X, Y):
        pts = torch.as_tensor(np.stack([X.ravel(), Y.ravel()], -1), dtype=torch.float64)
        if d > 2:
            pts = torch.cat([pts, anchor.expand(pts.shape[0], d - 2)], -1)
        return pts

    # arrows on the coarse lattice
    Xa, Ya = _grid(box, int(grid))
    pa = lift(Xa, Ya)
    learned = _eval_score(score_fn, pa, sigma)
    with torch.no_grad():
        exact = dist.score(pa, sigma).to(torch.float64).numpy()
    mag = np.sqrt(np.maximum(np.linalg.norm(learned[:, :2], axis=1), np.linalg.norm(exact[:, :2], axis=1)))
    finite_mag = mag[np.isfinite(mag)]
    scale = float(finite_mag.max()) if finite_mag.size and finite_mag.max() > 0 else 1.0
    cell = min((box[0][1] - box[0][0]), (box[1][1] - box[1][0])) / (grid - 1)

    def shrink(v):  # length ∝ sqrt|v|, the longest arrow spans 0.9 cell
        n = np.linalg.norm(v, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            u = np.where(n > 0, v / n, 0.0) * np.sqrt(n)
        return 0.9 * cell * u / scale

    # error heat map and density on the fine lattice
    nf = int(min(160, max(60, 4 * grid)))
    Xf, Yf = _grid(box, nf)
    pf = lift(Xf, Yf)
    lf = _eval_score(score_fn, pf, sigma)
    with torch.no_grad():
        ef = dist.score(pf, sigma).to(torch.float64).numpy()
        lp = dist.log_prob(pf, sigma).to(torch.float64).numpy()
    num = ((lf - ef) ** 2).sum(1)
    den = (ef**2).sum(1)
    tiny = 1e-300
    rel = np.log10(np.maximum(num, tiny) / np.maximum(den, tiny)).reshape(nf, nf)
    w = np.exp(lp - lp[np.isfinite(lp)].max()) if np.isfinite(lp).any() else np.ones_like(lp)
    ok = np.isfinite(num) & np.isfinite(w)
    weighted = float((w[ok] * num[ok]).sum() / max((w[ok] * den[ok]).sum(), tiny))

    fig = Figure(figsize=(12.4, 5.6))
    ax0, ax1 = fig.subplots(1, 2)
    cf = _draw_density(ax0, Xf, Yf, lp.reshape(nf, nf))
    if cf is not None:
        fig.colorbar(cf, ax=ax0, shrink=0.85, label=r"$\log q_\sigma$")
    kw = dict(angles="xy", scale_units="xy", scale=1.0, headwidth=3.5, headlength=4, headaxislength=3.5)
    ue, ul = shrink(exact[:, :2]), shrink(learned[:, :2])
    # exact: wide grey-black arrows underneath; learned: thin red arrows on top (both visible where they agree)
    ax0.quiver(Xa.ravel(), Ya.ravel(), ue[:, 0], ue[:, 1], color=EXACT_COLOUR, alpha=0.55, width=0.0065,
               label="exact $s^*$", zorder=3, **kw)
    ax0.quiver(Xa.ravel(), Ya.ravel(), ul[:, 0], ul[:, 1], color=LEARNED_COLOUR, alpha=0.95, width=0.0028,
               label="learned $s$", zorder=4, **kw)
    _style_2d(ax0, box, d)
    ax0.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax0.set_title(f"score fields at σ={sigma:g}\n(arrow length ∝ √|s|, shared scale)", fontsize=10)

    finite = rel[np.isfinite(rel)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (-3.0, 1.0))
    if hi - lo < 1.0:  # nearly constant error: show at least one decade, centred
        mid = 0.5 * (lo + hi)
        lo, hi = mid - 0.5, mid + 0.5
    im = ax1.imshow(rel, origin="lower", extent=(*box[0], *box[1]), cmap="magma", vmin=lo, vmax=hi,
                    interpolation="nearest", aspect="equal", zorder=0)
    fig.colorbar(im, ax=ax1, shrink=0.85, label=r"$\log_{10}\ |s-s^*|^2/|s^*|^2$")
    lpg = lp.reshape(nf, nf)
    if np.isfinite(lpg).any():
        top = lpg[np.isfinite(lpg)].max()
        ax1.contour(Xf, Yf, np.clip(lpg, top - _LOG_RANGE, top), levels=np.linspace(top - _LOG_RANGE, top, 6)[1:],
                    colors="white", linewidths=0.6, alpha=0.7)
    _style_2d(ax1, box, d)
    ax1.set_title(f"log10 relative error (white: density contours)\nq_σ-weighted rel. Fisher error = {weighted:.3g}",
                  fontsize=10)
    head = title or "learned vs exact score"
    slice_note = "" if d == 2 else f" [d={d}: first two coords, slice x[2:] through a mode]"
    _suptitle(fig, head + slice_note, fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def _sample_panel(ax, pts: np.ndarray, background, box, d: int, name: str, colour: str, *, marker_size: float = 4):
    if background is not None:
        _draw_density(ax, *background, with_contours=True)
    shown = _subset(pts, _MAX_POINTS)
    ax.scatter(shown[:, 0], shown[:, 1], s=marker_size, c=colour, alpha=0.55, linewidths=0, zorder=3,
               rasterized=True)
    inside = ((pts[:, 0] >= box[0][0]) & (pts[:, 0] <= box[0][1]) & (pts[:, 1] >= box[1][0]) & (pts[:, 1] <= box[1][1]))
    nan = ~np.isfinite(pts).all(1)
    note = f"n={pts.shape[0]}"
    if shown.shape[0] < pts.shape[0]:
        note += f", {shown.shape[0]} shown"
    out = int((~inside & ~nan).sum())
    if out:
        note += f", {out} outside box"
    if nan.any():
        note += f", {int(nan.sum())} non-finite"
    ax.set_title(f"{name}\n({note})", fontsize=10)
    _style_2d(ax, box, d)


def _panel_layout(k: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(k, max_cols)
    return math.ceil(k / cols), cols


def samples_over_density(path, samples: dict, dist, *, lim, sigma: float = 0.0, title: str = "") -> Path:
    """One panel per entry of ``samples`` (name -> (N, d)): a scatter of the points over log q_sigma."""
    d = _check_dist(dist)
    box = _parse_lim(lim)
    pts = _check_samples(samples, d)
    s_bg, note = _density_sigma(dist, sigma, box)
    background = _log_density(dist, s_bg, box)
    rows, cols = _panel_layout(len(pts))
    fig = Figure(figsize=(max(5.2, 3.9 * cols + 0.4), 4.1 * rows + 0.8))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for i, (name, x) in enumerate(pts.items()):
        _sample_panel(axes[i], x, background, box, d, name, SAMPLE_COLOURS[i % len(SAMPLE_COLOURS)])
    for ax in axes[len(pts):]:
        ax.set_visible(False)
    bg = note if d == 2 else note.replace("density", "marginal histogram")
    _suptitle(fig, f"{title or 'samples'} — background: {bg}{_dims_note(d)}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def trajectories(path, trajectory, dist, *, lim, n_show: int = 20, title: str = "", sigma: float = 0.0) -> Path:
    """Paths of ``n_show`` particles from a (T, N, d) trajectory over the density of q (at ``sigma``).

    Each path is coloured by time (viridis, start = dark); circles mark starts, crosses ends. A second
    panel shows where all N particles start and end.
    """
    d = _check_dist(dist)
    box = _parse_lim(lim)
    if isinstance(trajectory, torch.Tensor):
        trajectory = trajectory.detach().to("cpu", torch.float64).numpy()
    tr = np.asarray(trajectory, dtype=np.float64)
    if tr.ndim != 3 or tr.shape[2] != d:
        raise ValueError(f"trajectory must have shape (T, N, {d}), got {tuple(tr.shape)}")
    T, N = tr.shape[:2]
    if T < 1 or N < 1:
        raise ValueError(f"trajectory must have T >= 1 and N >= 1, got {tuple(tr.shape)}")
    if isinstance(n_show, bool) or not isinstance(n_show, (int, np.integer)) or n_show < 1:
        raise ValueError(f"n_show must be a positive integer, got {n_show!r}")
    tr = tr[:, :, :2]
    idx = np.sort(np.random.default_rng(0).choice(N, min(int(n_show), N), replace=False))
    s_bg, note = _density_sigma(dist, sigma, box)
    background = _log_density(dist, s_bg, box)

    fig = Figure(figsize=(12.0, 5.6))
    ax0, ax1 = fig.subplots(1, 2)
    for ax in (ax0, ax1):
        _draw_density(ax, *background)
    norm = mcolors.Normalize(0, max(T - 1, 1))
    tsteps = np.arange(T)
    lc = None
    for j in idx:
        p = tr[:, j]
        if T > 1:
            seg = np.stack([p[:-1], p[1:]], 1)
            lc = LineCollection(seg, cmap="viridis", norm=norm, linewidths=1.1, alpha=0.9, zorder=3)
            lc.set_array(tsteps[:-1])
            ax0.add_collection(lc)
    ax0.scatter(tr[0, idx, 0], tr[0, idx, 1], s=22, facecolors="none", edgecolors="k", linewidths=0.9,
                zorder=4, label="start")
    ax0.scatter(tr[-1, idx, 0], tr[-1, idx, 1], s=26, marker="x", c="tab:red", linewidths=1.2, zorder=5, label="end")
    if lc is not None:
        fig.colorbar(lc, ax=ax0, shrink=0.85, label="recorded step")
    ax0.legend(loc="upper left", fontsize=8, framealpha=0.9)
    _style_2d(ax0, box, d)
    ax0.set_title(f"{len(idx)} of {N} particle paths ({T} recorded steps)", fontsize=10)

    start, end = _subset(tr[0], _MAX_POINTS, 1), _subset(tr[-1], _MAX_POINTS, 1)
    ax1.scatter(start[:, 0], start[:, 1], s=3, c="0.45", alpha=0.35, linewidths=0, label="start", rasterized=True)
    ax1.scatter(end[:, 0], end[:, 1], s=3, c="tab:red", alpha=0.5, linewidths=0, label="end", rasterized=True)
    ax1.legend(loc="upper left", fontsize=8, markerscale=4, framealpha=0.9)
    _style_2d(ax1, box, d)
    ax1.set_title(f"all particles: start vs end (n={N})", fontsize=10)
    bg = note if d == 2 else note.replace("density", "marginal histogram")
    _suptitle(fig, f"{title or 'sampler trajectories'} — background: {bg}{_dims_note(d)}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def _numeric(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = v.item()
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _ema(y: np.ndarray, n: int) -> np.ndarray:
    a = 2.0 / (n + 1)
    out = np.empty_like(y)
    acc = y[0]
    for i, v in enumerate(y):
        acc = a * v + (1 - a) * acc
        out[i] = acc
    return out


def curves(path, rows: Sequence[dict], *, keys: Sequence[str], x: str = "step", logy: bool = True,
           title: str = "") -> Path:
    """One panel per key: ``row[key]`` against ``row[x]`` over ``rows`` (e.g. metrics.jsonl lines).

    Rows without ``x`` or the key (or with a non-finite / non-numeric value) are skipped; keys found in no
    row are left out (listed in the title). With ``logy`` a panel goes to a log scale when all its values are
    positive. Long, noisy series (> 50 points) get an EMA-smoothed line over the raw one.
    """
    if isinstance(keys, str):
        keys = [keys]
    keys = list(keys)
    if not keys:
        raise ValueError("keys must name at least one metric")
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
    if len(rows) == 0:
        raise ValueError("rows must not be empty")
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k in keys:
        pts = [(_numeric(r.get(x)), _numeric(r.get(k))) for r in rows if isinstance(r, Mapping)]
        pts = [(a, b) for a, b in pts if a is not None and b is not None]
        if pts:
            arr = np.asarray(pts)
            series[k] = (arr[:, 0], arr[:, 1])
    if not series:
        raise ValueError(f"none of keys {keys} has a numeric value (with a numeric {x!r}) in rows")
    missing = [k for k in keys if k not in series]
    n_rows, n_cols = _panel_layout(len(series), 3)
    fig = Figure(figsize=(4.6 * n_cols + 0.4, 3.4 * n_rows + 0.7))
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for i, (k, (xs, ys)) in enumerate(series.items()):
        ax = axes[i]
        order = np.argsort(xs, kind="stable")
        xs, ys = xs[order], ys[order]
        colour = f"C{i % 10}"
        if len(xs) > 50:
            ax.plot(xs, ys, color=colour, alpha=0.3, linewidth=0.8, label="raw")
            ax.plot(xs, _ema(ys, max(5, len(xs) // 25)), color=colour, linewidth=1.6, label="EMA")
            ax.legend(fontsize=8)
        else:
            ax.plot(xs, ys, color=colour, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.4)
        if logy and (ys > 0).all():
            ax.set_yscale("log")
        ax.set_title(f"{k} (last {ys[-1]:.4g})", fontsize=10)
        ax.set_xlabel(x)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    head = title or "training curves"
    if missing:
        head += f"  (no data: {', '.join(missing)})"
    _suptitle(fig, head, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def fisher_per_level(path, per_method: dict, sigmas, title: str = "", ylabel: str | None = None) -> Path:
    """Relative Fisher error (or another per-level error, named by ``ylabel``) per noise level, one line per
    method, log-log against sigma.

    ``per_method``: name -> list of L errors (one per entry of ``sigmas``, shape (L,)). Non-positive or
    non-finite errors are not drawn (a log axis cannot show them).
    """
    if not isinstance(per_method, Mapping):
        raise TypeError(f"per_method must be a dict name -> list of errors, got {type(per_method).__name__}")
    if len(per_method) == 0:
        raise ValueError("per_method must not be empty")
    sig = np.asarray(sigmas.detach().cpu() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64).reshape(-1)
    if sig.size == 0 or not np.isfinite(sig).all() or (sig <= 0).any():
        raise ValueError(f"sigmas must be a non-empty 1-D sequence of positive finite levels, got {sigmas!r}")
    fig = Figure(figsize=(7.2, 5.0))
    ax = fig.subplots()
    markers = "osD^v<>ph*"
    drawn = False
    for i, (name, errs) in enumerate(per_method.items()):
        e = np.asarray(errs.detach().cpu() if isinstance(errs, torch.Tensor) else errs, dtype=np.float64).reshape(-1)
        if e.shape != sig.shape:
            raise ValueError(f"per_method[{name!r}] must have one error per sigma ({sig.size}), got {e.size}")
        ok = np.isfinite(e) & (e > 0)
        if ok.any():
            drawn = True
        o = np.argsort(sig[ok])
        ax.plot(sig[ok][o], e[ok][o], marker=markers[i % len(markers)], markersize=5, linewidth=1.5,
                color=f"C{i % 10}", label=f"{name} (mean {e[ok].mean():.3g})" if ok.any() else f"{name} (no data)")
    ax.set_xscale("log")
    if drawn:
        ax.set_yscale("log")
    ax.set_xlabel(r"noise level $\sigma$")
    ax.set_ylabel(ylabel or r"relative Fisher error $\mathbb{E}|s-s^*|^2 / \mathbb{E}|s^*|^2$")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(title or "score error per noise level", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def comparison(path, samples: dict, dist, table: dict, *, lim, sigma: float = 0.0, title: str = "") -> Path:
    """Samples of each method side by side over the density, with the metrics table under the panels.

    ``table``: method -> {metric: value}; rows follow ``samples`` order then any extra methods, columns the
    union of metric names in first-seen order; missing entries show "—". The best value of each column
    (smallest, as all metrics here are errors/distances) is bold.
    """
    d = _check_dist(dist)
    box = _parse_lim(lim)
    pts = _check_samples(samples, d)
    if not isinstance(table, Mapping):
        raise TypeError(f"table must be a dict method -> {{metric: value}}, got {type(table).__name__}")
    methods = list(pts) + [str(m) for m in table if str(m) not in pts]
    tab = {str(m): dict(v) for m, v in table.items() if isinstance(v, Mapping)}
    if len(tab) != len(table):
        raise ValueError("table values must be dicts metric -> value")
    cols: list[str] = []
    for v in tab.values():
        cols += [str(c) for c in v if str(c) not in cols]

    s_bg, note = _density_sigma(dist, sigma, box)
    background = _log_density(dist, s_bg, box)
    k = len(pts)
    panel = 3.9 if k <= 4 else 3.1
    n_tab = len([m for m in methods if m in tab])
    tab_h = (0.3 * (n_tab + 1) + 0.25) if cols else 0.0
    fig = Figure(figsize=(max(panel * k + 0.4, 5.2, 2.0 + 1.3 * len(cols)), panel + 1.2 + tab_h))
    gs = fig.add_gridspec(2 if cols else 1, k, height_ratios=[panel + 0.9, tab_h] if cols else None)
    for i, (name, x) in enumerate(pts.items()):
        ax = fig.add_subplot(gs[0, i])
        _sample_panel(ax, x, background, box, d, name, SAMPLE_COLOURS[i % len(SAMPLE_COLOURS)])
        if i:
            ax.set_ylabel("")
    if cols:
        tax = fig.add_subplot(gs[1, :])
        tax.axis("off")
        rows = [m for m in methods if m in tab]
        vals = np.full((len(rows), len(cols)), np.nan)
        for r, m in enumerate(rows):
            for c, name in enumerate(cols):
                v = _numeric(tab[m].get(name))
                vals[r, c] = np.nan if v is None else v
        text = [[m] + ["—" if np.isnan(v) else f"{v:.4g}" for v in row] for m, row in zip(rows, vals)]
        # the method name is a first column (not rowLabels, which would hang outside the axes)
        first = min(0.3, max(0.12, 0.012 * max(len(m) for m in rows)))
        widths = [first] + [(1 - first) / len(cols)] * len(cols)
        t = tax.table(cellText=text, colLabels=["method"] + cols, colWidths=widths, loc="center", cellLoc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(9)
        t.scale(1.0, 1.3)
        for c in range(len(cols)):
            col = vals[:, c]
            if np.isfinite(col).sum() >= 2:
                t[int(np.nanargmin(col)) + 1, c + 1].set_text_props(fontweight="bold")
        for (r, c), cell in t.get_celld().items():
            if r == 0 or c == 0:
                cell.set_facecolor("#e8eef7")
    bg = note if d == 2 else note.replace("density", "marginal histogram")
    _suptitle(fig, f"{title or 'method comparison'} — background: {bg}{_dims_note(d)}"
                 + ("  (bold: lowest)" if cols else ""), fontsize=11)
    fig.tight_layout()
    return _save(fig, path)

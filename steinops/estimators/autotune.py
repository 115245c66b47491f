"""Hyper-parameters from the samples alone: score matching over a small grid.

The knob is the estimator's regulariser (``eta`` of the SGE, ``lam`` of KEF / Landweber / nu, ``eig_mass`` of
the SSGE; ``ScoreEstimator.knob``), the bandwidth a multiple of the median distance. Every candidate is scored
by Hyvarinen's identity: for a fixed function g, ``E[1/2 |g|^2 + div g] = 1/2 E|g - grad log q|^2 - 1/2
E|grad log q|^2``, which orders candidates exactly as their Fisher error does without knowing the score.
Which error, and so which identity, is the criterion's choice:

In-sample SURE (Stein's unbiased risk estimate; criterion "sure"). The in-sample estimate G_i depends on x_i
itself, so integrate by parts in x_i with the other samples fixed: ``E[G_i . s(x_i)] = -E[tr_i]`` with
``tr_i = sum_k dG_ik / dx_ik`` the diagonal block of the fit's *total* Jacobian (the fit moves with x_i), and

    E[ 1/2 |G_i|^2 + tr_i ]  =  1/2 E|G_i - grad log q(x_i)|^2  -  1/2 E|grad log q(x_i)|^2,

an unbiased estimate of the in-sample error from one fit, for any estimator whose fit is differentiable in
the samples (``sure_terms``). tr_i is exact where the estimator allows it: for the SGE and KEF with a diagonal
kernel in closed form (``stein_loo.py``; there it equals leave-one-out exactly: Li & Turner's prediction at x_i
from the other samples *is* G_i), and for the other spectral filters of K with a diagonal kernel (SSGE,
Landweber, nu) from one eigendecomposition (``spectral_sure.py``, for d <= ``spectral_sure.EXACT_SURE_MAX_D``). Otherwise
(curl-free kernels, larger d) tr_i is a Hutchinson estimate ``v_i . (J v)_i`` over ``SURE_PROBES`` Rademacher
probes shared by all candidates, with J v by autograd (SSGE, curl-free KEF) or by central differences of
batched refits (Landweber, nu: Monte-Carlo SURE, Ramani, Blu & Unser 2008; their autograd backward revisits
every iteration). The divergence of the *prediction* at the samples (what a held-out criterion computes)
misses the fit's own dependence on x_i: on the two-mode toy it was 60 standard errors off
(``tests/test_autotune.py``). SSGE's truncation makes its fit jump where the count J changes, which the
derivative does not see: there SURE was biased upward by 2.8 standard errors (M = 40, 400 sets).

Leave-one-out by refits (criterion "loo"): every x_i is scored by the prediction of the fit on the other
M - 1 samples (one batched fit of M sets per candidate, O(M^4) for dense solvers: up to ``LOO_MAX``). The refits
fit the candidate's ``loo_model(x)``: the SSGE with ``eig_mass`` keeps the count J of its fit on all M points,
since a threshold re-applied to M - 1 points can move J and score another model than the one fitted (it chose a
candidate 7.5x the oracle's error on two_mode, sigma = 0.5, M = 128, draw 4).
K-fold (criterion "kfold"): held-out parts of ``holdout`` of the samples, ``folds`` per partition averaged
over ``repeats`` random partitions. Both estimate the *out-of-sample* error of fits on fewer points, which
prefers smoother candidates than the in-sample error does.

"auto" (the default): the closed form where there is one (also on warm starts); leave-one-out by refits on a
fresh search with M <= ``LOO_MAX`` (except for estimators with ``small_search_uses_exact_sure`` where their exact
SURE exists: Landweber and the SSGE); SURE otherwise (exact where there is the spectral trace). Measured on
``benchmarks/accuracy.py`` (sigma = 0.1, the nine distributions, in-sample error over the in-sample oracle of
the same grid). At M = 1024 with 8 Hutchinson probes, SURE was over 1.3x in 3 of the 27 SSGE / Landweber / nu
cases; the SSGE on the 2-D gmm (1.56x) was probe noise (per probe, the standard deviation of the SURE gap
between the two best candidates was 3x the exact gap) and the exact trace picks the oracle's candidate there.
What remains is the sampling noise of SURE itself: Landweber on that gmm (1.63x) and nu on the spiral (1.32x) pick
a candidate whose exact SURE ties the oracle's (differences of 0.001 and 0.9 with paired standard errors of 0.015
and 1.2), and over 8 sample sets the mean of SURE minus the true in-sample objective was within 2.1 standard
errors of 0 for each of the 6 candidates examined (no bias seen). At M = 128 the exact SURE's choice is noisier
than leave-one-out's (4 of 27 cases over 1.3x at sigma = 0.1 and 2 of 9 at sigma = 0.5, against 1 and 1), so small
fresh searches keep leave-one-out -- except Landweber's: per estimator over 5 draws of the 9 cases at sigma = 0.1,
auto's mean error over the oracles' mean was (geo-mean over cases) 1.07x with the exact SURE against 1.12x with
leave-one-out for Landweber (41 against 38 of 45 draws within 1.3x; leave-one-out over-regularised it on the
sphere in 4 of 5 draws, 1.44x on average), and 1.15x against 1.10x / 1.13x for nu / the SSGE (4 draws each).
Over more draws the SSGE went the other way (the 12 cases at M = 128, sigma = 0.1 and 0.5): the exact SURE gave
1.13x against leave-one-out's 1.16x on draws 0-9, 1.22x against 1.27x on draws 10-19 and 1.14x against 1.32x on
draws 20-29 (sigma = 0.1), where leave-one-out's argmin picked 5-6x the oracle's error on single two_mode draws;
so the SSGE uses its exact SURE too. For nu leave-one-out stays ahead over draws 0-9 (1.08x against 1.17x).

Selection with an anchor. The per-point criterion differences between a candidate and an *anchor* (the
estimator's default on a fresh search, the previous choice on a warm start) are paired, so their standard
error is known; the best candidate replaces the anchor only when it is better by more than ``se_rule``
standard errors (``SE_RULE`` for the closed form and K-fold: the closed form's argmin lost 1.9x to noise on
the two-mode toy at M = 1024; ``LOO_SE_RULE`` = 0, plain argmin, for leave-one-out by refits: the anchor
kept the SSGE's default 1.7x and 1.9x worse on the moons and the spiral at M = 128; ``SURE_SE_RULE`` for
the other SURE). These rules were chosen on ``benchmarks/accuracy.py``, the benchmark the target is judged on.

Edge extension (``extend_edge``; on by default for every estimator: ``ScoreEstimator.extends_edge``).
On thin structures at small noise (the rings, the curves) the best bandwidth can lie below the grid's smallest
multiple, and then a search on the grid sits on its edge. With the extension, a fresh search whose choice has
the smallest multiple searched so far also scores that multiple halved (every knob value), and the best of those
replaces the choice when it is better by more than ``EDGE_SE_RULE`` paired standard errors; repeated down to
``EDGE_MIN_MULT``. Searching 1/16-4 x median outright instead made the SGE 1.13x worse at M = 128 (small
bandwidths have the noisiest criterion; ``benchmarks/grid_edge.py``). On ``benchmarks/accuracy.py`` (the oracle's
grid widened to 1/16-4 x median; mean in-sample error over 10 draws against auto without it, geo-mean over the 9
distributions at sigma = 0.1): at M = 128 the SGE / KEF 0.978 (rings 0.837), Landweber 0.973 (rings 0.768), nu
0.988 (rings 0.893); at M = 1024 the SGE / KEF 0.955 (rings 0.653; worst the checkerboard, 1.009), Landweber
0.879 (rings 0.313), nu 0.913 (rings 0.443); at M = 8192 (one draw) the SGE's error on the rings, the
checkerboard and eight_gaussians fell to 0.48, 0.64 and 0.83 of auto's without it. At sigma = 0.5 no choice
changed. Auto's ratio to the (wider) oracle stays as it was (the SGE at M = 1024: 1.084 against 1.074). The
SSGE extends since 2026-12-07 (off before: at M = 128 it gains nothing, 1.009x over 10 draws of the 9 cases, the
moons 1.088x; but at M = 1024 its error on the rings is 0.304x that without the extension over 10 draws, every
other case unchanged; at M = 8192 on the rings, one draw, 0.776 -> 0.065).

Knob extension (``extend_knob``; on by default for the SGE and KEF with a diagonal kernel:
``ScoreEstimator.extends_knob_edge``, values ``knob_edge_values``: eta 0.003 then 0.001, KEF's lam = eta / M).
Data near a low-dimensional set (a mixture on a 2-d subspace of R^10) wants less ridge than the grid's smallest
eta = 0.01, with a wider bandwidth. A fresh search whose choice has the grid's least-regularised value also
scores the next value past it at every bandwidth multiple (and the choice's own), and moves there when that wins
by ``EDGE_SE_RULE`` paired standard errors; then the next. On ``benchmarks/accuracy.py`` (10 draws; auto's mean
in-sample error against auto's without it) subspace_gmm falls to 0.640x at M = 128 and 0.724x at M = 1024 and the
sphere to 0.946x at M = 128; every other case of the 12 at M = 128 and of the 9 + 3 at M = 1024 is unchanged (their
choices sit inside the grid, or the extension's candidates do not win). The oracle's grid then includes these
values, and where auto's choice sits inside the grid the wider oracle can expose a miss it could not see before
(the rings at sigma = 0.5, M = 128: 1.42x -> 1.70x, the sphere at M = 128: 1.03x -> 1.23x, auto unchanged or
better). Searching eta in 0.001-3 outright instead was mixed: 0.975x the extension's error at M = 128 (geo-mean of
12 cases, 10 draws; the sphere 0.815x, the rings at sigma = 0.5 0.887x, but the 2-D gmm 1.070x and the rings at
sigma = 0.1 1.044x) and 1.068x on the rings at sigma = 0.5, M = 1024 (5 draws; 5 other cases identical). Starting
the extension also where the best grid value at *some* bandwidth multiple is the least-regularised one (not only at
the choice's) gained little: 0.997x at M = 128 (the rings at sigma = 0.5 0.974x, the sphere 0.988x; 3 of 120 draws
moved, each to the oracle's candidate), identical at M = 1024 (12 cases x 10 draws); not adopted. Landweber
and nu are not extended (their iteration count grows as 1 / lam), nor the SSGE (eig_mass 0.9999 was measured
and not adopted), nor curl-free KEF (its refits).

Warm start (``previous=``, for training loops that refit at every step): only the neighbourhood of the
previous choice is searched, per sample set (bandwidth multiple x {1/sqrt 2, 1, sqrt 2}, the neighbouring
knob values on the grid), anchored at the previous choice, with the closed form or SURE (criterion "auto"),
or one held-out split ("kfold"): 9 candidates instead of ~31. ``ScoreEstimator(tune_every=n)`` goes further
and reuses the chosen multiple and knob for n - 1 fits in between.

Held-out divergences are exact (d backward passes) for d <= ``exact_div_max`` and Hutchinson estimates above.
Each sample set of a batch (e.g. each noise level) gets its own choice; each candidate is one batched fit for
all sets at once.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings

import torch

from ..bandwidth import MEDIAN_FACTOR, median_distance
from .. import _checks

BANDWIDTH_MULTS = (0.25, 0.5, 1.0, 2.0, 4.0)
LOO_MAX = 128  # leave-one-out by refits costs M fits of M - 1 points per candidate: O(M^4) for dense solvers
LOO_CHUNK_ENTRIES = 2**24  # Gram entries per batched leave-one-out fit (memory bound)
CRITERIA = ("auto", "sure", "loo", "kfold")
SURE_PROBES = 8  # Rademacher probes of the Hutchinson trace in the in-sample SURE criterion
WARM_BANDWIDTH_STEPS = (2**-0.5, 1.0, 2**0.5)
SE_RULE = 1.0  # K-fold and closed-form leave-one-out (the anchor rule)
LOO_SE_RULE = 0.0  # leave-one-out by refits
SURE_SE_RULE = 1.0  # SURE without a closed-form leave-one-out (the anchor rule)
KFOLD_REPEATS = 4  # random K-fold partitions averaged on a fresh search (split-to-split noise)
EDGE_MIN_MULT = 1 / 16  # the edge extension halves the bandwidth multiple down to this (``extend_edge``)
EDGE_SE_RULE = 1.0  # a halved bandwidth replaces the choice only when better by this many paired SEs


class AutoTune:
    """Settings of ``bandwidth="auto"``; pass an instance as ``bandwidth=AutoTune(...)`` to change them.

    Args:
        warm_start: after the first fit, search only around the previous choice (1 split, 9 fits).
        tune_every: re-tune at every n-th fit only; in between reuse the chosen bandwidth multiple
            (times the new median distance) and knob. For refits on fresh batches in a training loop.
        criterion, folds, repeats, holdout, se_rule, probes: as for ``tune`` (criterion "auto": the
            closed-form leave-one-out (= SURE) of the SGE / diagonal KEF, leave-one-out by refits on a fresh
            search with M <= ``LOO_MAX`` (Landweber, the SSGE: their exact SURE where they have one), else in-sample SURE: exact for the SSGE / Landweber / nu with a
            diagonal kernel and d <= ``spectral_sure.EXACT_SURE_MAX_D``, else with ``probes`` Hutchinson probes; folds None: 4
            up to M = 2048, else 1; repeats None: ``KFOLD_REPEATS`` K-fold partitions on a fresh search with
            4 folds, else 1).
        extend_edge: on a fresh search, halve the bandwidth below the grid while the choice sits at its smallest
            multiple and the halved one wins by ``EDGE_SE_RULE`` paired SEs (see the module); None: the
            estimator's ``extends_edge`` (True for every estimator here).
        extend_knob: on a fresh search, go on past the knob grid's least-regularised end (``knob_edge_values``)
            while the choice sits there and the next value wins by ``EDGE_SE_RULE`` paired SEs (see the module);
            None: the estimator's ``extends_knob_edge`` (the SGE and KEF with a diagonal kernel).
        seed: seed of the random splits and probes (None: torch's global generator).
    """

    def __init__(self, *, warm_start: bool = False, tune_every: int = 1, criterion: str = "auto",
                 folds: int | None = None, repeats: int | None = None, holdout: float = 0.25,
                 se_rule: float | None = None, probes: int | None = None, extend_edge: bool | None = None,
                 extend_knob: bool | None = None, seed: int | None = None):
        _checks.flag("warm_start", warm_start)
        if extend_edge is not None:
            _checks.flag("extend_edge", extend_edge)
        if extend_knob is not None:
            _checks.flag("extend_knob", extend_knob)
        if isinstance(tune_every, bool) or not isinstance(tune_every, int) or tune_every < 1:
            raise ValueError(f"tune_every must be a positive int, got {tune_every!r}")
        if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 1):
            raise ValueError(f"folds must be None or a positive int, got {folds!r}")
        if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
            raise ValueError(f"repeats must be None or a positive int, got {repeats!r}")
        if not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
            raise ValueError(f"probes must be None or a positive int, got {probes!r}")
        self.repeats, self.probes, self.extend_edge, self.extend_knob = repeats, probes, extend_edge, extend_knob
        self.se_rule = _check_se_rule(se_rule)
        self.criterion = _check_criterion(criterion)
        self.warm_start, self.tune_every, self.folds, self.holdout, self.seed = warm_start, tune_every, folds, holdout, seed

    def __repr__(self):
        return (f"AutoTune(warm_start={self.warm_start}, tune_every={self.tune_every}, criterion={self.criterion!r}, "
                f"folds={self.folds}, repeats={self.repeats}, probes={self.probes}, "
                f"holdout={self.holdout}, se_rule={self.se_rule}, extend_edge={self.extend_edge}, "
                f"extend_knob={self.extend_knob}, seed={self.seed})")


def _check_se_rule(se_rule) -> float | None:
    if se_rule is None or se_rule == 0:
        return se_rule if se_rule is None else 0.0
    return _checks.positive_number("se_rule", se_rule)


def _check_criterion(criterion) -> str:
    if not isinstance(criterion, str) or criterion.lower() not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return criterion.lower()


def divergence(g: torch.Tensor, z: torch.Tensor, *, exact_div_max: int = 16, n_probes: int = 4,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``div g`` at each row of z (..., N, d) for g = f(z) computed row-wise; returns (..., N)."""
    d = z.shape[-1]
    if d <= exact_div_max:
        cols = [torch.autograd.grad(g[..., i].sum(), z, retain_graph=True)[0][..., i] for i in range(d)]
        return torch.stack(cols, -1).sum(-1)
    total = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    for _ in range(n_probes):
        v = (torch.randint(0, 2, z.shape, generator=generator, dtype=torch.int64).to(z) * 2 - 1)
        jv = torch.autograd.grad((g * v).sum(), z, retain_graph=True)[0]
        total = total + (jv * v).sum(-1)
    return total / n_probes


def heldout_terms(est, xb: torch.Tensor, **div_kw) -> torch.Tensor:
    """Per-point Hyvarinen terms ``|g|^2 / 2 + div g`` of a fitted estimator at held-out xb; (..., N)."""
    with torch.enable_grad():
        z = xb.detach().requires_grad_()
        g = est.predict(z)
        div = divergence(g, z, **div_kw)
    return 0.5 * (g.detach() ** 2).sum(-1) + div.detach()


def heldout_objective(est, xb: torch.Tensor, **div_kw) -> torch.Tensor:
    """Hyvarinen's objective of a fitted estimator's predictions at held-out points xb; returns (...)."""
    return heldout_terms(est, xb, **div_kw).mean(-1)


def has_closed_form_loo_for(est, x: torch.Tensor) -> bool:
    """Whether candidates of ``est`` (numeric bandwidths) have a closed-form leave-one-out on x."""
    return has_closed_form_loo(candidate(est, torch.ones(x.shape[:-2], dtype=x.dtype, device=x.device), None), x)


def has_closed_form_loo(est, x: torch.Tensor) -> bool:
    """Whether ``est`` gives its leave-one-out terms on x from one fit (``est.closed_form_loo``)."""
    check = getattr(est, "closed_form_loo_fits", None)
    return check is not None and check(x)


def has_exact_sure_for(est, x: torch.Tensor) -> bool:
    """Whether candidates of ``est`` (numeric bandwidths) have an exact in-sample SURE on x (closed-form
    leave-one-out, or ``est.exact_sure``)."""
    return has_exact_sure(candidate(est, torch.ones(x.shape[:-2], dtype=x.dtype, device=x.device), None), x)


def has_exact_sure(est, x: torch.Tensor) -> bool:
    """Whether ``est`` gives its in-sample SURE terms on x exactly from one computation: the closed-form
    leave-one-out of the SGE / diagonal KEF, or the spectral-filter trace (``est.exact_sure``)."""
    return has_closed_form_loo(est, x) or _has_spectral_trace(est, x)


def _has_spectral_trace(est, x: torch.Tensor) -> bool:
    check = getattr(est, "exact_sure_fits", None)
    return check is not None and check(x)


def loo_terms(est, x: torch.Tensor) -> torch.Tensor:
    """Leave-one-out Hyvarinen terms (..., M): for each i, ``est`` (bandwidth and knob tensors of shape (...))
    fitted on the samples other than x_i and evaluated at x_i. In closed form where the estimator has one,
    else M refits run as batched fits of sets (..., chunk, M - 1, d), at most ``LOO_CHUNK_ENTRIES`` Gram
    entries at a time."""
    if has_closed_form_loo(est, x):
        return est.closed_form_loo(x.detach())
    est = est.loo_model(x)  # e.g. the SSGE's J held at the full fit's
    batch, M = x.shape[:-2], x.shape[-2]
    others = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, M)]) for i in range(M)]).to(x.device)
    per_set = max(1, math.prod(batch)) * (M - 1) ** 2
    chunk = max(1, LOO_CHUNK_ENTRIES // per_set)
    knob = est.knob if est.knob is not None and isinstance(getattr(est, est.knob), torch.Tensor) else None
    out = []
    for lo in range(0, M, chunk):
        rows = torch.arange(lo, min(M, lo + chunk), device=x.device)
        n = rows.numel()
        spread = lambda t: t[..., None].expand(*batch, n)  # noqa: E731  (...) -> (..., n): one per left-out set
        c = est.candidate(spread(est.bandwidth), spread(getattr(est, knob)) if knob else None)
        c.spread_sets(spread)
        fitted = c.fit(x.detach()[..., others[rows], :])  # (..., n, M - 1, d)
        out.append(heldout_terms(fitted, x.detach()[..., rows, None, :])[..., 0])  # (..., n)
    return torch.cat(out, -1)


def rademacher_probes(x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """n Rademacher tensors shaped like x (drawn on the CPU generator, moved to x's device)."""
    return [(torch.randint(0, 2, x.shape, generator=generator, dtype=torch.int64) * 2 - 1).to(x) for _ in range(n)]


def sure_terms(est, x: torch.Tensor, probes: list[torch.Tensor] | None, *, exact: bool = True,
               cache: dict | None = None) -> torch.Tensor:
    """In-sample SURE terms (..., M): ``1/2 |G_i|^2 + tr_i`` with G = ``est.fit(x).scores_`` and
    ``tr_i = sum_k dG_ik / dx_ik`` the diagonal block of the fit's total Jacobian (every sample moves the
    fit). Exact where the estimator has it and ``exact`` (the closed form ``est.closed_form_loo`` of the SGE /
    diagonal KEF, always; the spectral-filter trace ``est.exact_sure`` of the SSGE / Landweber / nu), else a
    Hutchinson estimate ``v_i . (J v)_i`` averaged over the Rademacher ``probes`` (pass the same probes to
    every candidate, so that their differences share the probe noise), with ``J v`` from one backward pass
    per probe (``est.sure_jacobian == "autograd"``) or by central differences of batched refits on x +- eps v
    (``"finite_difference"``: Monte-Carlo SURE, for iterative fits whose backward costs many forwards).
    ``cache``: a dict kept across the candidates of one search (the exact trace reuses an eigendecomposition
    between candidates of the same bandwidth)."""
    if has_closed_form_loo(est, x):
        return est.closed_form_loo(x.detach())
    if exact and _has_spectral_trace(est, x):
        return est.exact_sure(x.detach(), cache=cache)
    if not probes:
        raise ValueError("probes must hold at least one Rademacher tensor where the trace is not exact")
    x = x.detach()
    if getattr(est, "sure_jacobian", "autograd") == "finite_difference":
        G, tr = _fd_traces(est, x, probes)
    else:
        with torch.enable_grad():
            xr = x.clone().requires_grad_()
            G = est.fit(xr).scores_
            tr = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
            for i, v in enumerate(probes):
                jt, = torch.autograd.grad(G, xr, grad_outputs=v, retain_graph=i + 1 < len(probes))
                tr = tr + (v * jt).sum(-1)
        G = G.detach()
    return 0.5 * (G ** 2).sum(-1) + tr / len(probes)


FD_REL_STEP = {torch.float64: 1e-5, torch.float32: 1e-3}  # eps / bandwidth: truncation (eps/h)^2 vs rounding u/(eps/h)


def _fd_traces(est, x, probes):
    """(G (..., M, d), sum over probes of ``v_i . (J v)_i`` (..., M)) with ``J v = (G(x + eps v) - G(x - eps v)) / 2 eps``,
    eps = ``FD_REL_STEP`` x the bandwidth per set; the perturbed sets are fitted as extra batch entries, as many
    at a time as keep the batch's Gram matrices within the dense budget."""
    from .base import DENSE_MAX_ENTRIES  # noqa: PLC0415  (base imports this module)
    batch, M = x.shape[:-2], x.shape[-2]
    h = est.bandwidth
    knob = est.knob if est.knob is not None and isinstance(getattr(est, est.knob), torch.Tensor) else None
    eps = (FD_REL_STEP.get(x.dtype, 1e-3) * h)[..., None, None]  # (..., 1, 1)
    per_probe = 2 * max(1, math.prod(batch)) * M * M
    chunk = max(1, min(len(probes), DENSE_MAX_ENTRIES // per_probe))
    G = est.fit(x).scores_.detach()
    tr = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for lo in range(0, len(probes), chunk):
        V = torch.stack(probes[lo:lo + chunk])  # (n, ..., M, d)
        n = V.shape[0]
        xs = torch.cat([x + eps * V, x - eps * V])  # (2n, ..., M, d)
        spread = lambda t: t.expand(2 * n, *t.shape)  # noqa: E731
        c = est.candidate(spread(h), spread(getattr(est, knob)) if knob else None)
        Gs = c.fit(xs).scores_.detach()
        Jv = (Gs[:n] - Gs[n:]) / (2 * eps)
        tr = tr + (V * Jv).sum(-1).sum(0)
    return G, tr


def _splits(x, holdout, folds, generator):
    """One random partition: ``folds`` disjoint held-out parts of ``round(holdout M)`` points each; a list of
    (kept points, held-out points, held-out indices)."""
    M = x.shape[-2]
    nb = min(M - 2, max(1, round(holdout * M)))
    if nb < 1:
        raise ValueError(f"x needs at least 3 points per set to hold some out, got {M}")
    folds = max(1, min(int(folds), M // nb))
    perm = torch.randperm(M, generator=generator, device="cpu").to(x.device)
    out = []
    for f in range(folds):
        held = perm[f * nb:(f + 1) * nb]
        kept = torch.cat([perm[:f * nb], perm[(f + 1) * nb:]])
        out.append((x[..., kept, :].detach(), x[..., held, :].detach(), held))
    return out


def kfold_terms(est, partitions) -> torch.Tensor:
    """Held-out Hyvarinen terms per point, averaged over the partitions in which the point was held out;
    (..., n) for the n points held out at least once (a non-finite term makes the point's average inf)."""
    total = count = None
    for splits in partitions:
        for xa, xb, held in splits:
            t = heldout_terms(est.fit(xa), xb)
            t = torch.where(torch.isfinite(t), t, torch.full_like(t, float("inf")))
            if total is None:
                total = t.new_zeros(*t.shape[:-1], xa.shape[-2] + xb.shape[-2])
                count = torch.zeros(total.shape[-1], dtype=torch.long, device=t.device)
            total[..., held] += t
            count[held] += 1
    seen = count > 0
    return total[..., seen] / count[seen]


def _neighbours(grid, value):
    """Per set: the grid values at index offsets -1, 0, +1 of the grid value nearest ``value`` (...)."""
    g = torch.as_tensor(grid, dtype=value.dtype, device=value.device)
    idx = (value.log().unsqueeze(-1) - g.log()).abs().argmin(-1)
    return [g[(idx + off).clamp(0, len(grid) - 1)] for off in (-1, 0, 1)]


def fresh_grid(est, M: int, bandwidth_mults=BANDWIDTH_MULTS, knob_values=None) -> list[tuple[float, float | None]]:
    """The candidates of a fresh search, (bandwidth multiple, knob value or None), the anchor (the estimator's
    default) first, then ``bandwidth_mults`` x the knob's grid (``knob_values`` overrides ``est.knob_grid(M)``)."""
    default = est.knob_default(M) if est.knob_is_auto() else None
    return [(MEDIAN_FACTOR, default)] + list(itertools.product(bandwidth_mults, _knob_values(est, M, knob_values)))


def _knob_values(est, M: int, knob_values=None) -> tuple:
    """The knob values a fresh search tries: ``knob_values``, else ``est.knob_grid(M)`` when the knob is tuned,
    else (None,)."""
    if knob_values is not None:
        return tuple(knob_values)
    return tuple(est.knob_grid(M)) if est.knob_is_auto() else (None,)


def edge_mults(lowest: float = min(BANDWIDTH_MULTS), floor: float = EDGE_MIN_MULT) -> list[float]:
    """The bandwidth multiples the edge extension can reach below ``lowest``: lowest / 2, lowest / 4, ... >= floor."""
    out, m = [], lowest / 2
    while m >= floor * (1 - 1e-9):
        out.append(m)
        m /= 2
    return out


def anchor_choice(terms: torch.Tensor, se_rule: float) -> torch.Tensor:
    """The anchor rule on per-point criterion terms (C, ..., n) of C candidates, the anchor first: the index (...)
    of the candidate with the least mean where it beats the anchor by more than ``se_rule`` paired standard
    errors, else 0 (and never a non-finite anchor)."""
    means = terms.mean(-1)  # (C, ...)
    best = means.argmin(0)  # (...)
    best_terms = torch.gather(terms, 0, best[None, ..., None].expand(1, *terms.shape[1:]))[0]
    gain, se = paired_gain(best_terms, terms[0])
    take = torch.isfinite(gain) & (gain < -se_rule * se)
    take = take | ~torch.isfinite(means[0])  # a broken anchor (e.g. NaN fit) never wins
    return torch.where(take, best, torch.zeros_like(best))


def paired_gain(terms: torch.Tensor, against: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (...) and standard error (...) of the per-point differences ``terms - against`` (..., n)."""
    diff = terms - against
    n = diff.shape[-1]
    se = diff.std(-1) / math.sqrt(max(1, n - 1)) if n > 1 else torch.zeros_like(diff[..., 0])
    return diff.mean(-1), se


def _best_candidate(score, cands) -> dict:
    """Per set, the candidate of least mean criterion among ``cands`` [(mult (...), knob (...) or None)]:
    dict of ``terms`` (..., n), ``mult`` and ``knob`` (...) (non-finite terms count as +inf)."""
    best = None
    for mult, knob in cands:
        t = score(mult, knob)
        t = torch.where(torch.isfinite(t), t, torch.full_like(t, float("inf")))
        if best is None:
            best = dict(terms=t, mult=mult, knob=knob)
            continue
        better = t.mean(-1) < best["terms"].mean(-1)
        best = dict(terms=torch.where(better[..., None], t, best["terms"]), mult=torch.where(better, mult, best["mult"]),
                    knob=None if knob is None else torch.where(better, knob, best["knob"]))
    return best


def _take_if_better(out: dict, best: dict, where: torch.Tensor, se_rule: float) -> tuple[dict, torch.Tensor]:
    """``best`` replaces the choice ``out`` in the sets ``where`` it is better by more than ``se_rule`` paired
    standard errors; returns the new choice and the mask of sets that moved."""
    gain, se = paired_gain(best["terms"], out["terms"])
    take = where & torch.isfinite(gain) & (gain < -se_rule * se)
    return dict(terms=torch.where(take[..., None], best["terms"], out["terms"]),
                mult=torch.where(take, best["mult"], out["mult"]),
                knob=None if out["knob"] is None else torch.where(take, best["knob"], out["knob"])), take


def edge_extension(score, chosen: dict, lowest: float, knob_values, *, se_rule: float = EDGE_SE_RULE,
                floor: float = EDGE_MIN_MULT) -> dict:
    """The edge extension of a fresh search (module docstring), per sample set.

    ``chosen``: the search's choice, a dict of ``terms`` (..., n) (criterion terms per point), ``mult`` (...) and
    ``knob`` (...) or None; ``lowest`` the smallest bandwidth multiple searched; ``score(mult, knob)`` the
    criterion terms (..., n) of a candidate (tensors (...)); ``knob_values`` the knob's grid ([None]: no knob).
    While a set's choice has multiple ``lowest`` and ``lowest / 2 >= floor``, the best of the candidates at
    ``lowest / 2`` replaces it where it is better by more than ``se_rule`` paired standard errors. Returns the
    updated dict (new tensors)."""
    out = dict(chosen)
    at_edge = torch.isclose(out["mult"], torch.full_like(out["mult"], lowest))
    for lower in edge_mults(lowest, floor):
        if not bool(at_edge.any()):
            break
        mult = torch.full_like(out["mult"], lower)
        cands = [(mult, None if v is None else torch.full_like(out["mult"], float(v))) for v in knob_values]
        out, at_edge = _take_if_better(out, _best_candidate(score, cands), at_edge, se_rule)
    return out


def knob_extension(score, chosen: dict, mults, lowest: float, edge_values, *, se_rule: float = EDGE_SE_RULE) -> dict:
    """The knob extension of a fresh search (module docstring), per sample set.

    ``chosen`` as for ``edge_extension`` (``knob`` a tensor (...)); ``mults`` the bandwidth multiples of the
    grid; ``lowest`` the grid's least-regularised knob value and ``edge_values`` the values past it, in order.
    While a set's choice has the last value tried, the best candidate at the next value (over ``mults`` and the
    choice's own multiple, which the edge extension may have put below the grid) replaces it where it is better
    by more than ``se_rule`` paired standard errors. Returns the updated dict (new tensors)."""
    out = dict(chosen)
    at_edge = torch.isclose(out["knob"], torch.full_like(out["knob"], lowest))
    for value in edge_values:
        if not bool(at_edge.any()):
            break
        knob, own = torch.full_like(out["knob"], float(value)), out["mult"]
        tries = [torch.full_like(own, float(m)) for m in mults]
        if not any(bool(torch.isclose(own, t).all()) for t in tries):
            tries.append(own)  # the choice's multiple is off the grid for some set
        out, at_edge = _take_if_better(out, _best_candidate(score, [(m, knob) for m in tries]), at_edge, se_rule)
    return out


def tune(est, x: torch.Tensor, *, holdout: float = 0.25, folds: int | None = None, repeats: int | None = None,
         bandwidth_mults=BANDWIDTH_MULTS, knob_values=None, previous: dict | None = None,
         se_rule: float | None = None, criterion: str = "auto", probes: int | None = None,
         extend_edge: bool | None = None, extend_knob: bool | None = None,
         generator: torch.Generator | None = None):
    """Choose the bandwidth (a multiple of the median distance) and the estimator's knob per sample set.

    Args:
        est: the (unfitted) estimator whose settings are kept; its ``knob`` (e.g. "eta") is tuned
            when it is "auto" and held fixed otherwise. ``est.knob_grid(M)`` gives the knob's grid
            and ``est.knob_default(M)`` the anchor's value.
        x: samples (..., M, d); each fold holds out ``holdout`` of them (at least 1), at random.
        criterion: "sure" (in-sample SURE: closed form for the SGE / diagonal KEF, the exact spectral trace
            for the SSGE / Landweber / nu with a diagonal kernel and d <= ``spectral_sure.EXACT_SURE_MAX_D``, else
            Hutchinson with ``probes`` probes), "loo" (exact leave-one-out: closed form for the SGE / diagonal
            KEF, else M batched refits per candidate), "kfold" (``folds`` held-out parts; a warm start uses
            one split), or "auto": the closed form where there is one, leave-one-out by refits on a fresh
            search with M <= ``LOO_MAX`` (unless ``est.small_search_uses_exact_sure`` and the exact SURE
            exists), else SURE (see the module).
        folds: number of disjoint held-out parts (default 4 for M <= 2048, else 1; 1 on a warm start).
        repeats: number of independent random K-fold partitions whose per-point terms are averaged
            (default ``KFOLD_REPEATS`` with 4 folds on a fresh search, else 1; see the module).
        bandwidth_mults, knob_values: the grid (knob_values overrides ``est.knob_grid``).
        previous: a previous result of ``tune`` for the same batch shape: warm start (see the module).
        se_rule: the best candidate must beat the anchor by this many standard errors (None: ``LOO_SE_RULE``
            with leave-one-out by refits, ``SURE_SE_RULE`` with SURE, else ``SE_RULE``).
        probes: Rademacher probes of Hutchinson SURE (None: ``SURE_PROBES``).
        extend_edge: on a fresh search, the edge extension below ``bandwidth_mults`` (module docstring); None:
            ``est.extends_edge``.
        extend_knob: on a fresh search, the knob extension past the grid's least-regularised value (module
            docstring); None: ``est.extends_knob_edge``.
        generator: of the random splits and probes (None: torch's global generator).

    Returns:
        dict with ``bandwidth`` and ``bandwidth_mult`` (...), the knob (...) when it is tuned, and
        ``objective`` (...) of the choice.
    """
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    batch, M = x.shape[:-2], x.shape[-2]
    if M < 3:
        raise ValueError(f"x needs at least 3 points per set to hold some out, got {M}")
    if previous is not None and previous["bandwidth_mult"].shape != batch:
        previous = None  # a different batch shape: start afresh
    warm = previous is not None
    criterion = _check_criterion(criterion)
    extend_edge = est.extends_edge if extend_edge is None else _checks.flag("extend_edge", extend_edge)
    extend_knob = est.extends_knob_edge if extend_knob is None else _checks.flag("extend_knob", extend_knob)
    x = x.detach()
    closed_form = has_closed_form_loo_for(est, x)  # then SURE and leave-one-out coincide, exactly
    exact = has_exact_sure_for(est, x)  # SURE without probes (closed form, or the spectral-filter trace)
    # "auto": the closed form where there is one; leave-one-out by refits on a small fresh search; else SURE
    # (exact where the estimator has it, else Hutchinson)
    refit_loo = (criterion == "auto" and not closed_form and not warm and M <= LOO_MAX
                 and not (est.small_search_uses_exact_sure and exact))
    use_loo = criterion == "loo" or refit_loo
    use_sure = criterion == "sure" or (criterion == "auto" and not refit_loo)
    folds = (1 if warm else 4 if M <= 2048 else 1) if folds is None else folds
    repeats = (KFOLD_REPEATS if folds > 1 and not warm else 1) if repeats is None else repeats
    partitions = None if use_sure or use_loo else [_splits(x, holdout, folds, generator) for _ in range(repeats)]
    vs = rademacher_probes(x, SURE_PROBES if probes is None else probes, generator) if use_sure and not exact else None
    med = median_distance(x)
    knob = est.knob if est.knob_is_auto() else None
    full = lambda v: torch.full(batch, float(v), dtype=x.dtype, device=x.device)  # noqa: E731

    # candidates: (bandwidth multiple (...), knob value (...) or None); the anchor first
    if warm:  # the knob's neighbours on its grid, extended where the knob extension can have gone
        knob_grid = est.knob_grid(M)
        if extend_knob and est.knob_edge_values(M):
            knob_grid = sorted(set(knob_grid) | set(est.knob_edge_values(M)))
        knob_sets = _neighbours(knob_grid, previous[knob]) if knob else [None]
        cands = [(previous["bandwidth_mult"], previous[knob] if knob else None)]
        cands += [(previous["bandwidth_mult"] * s, k) for s, k in itertools.product(WARM_BANDWIDTH_STEPS, knob_sets)]
    else:
        cands = [(full(m), None if v is None else full(v)) for m, v in fresh_grid(est, M, bandwidth_mults, knob_values)]

    sure_cache = {}  # candidates come grouped by bandwidth: the exact trace shares one eigh per group

    def score(mult, val):
        """The criterion's per-point terms (..., n) of the candidate (multiple (...), knob (...) or None)."""
        cand = est.candidate(mult * med, val)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if use_sure:
                t = sure_terms(cand, x, vs, cache=sure_cache)  # (..., M)
            elif use_loo:
                t = loo_terms(cand, x)  # (..., M)
            else:
                t = kfold_terms(cand, partitions)  # (..., held-out points)
        return torch.where(torch.isfinite(t), t, torch.full_like(t, float("inf")))

    terms = torch.stack([score(mult, val) for mult, val in cands])  # (C, ..., n)
    if se_rule is None:  # the anchor rule; plain argmin for leave-one-out by refits (module docstring)
        se_rule = SE_RULE if closed_form or partitions is not None else LOO_SE_RULE if use_loo else SURE_SE_RULE
    chosen = anchor_choice(terms, se_rule)

    def pick(stack):
        return torch.gather(stack, 0, chosen.reshape(1, *chosen.shape, *(1,) * (stack.dim() - 1 - chosen.dim()))
                            .expand(1, *stack.shape[1:]))[0]

    choice = dict(terms=pick(terms), mult=pick(torch.stack([c[0] for c in cands])),
                  knob=pick(torch.stack([c[1] for c in cands])) if knob else None)
    if extend_edge and not warm:
        choice = edge_extension(score, choice, min(bandwidth_mults), _knob_values(est, M, knob_values))
    if extend_knob and knob and not warm and knob_values is None:
        choice = knob_extension(score, choice, bandwidth_mults, est.knob_least_regularised(M), est.knob_edge_values(M))
    out = {"bandwidth_mult": choice["mult"], "objective": choice["terms"].mean(-1)}
    out["bandwidth"] = out["bandwidth_mult"] * med
    if knob:
        out[knob] = choice["knob"]
    return out


def candidate(est, bandwidth, knob_value):
    """A fresh copy of ``est`` with the given bandwidth (...) and knob value (...) (None: unchanged)."""
    c = copy.copy(est)
    c.bandwidth = bandwidth
    for attr in ("tuned_", "_G", "scores_"):
        c.__dict__.pop(attr, None)
    c._last_tuned, c._n_fits = None, 0
    if knob_value is not None:
        setattr(c, est.knob, knob_value)
    return c

"""Accuracy of every registered score estimator against EXACT scores.

For each (estimator, distribution, M, sigma) it draws M samples of q_sigma = q * N(0, sigma^2 I) and
N fresh query points, and reports the relative Fisher error

    E|g - grad log q_sigma|^2 / E|grad log q_sigma|^2

at the samples (in-sample) and at the queries (out-of-sample), for
  (a) the estimator's default hyper-parameters (``score_estimator(name)``),
  (auto) ``bandwidth="auto"``: held-out score matching on the samples alone, tuning the bandwidth and
      the estimator's knob (eta, lam, eig_mass; see ``steinops.estimators.autotune``), and
  (b) the oracle: the best of the SAME candidates as auto (the default, then bandwidth multiples
      {0.25, 0.5, 1, 2, 4} x median distance times the estimator's knob grid), chosen by the in-sample error
      against the exact score -- what no sample-only rule on this grid can beat. For the SSGE, Landweber and nu
      with the diagonal kernel the grid is evaluated from one eigendecomposition of K per bandwidth, shared by
      the three (``spectral_oracle.py``; the same numbers as fitting every candidate, tested), else by fits.

    python benchmarks/accuracy.py [--quick] [--samples 128 1024 8192] [--estimators stein kef:curl_free ...]

Each case is one random draw of the samples (replicate 0, seed ``--seed``). The error is an expectation over the
draw as well, and auto's choice on one draw can miss by sampling noise alone, so ``--replicates R`` repeats every
case on R independent draws (replicate r draws with seed ``--seed + r``; ``--first-replicate`` continues a run).
The summary then adds, per case with several draws, the ratio of auto's mean error over the draws to the mean of
the per-draw oracles, and the share of single draws within 1.3x.

"kef:curl_free" (or landweber / nu) runs the estimator with the curl-free kernel.

Auto runs with the library's settings, so with the edge extension where the estimator's ``extends_edge`` is on
(every estimator here; below 0.25 x median while its choice sits there), and there the oracle's grid adds the
multiples the extension can reach (0.125, 0.0625), so that the oracle still searches every candidate auto can
choose. ``--extend-edge off`` runs auto without it (``AutoTune(extend_edge=
False)``, the oracle on 0.25-4 x median), ``on`` with it for every estimator. Likewise the knob extension past
the knob grid's least-regularised value (``extends_knob_edge``: the SGE and KEF with a diagonal kernel, eta down
to 0.001): where auto runs it, the oracle's knob grid adds ``knob_edge_values`` (``--extend-knob``).

Prints a table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

try:
    import steinops
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import steinops
from steinops.bandwidth import median_distance
from steinops.distributions import get_distribution
from steinops.estimators import ESTIMATORS, autotune
from steinops.estimators.spectral_sure import EXACT_SURE_MAX_D

import spectral_oracle  # noqa: E402  (benchmarks/ is on sys.path when this file runs)
from kernels import write_json  # noqa: E402

BANDWIDTH_MULTS = list(autotune.BANDWIDTH_MULTS)
DISTRIBUTIONS = ["two_mode", "eight_gaussians", "rings", "checkerboard", "moons", "spiral", "gmm", "subspace_gmm",
                 "sphere"]
# "name:curl_free" runs a kscore estimator with the curl-free kernel
VARIANTS = sorted(ESTIMATORS) + ["kef:curl_free"]
EXTEND_EDGE = {"default": None, "on": True, "off": False}  # --extend-edge / --extend-knob: AutoTune(...)


def parse_variant(variant: str):
    name, _, opt = variant.partition(":")
    if name not in ESTIMATORS or opt not in ("", "curl_free"):
        raise ValueError(f"unknown estimator {variant!r}; registered: {sorted(ESTIMATORS)} (optionally ':curl_free')")
    return name, ({"curl_free": True} if opt else {})


def extends_edge(variant: str, setting: bool | None) -> bool:
    """Whether auto runs the edge extension for this estimator: ``setting``, or None for its default."""
    name, kw = parse_variant(variant)
    return steinops.score_estimator(name, **kw).extends_edge if setting is None else setting


def extends_knob(variant: str, setting: bool | None) -> bool:
    """Whether auto runs the knob extension for this estimator: ``setting``, or None for its default."""
    name, kw = parse_variant(variant)
    est = steinops.score_estimator(name, **kw)
    return bool(est.knob_edge_values(128)) and (est.extends_knob_edge if setting is None else setting)


def fisher(est: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((est.double() - exact) ** 2).sum() / (exact**2).sum())


def evaluate(name, kwargs, x, q, sx, sq, return_choice=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.no_grad():
            est = steinops.score_estimator(name, **kwargs).fit(x)
            errors = fisher(est.scores_, sx), fisher(est.predict(q), sq)
    if not return_choice:
        return errors
    tuned = {k: float(v) for k, v in (est.tuned_ or {}).items() if k not in ("bandwidth", "objective")}
    return (*errors, tuned)


def run_case(variant, x, q, sx, sq, auto=None, bases=None, mults=BANDWIDTH_MULTS, knob_edge=False):
    """Default, auto and oracle errors of one estimator on one sample set. ``bases``: a dict shared by the
    estimators of one case; where it is given and the estimator is a spectral filter of K (SSGE, Landweber, nu
    with the diagonal kernel), the oracle grid is evaluated from one eigendecomposition per bandwidth kept there
    (``spectral_oracle.py``: the same numbers as fits, one eigh per bandwidth instead of a fit per candidate).
    ``mults``: the oracle's bandwidth multiples; ``knob_edge``: its knob grid adds ``knob_edge_values``."""
    name, base_kw = parse_variant(variant)
    default_in, default_out = evaluate(name, base_kw, x, q, sx, sq)
    auto_in, auto_out, auto_params = evaluate(name, {**base_kw, "bandwidth": auto or "auto"}, x, q, sx, sq,
                                              return_choice=True)
    # the oracle: the same candidates as "auto" (the default, then bandwidth multiples x the knob grid),
    # chosen by the in-sample error against the EXACT score
    grid = oracle(variant, x, q, sx, sq, bases=bases, mults=mults, knob_edge=knob_edge)
    best = min([(default_in, default_out, {"default": True})] + grid["best"], key=lambda b: b[0])
    return dict(default_in=default_in, default_out=default_out, auto_in=auto_in, auto_out=auto_out,
                auto_params=auto_params, oracle_in=best[0], oracle_out=best[1], oracle_params=best[2],
                oracle_out_best=min(default_out, grid["out_best"]), oracle_by=grid["by"])


def oracle(variant, x, q, sx, sq, bases=None, mults=BANDWIDTH_MULTS, knob_edge=False, values=None) -> dict:
    """The best candidate on the grid ``mults`` x the knob grid (with ``knob_edge``, and its ``knob_edge_values``;
    ``values`` overrides both) by the in-sample error against the exact score:
    ``best`` [(in-sample error, out-of-sample error, params)] (empty if no candidate is valid), ``out_best`` the
    least out-of-sample error on the grid, ``by`` "eigendecomposition" or "fits" (``bases``: as ``run_case``)."""
    name, base_kw = parse_variant(variant)
    proto = steinops.score_estimator(name, **base_kw)
    knob = proto.knob if proto.knob_is_auto() else None
    M = x.shape[-2]
    if values is None:
        values = (tuple(proto.knob_grid(M)) + (tuple(proto.knob_edge_values(M)) if knob_edge else ())) if knob else [None]
    med = float(median_distance(x))
    spectral = bases is not None and spectral_oracle.applies(name, base_kw)
    best, best_out = [], float("inf")
    for mult, val in itertools.product(mults, values):
        kw = {**base_kw, "bandwidth": mult * med, **({knob: val} if knob else {})}
        try:
            if spectral:
                key = (mult, proto.kernel.name)
                if key not in bases:
                    bases[key] = spectral_oracle.SpectralBasis(x, q, mult, proto.kernel)
                e_in, e_out = (fisher(s, exact) for s, exact in zip(
                    bases[key].scores(steinops.score_estimator(name, **kw)), (sx, sq)))
            else:
                e_in, e_out = evaluate(name, kw, x, q, sx, sq)
        except ValueError:
            continue
        best_out = min(best_out, e_out)
        if not best or e_in < best[0][0]:
            best = [(e_in, e_out, {"bandwidth_mult": mult, **({knob: val} if knob else {})})]
    return dict(best=best, out_best=best_out, by="eigendecomposition" if spectral else "fits")


def replicate(row) -> int:
    return row.get("replicate", 0)


def case_key(row) -> tuple:
    return row["estimator"], row["distribution"], row["M"], row["sigma"]


def summary(rows) -> str:
    """The single-draw table (replicate 0 of every case, ``single_draw_summary``) and, where cases have several
    draws, the table over draws (``replicate_summary``)."""
    first = [r for r in rows if replicate(r) == 0]
    parts = [single_draw_summary(first) if first else "", replicate_summary(rows)]
    return "\n\n".join(p for p in parts if p)


def replicate_summary(rows) -> str:
    """Markdown over the cases with at least two draws: per estimator, auto's mean in-sample error over the draws
    divided by the mean of the per-draw oracles (geometric mean and worst over cases, and how many cases are within
    1.3x), and how many single draws are within 1.3x of their own oracle."""
    cases = {}
    for r in rows:
        cases.setdefault(case_key(r), []).append(r)
    cases = {k: v for k, v in cases.items() if len(v) > 1}
    if not cases:
        return ""
    lines = ["| estimator | cases | draws per case | auto mean / oracle mean: geo-mean (worst) | cases within 1.3x | "
             "single draws within 1.3x |", "|---|---|---|---|---|---|"]
    geo = statistics.geometric_mean
    miss = []
    for name in sorted({k[0] for k in cases}, key=lambda n: (VARIANTS.index(n) if n in VARIANTS else 99, n)):
        ks = [k for k in cases if k[0] == name]
        ratios, draws_ok, draws = [], 0, []
        for k in ks:
            rs = cases[k]
            ratio = sum(r["auto_in"] for r in rs) / sum(r["oracle_in"] for r in rs)
            ratios.append(ratio)
            draws.append(len(rs))
            draws_ok += sum(r["auto_in"] <= 1.3 * r["oracle_in"] for r in rs)
            if ratio > 1.3:
                miss.append(f"{name} {k[1]} M={k[2]} sigma={k[3]}: {ratio:.2f}x")
        span = f"{min(draws)}" if min(draws) == max(draws) else f"{min(draws)}-{max(draws)}"
        lines.append(f"| {name} | {len(ks)} | {span} | {geo(ratios):.2f}x ({max(ratios):.2f}x) | "
                     f"{sum(x <= 1.3 for x in ratios)} / {len(ratios)} | {draws_ok} / {sum(draws)} |")
    return "\n".join(lines + ["", f"over draws, auto's mean over 1.3x the oracles' mean in {len(miss)} of {len(cases)} cases"
                                 + (": " + "; ".join(miss) if miss else "")])


def single_draw_summary(rows) -> str:
    """Markdown: per estimator, the ratio of the in-sample error to the oracle's for the default and for auto
    (geometric mean and worst), and how many cases auto has within 1.3x (the target), also at M >= 1024; then the
    out-of-sample ratio of auto to the best out-of-sample error on the grid, and the cases missing the target."""
    lines = ["| estimator | cases | default: geo-mean (worst) | auto: geo-mean (worst) | auto within 1.3x | "
             "of these at M >= 1024 | auto out-of-sample vs its oracle: geo-mean (worst) |", "|---|---|---|---|---|---|---|"]
    geo = statistics.geometric_mean
    for name in sorted({r["estimator"] for r in rows}, key=lambda n: (VARIANTS.index(n) if n in VARIANTS else 99, n)):
        rs = [r for r in rows if r["estimator"] == name]
        d = [r["default_in"] / r["oracle_in"] for r in rs]
        a = [r["auto_in"] / r["oracle_in"] for r in rs]
        big = [x for r, x in zip(rs, a) if r["M"] >= 1024]
        o = [r["auto_out"] / r["oracle_out_best"] for r in rs if r.get("oracle_out_best")]
        out_cell = f"{geo(o):.2f}x ({max(o):.2f}x)" if o else "-"
        lines.append(f"| {name} | {len(rs)} | {geo(d):.2f}x ({max(d):.1f}x) | {geo(a):.2f}x ({max(a):.2f}x) | "
                     f"{sum(x <= 1.3 for x in a)} / {len(a)} | {sum(x <= 1.3 for x in big)} / {len(big)} | {out_cell} |")
    miss = [f"{r['estimator']} {r['distribution']} M={r['M']} sigma={r['sigma']}: {r['auto_in'] / r['oracle_in']:.2f}x"
            for r in rows if r["auto_in"] > 1.3 * r["oracle_in"]]
    return "\n".join(lines + ["", f"auto over 1.3x the in-sample oracle in {len(miss)} of {len(rows)} cases"
                                 + (": " + "; ".join(miss) if miss else "")])


def draw(dname: str, M: int, sigma: float, seed: int, queries: int):
    """The samples, query points and their exact scores of one case (replicate seed ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    dist = get_distribution(dname)
    x = dist.sample(M, sigma, generator=gen)
    q = dist.sample(queries, sigma, generator=gen)
    return dist, x, q, dist.score(x, sigma), dist.score(q, sigma)


def widen_oracle(a):
    """``--widen-oracle``: bring rows measured without an extension (the bandwidth edge, the knob's) to the
    library's default where that changes only the oracle. For an estimator that extends (``extends_edge``,
    ``extends_knob_edge``) and a row whose auto choice is not where the extension starts (the grid's smallest
    multiple; the knob grid's least-regularised value), the extension never runs, so auto's row stands; the
    oracle searches the candidates the extension adds (``autotune.edge_mults()`` x the knob's values; every
    multiple x ``knob_edge_values``) on the same draw. The draw is checked by refitting the default (its in-sample
    error must match the row's). Rows where an extension starts need a full run and are listed."""
    src = json.loads(Path(a.widen_oracle).read_text())
    dtype, edge = getattr(torch, a.dtype), autotune.edge_mults()
    rows, rerun, t0 = [], [], time.time()
    out = Path(a.out)

    def save():  # after every row, atomically: a stopped run keeps what it widened
        write_json(out, dict(settings=vars(a), bandwidth_mults=BANDWIDTH_MULTS, edge_mults=list(edge), rows=rows,
                             needs_full_run=rerun, seconds=time.time() - t0))

    for row in src["rows"]:
        name = row["estimator"]
        if (name not in a.estimators or row["distribution"] not in a.distributions or row["M"] not in a.samples
                or row["sigma"] not in a.sigmas):
            continue
        extends, knob_ext = extends_edge(name, None), extends_knob(name, None)
        need_edge, need_knob = extends and not row.get("extend_edge"), knob_ext and not row.get("extend_knob")
        if not (need_edge or need_knob):
            continue
        parsed = parse_variant(name)
        proto = steinops.score_estimator(parsed[0], **parsed[1])
        starts = ((need_edge and row["auto_params"].get("bandwidth_mult") == min(BANDWIDTH_MULTS))
                  or (need_knob and math.isclose(row["auto_params"].get(proto.knob, math.nan),
                                                 proto.knob_least_regularised(row["M"]), rel_tol=1e-6)))
        if starts:
            rerun.append(f"{name} {row['distribution']} M={row['M']} sigma={row['sigma']} draw {replicate(row)}")
            continue
        _, x, q, sx, sq = draw(row["distribution"], row["M"], row["sigma"], a.seed + replicate(row), a.queries)
        x, q = x.to(dtype), q.to(dtype)
        default_in = evaluate(*parsed, x, q, sx, sq)[0]
        # float32 sums vary with the machine and threads (1e-5 at M = 8192); another draw differs by far more
        if not math.isclose(default_in, row["default_in"], rel_tol=1e-6 if dtype == torch.float64 else 1e-4):
            raise SystemExit(f"{name} {row['distribution']} M={row['M']}: the default's error {default_in} is not the "
                             f"row's {row['default_in']}: another draw (check --dtype, --queries, --seed)")
        t = time.time()
        grids = []
        if need_edge:  # the multiples below the grid, at every knob value auto can reach there
            grids.append(oracle(name, x, q, sx, sq, bases={}, mults=edge, knob_edge=knob_ext))
        if need_knob:  # the knob values past the grid, at every multiple
            mults = sorted(set(BANDWIDTH_MULTS) | set(edge)) if extends else BANDWIDTH_MULTS
            grids.append(oracle(name, x, q, sx, sq, bases={}, mults=mults,
                                values=tuple(proto.knob_edge_values(row["M"]))))
        new = dict(row, extend_edge=bool(need_edge or row.get("extend_edge")),
                   extend_knob=bool(need_knob or row.get("extend_knob")), oracle_widened=True,
                   oracle_out_best=min([row["oracle_out_best"]] + [g["out_best"] for g in grids]))
        for grid in grids:
            if grid["best"] and grid["best"][0][0] < new["oracle_in"]:
                e_in, e_out, params = grid["best"][0]
                new.update(oracle_in=e_in, oracle_out=e_out, oracle_params=params)
        new["seconds"] = row["seconds"] + time.time() - t
        rows.append(new)
        print(f"{name:14} {row['distribution']:16} {row['M']:5d} {row['sigma']:5.2f} {replicate(row):4d} | oracle "
              f"{row['oracle_in']:.4f} -> {new['oracle_in']:.4f} {new['oracle_params']}", flush=True)
        save()
    save()
    print(f"{len(rows)} rows widened; {len(rerun)} where an extension starts need a full run" +
          (": " + "; ".join(rerun) if rerun else "") + f"\nwrote {a.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", nargs="+", default=VARIANTS,
                   help="registered estimator names, 'name:curl_free' for the curl-free kernel (kef, landweber, nu)")
    p.add_argument("--distributions", nargs="+", default=DISTRIBUTIONS, help="steinops.distributions registry names")
    p.add_argument("--samples", type=int, nargs="+", default=[128, 1024, 8192], help="sample sizes M")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.5], help="noise levels")
    p.add_argument("--queries", type=int, default=512, help="fresh query points per case")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicates", type=int, default=1, help="independent draws of every case (seeds seed + r)")
    p.add_argument("--first-replicate", type=int, default=0, help="index of the first draw (to continue a run)")
    p.add_argument("--criterion", choices=list(autotune.CRITERIA), default="auto",
                   help="auto's selection criterion (AutoTune(criterion=...); default: leave-one-out where affordable)")
    p.add_argument("--se-rule", type=float, default=None,
                   help="auto's anchor rule: the best candidate must beat the default by this many standard errors "
                        "(default: 0 with leave-one-out by refits, else 1)")
    p.add_argument("--probes", type=int, default=None,
                   help="Rademacher probes of auto's Hutchinson trace (SURE without an exact trace: curl-free "
                        f"kernels, d > {EXACT_SURE_MAX_D}; default {autotune.SURE_PROBES})")
    p.add_argument("--extend-edge", choices=list(EXTEND_EDGE), default="default",
                   help="auto's edge extension: the estimator's default (all extend), on or off for "
                        "every estimator; where on, the oracle's grid adds the multiples it can reach")
    p.add_argument("--extend-knob", choices=list(EXTEND_EDGE), default="default",
                   help="auto's knob extension past the knob grid's least-regularised value: the estimator's "
                        "default (the SGE and KEF with a diagonal kernel), on or off for every estimator that has "
                        "knob_edge_values; where on, the oracle's knob grid adds those values")
    p.add_argument("--widen-oracle", metavar="JSON",
                   help="rows of an earlier run whose auto ran without the edge or knob extension and chose "
                        "where it does not start: with it auto's choice is the same, so only the oracle is searched "
                        "at the candidates the extension adds (same draws: pass the run's --dtype, --queries, "
                        "--seed); writes --out")
    p.add_argument("--quick", action="store_true", help="smoke test: two_mode, M = 48 (leave-one-out by refits still runs), sigma = 0.5, 64 queries")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "accuracy.json"))
    p.add_argument("--summarize", metavar="JSON", help="print the summary table of a results file and exit")
    a = p.parse_args(argv)
    if a.summarize:
        print(summary(json.loads(Path(a.summarize).read_text())["rows"]))
        return
    if a.widen_oracle:
        return widen_oracle(a)
    if a.quick:
        a.distributions, a.samples, a.sigmas, a.queries = ["two_mode"], [48], [0.5], 64
    for e in a.estimators:
        try:
            parse_variant(e)
        except ValueError as err:
            p.error(str(err))
    if a.replicates < 1 or a.first_replicate < 0:
        p.error("--replicates must be >= 1 and --first-replicate >= 0")
    dtype = getattr(torch, a.dtype)
    extend_edge, extend_knob = EXTEND_EDGE[a.extend_edge], EXTEND_EDGE[a.extend_knob]
    wide = sorted(set(BANDWIDTH_MULTS) | set(autotune.edge_mults()))  # the oracle's grid where auto extends
    rows, t0 = [], time.time()
    out = Path(a.out)

    def save(rows):  # after every case, atomically: a stopped run keeps what it measured
        write_json(out, dict(settings=vars(a), bandwidth_mults=BANDWIDTH_MULTS, edge_mults=list(autotune.edge_mults()),
                             rows=rows, machine=platform.processor() or platform.machine(), torch=torch.__version__,
                             seconds=time.time() - t0))

    print(f"{'estimator':14} {'distribution':16} {'M':>5} {'sigma':>5} {'draw':>4} | {'default in':>10} {'out':>7} | "
          f"{'auto in':>8} {'out':>7} | {'oracle in':>9} {'out':>7} | default/oracle auto/oracle")
    draws = range(a.first_replicate, a.first_replicate + a.replicates)
    for dname, M, sigma, rep in itertools.product(a.distributions, a.samples, a.sigmas, draws):
        seed = a.seed + rep
        dist, x, q, sx, sq = draw(dname, M, sigma, seed, a.queries)
        bases = {}  # the spectral oracle's eigendecompositions, shared by the estimators of this case
        for name in a.estimators:
            torch.manual_seed(seed)  # auto's random splits: reproducible per case
            t = time.time()
            extends, knob_ext = extends_edge(name, extend_edge), extends_knob(name, extend_knob)
            r = run_case(name, x.to(dtype), q.to(dtype), sx, sq,
                         auto=autotune.AutoTune(criterion=a.criterion, se_rule=a.se_rule, probes=a.probes,
                                                extend_edge=extend_edge, extend_knob=extend_knob), bases=bases,
                         mults=wide if extends else BANDWIDTH_MULTS, knob_edge=knob_ext)
            r.update(estimator=name, distribution=dname, M=M, sigma=sigma, d=dist.dim, replicate=rep,
                     extend_edge=extends, extend_knob=knob_ext, seconds=time.time() - t)
            rows.append(r)
            print(f"{name:14} {dname:16} {M:5d} {sigma:5.2f} {rep:4d} | {r['default_in']:10.4f} {r['default_out']:7.4f} | "
                  f"{r['auto_in']:8.4f} {r['auto_out']:7.4f} | {r['oracle_in']:9.4f} {r['oracle_out']:7.4f} | "
                  f"{r['default_in'] / r['oracle_in']:13.2f}x {r['auto_in'] / r['oracle_in']:10.2f}x", flush=True)
            save(rows)
    save(rows)
    print(summary(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

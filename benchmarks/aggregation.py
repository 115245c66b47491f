"""Could a weighted average of auto's candidates beat choosing one? SURE aggregation of the SGE, in-sample.

Auto chooses one candidate of its fresh grid (``autotune.fresh_grid``: the default, then bandwidth multiples x
the eta grid) by the closed-form leave-one-out criterion, which for the SGE is an unbiased estimate of the
in-sample error (``stein_loo.py``). The Fisher error is convex in the estimate, so a convex combination of the
candidates' in-sample estimates ``G_w = sum_k w_k G_k`` can be better than every candidate, and its criterion is
known in closed form, because the trace is linear in G:

    SURE(w) = 1/2 w^T A w + b^T w,   A_kl = mean_i G_ik . G_il,   b_k = mean_i tr_ik,

an unbiased estimate of ``1/2 E|G_w - grad log q|^2 - 1/2 E|grad log q|^2`` for any *fixed* w (Stein's
unbiased risk estimate of a linear expansion of estimators; Blu & Luisier's SURE-LET). Choosing w by
minimising SURE(w) is a quadratic programme; its risk is that w fits the criterion's noise. Rules, per draw:

- ``simplex``: w >= 0, sum w = 1, over all candidates;
- ``nonneg``: w >= 0 only (the combination may shrink or stretch);
- ``top k``: the simplex over the k candidates with the least criterion;
- ``argmin``: the single candidate with the least criterion (no anchor; auto adds the anchor rule);
- ``auto scaled``: auto's own choice times the scale c that minimises its SURE, ``c = -mean_i tr_i / mean_i
  |G_i|^2`` (one candidate's aggregate: one degree of freedom instead of 31);
- ``plain anchor``: auto's anchor rule (1 paired SE against the default) on this grid alone, without auto's edge and
  knob extensions: the baseline of the next rule;
- ``scaled anchor``: every candidate at its own SURE scale c_k, chosen by the same anchor rule on the scaled
  per-point terms ``1/2 c_k^2 |G_ki|^2 + c_k tr_ki``;
- ``oracle scaled`` (a reference, not a rule): the best candidate of the oracle's grid when each is scaled by the
  best factor against the exact score.

Each is scored by its in-sample relative Fisher error against the exact score, over the mean of the per-draw
oracles on ``benchmarks/accuracy.py``'s oracle grid (the multiples auto's edge extension reaches x the eta grid
with the knob extension's values; fitted here by the closed form), next to auto's own error (the library's ``bandwidth="auto"``) on the same draws.

    python benchmarks/aggregation.py --samples 128 --draws 10 --out benchmarks/results/aggregation-stein-m128.json
    python benchmarks/aggregation.py --samples 1024 --draws 3 --out benchmarks/results/aggregation-stein-m1024.json
    python benchmarks/aggregation.py --quick

Prints a table per case and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (also puts a source checkout on the path)
import steinops  # noqa: E402
from steinops.bandwidth import median_distance  # noqa: E402
from steinops.distributions import REGISTRY  # noqa: E402
from steinops.estimators import autotune  # noqa: E402
from steinops.estimators.stein_loo import sge_fit_and_traces  # noqa: E402
from kernels import write_json  # noqa: E402  (benchmarks/ is on sys.path)

PROTO = steinops.score_estimator("stein", bandwidth="auto")  # the grids' source: fresh_grid, knob_grid
RULES = ("auto", "auto scaled", "plain anchor", "scaled anchor", "argmin", "simplex", "nonneg", "top 5", "top 10",
         "oracle scaled")


def sure_weights(A: np.ndarray, b: np.ndarray, simplex: bool) -> np.ndarray:
    """argmin of ``1/2 w^T A w + b^T w`` over w >= 0 (and sum w = 1 with ``simplex``); A (K, K) PSD, b (K,)."""
    K, scale = len(b), float(np.mean(np.diag(A)))  # |G|^2 grows as 1 / sigma^4: solve at unit scale
    A, b = A / scale, b / scale
    constraints = [dict(type="eq", fun=lambda w: w.sum() - 1, jac=lambda w: np.ones(K))] if simplex else []
    res = minimize(lambda w: 0.5 * w @ A @ w + b @ w, np.full(K, 1.0 / K), jac=lambda w: A @ w + b,
                   bounds=[(0, None)] * K, constraints=constraints, method="SLSQP",
                   options=dict(maxiter=1000, ftol=1e-12))
    w = np.clip(res.x, 0, None)
    # status 8 ("positive directional derivative in the line search"): stopped at the precision limit
    if not (res.success or res.status == 8) or (simplex and abs(w.sum() - 1) > 1e-6):
        raise RuntimeError(f"the aggregation QP did not converge: {res.message}")
    return w


def _f64(v) -> torch.Tensor:
    return torch.tensor(float(v), dtype=torch.float64)


def sure_scale(G: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
    """The scale c (...) that minimises the SURE of c G: ``c = -mean_i tr_i / mean_i |G_i|^2``; G (..., M, d), tr (..., M)."""
    return -tr.mean(-1) / (G * G).sum(-1).mean(-1)


def aggregate_errors(x: torch.Tensor, sx: torch.Tensor, med: float) -> dict:
    """In-sample errors of the rules on auto's fresh grid (all but auto and the oracles) on one draw x (M, d) with
    exact scores sx (M, d) and median distance med, and the weights each average kept (count of w_k > 1e-3)."""
    M = x.shape[-2]
    G, tr = map(torch.stack, zip(*(sge_fit_and_traces(x, _f64(med * mult), _f64(eta))
                                   for mult, eta in autotune.fresh_grid(PROTO, M))))  # (K, M, d), (K, M)
    g2 = (G * G).sum(-1)  # (K, M)
    A = (torch.einsum("kmd,lmd->kl", G, G) / M).numpy()
    b = tr.mean(-1).numpy()
    crit = (0.5 * g2 + tr).mean(-1).numpy()
    out = {"argmin": accuracy.fisher(G[int(np.argmin(crit))], sx)}
    # each candidate at its own SURE scale c_k; per-point terms 1/2 c_k^2 |G_ki|^2 + c_k tr_ki, auto's anchor rule
    c = sure_scale(G, tr)[:, None]
    out["plain anchor"] = accuracy.fisher(G[int(autotune.anchor_choice(0.5 * g2 + tr, autotune.SE_RULE))], sx)
    k = int(autotune.anchor_choice(0.5 * c ** 2 * g2 + c * tr, autotune.SE_RULE))
    out["scaled anchor"] = accuracy.fisher(c[k] * G[k], sx)
    for rule, simplex, top in (("simplex", True, None), ("nonneg", False, None), ("top 5", True, 5),
                               ("top 10", True, 10)):
        idx = np.arange(len(b)) if top is None else np.argsort(crit)[:top]
        w = sure_weights(A[np.ix_(idx, idx)], b[idx], simplex)
        out[rule] = accuracy.fisher(torch.einsum("k,kmd->md", torch.from_numpy(w), G[idx]), sx)
        out[rule + " weights"] = int((w > 1e-3).sum())
    return out


def oracle_grid(x: torch.Tensor, sx: torch.Tensor, med: float) -> dict:
    """Over ``accuracy.py``'s oracle grid (the multiples auto's edge extension reaches x the eta grid and the knob
    extension's values), from the closed-form fits: the least in-sample error and its candidate, and the least
    error with every candidate at its best scale against the exact score."""
    M = x.shape[-2]
    wide = sorted(set(autotune.BANDWIDTH_MULTS) | set(autotune.edge_mults()))
    best, best_scaled = (math.inf, None), math.inf
    for mult, eta in itertools.product(wide, PROTO.knob_grid(M) + PROTO.knob_edge_values(M)):
        G, _ = sge_fit_and_traces(x, _f64(med * mult), _f64(eta))
        best = min(best, (accuracy.fisher(G, sx), {"bandwidth_mult": mult, "eta": eta}), key=lambda t: t[0])
        best_scaled = min(best_scaled, accuracy.fisher(float((G * sx).sum() / (G * G).sum()) * G, sx))
    return dict(oracle_in=best[0], oracle_params=best[1], **{"oracle scaled": best_scaled})


def measure_draw(dname: str, M: int, sigma: float, seed: int, queries: int) -> dict:
    """Every rule's in-sample error on one draw (``accuracy.draw``), auto's and the oracle's, and auto's
    out-of-sample error with and without its SURE scale."""
    _, x, q, sx, sq = accuracy.draw(dname, M, sigma, seed, queries)
    x = x.double()
    torch.manual_seed(seed)  # as accuracy.py: auto's random state per draw
    auto_in, auto_out, auto_params = accuracy.evaluate("stein", {"bandwidth": "auto"}, x, q, sx, sq, return_choice=True)
    med = float(median_distance(x))
    h, eta = auto_params["bandwidth_mult"] * med, auto_params["eta"]
    G, tr = sge_fit_and_traces(x, _f64(h), _f64(eta))
    if not math.isclose(accuracy.fisher(G, sx), auto_in, rel_tol=1e-8):
        raise RuntimeError(f"auto's choice refitted gives {accuracy.fisher(G, sx)}, auto's fit {auto_in}")
    c = float(sure_scale(G, tr))
    fit = steinops.score_estimator("stein", bandwidth=h, eta=eta).fit(x)
    return dict(distribution=dname, M=M, sigma=sigma, auto=auto_in, auto_params=auto_params, **oracle_grid(x, sx, med),
                **aggregate_errors(x, sx, med), **{"auto scaled": accuracy.fisher(c * G, sx), "auto scale": c},
                auto_out=auto_out, auto_scaled_out=accuracy.fisher(c * fit.predict(q), sq))  # the in-sample c


def summarise(rows) -> tuple[str, dict]:
    """Per case: each rule's mean error over the draws / the mean of the per-draw oracles; then the geo-mean
    over cases, the cases over 1.3x, and the draws over 1.3x their own oracle."""
    cases = {}
    for r in rows:
        cases.setdefault((r["distribution"], r["M"], r["sigma"]), []).append(r)
    lines = [f"{'distribution':16} {'M':>5} {'sigma':>5} {'draws':>5} | " + " ".join(f"{t:>13}" for t in RULES)]
    logs = {t: [] for t in RULES}
    over = dict.fromkeys(RULES, 0)
    draws_over = dict.fromkeys(RULES, 0)
    for (dname, M, sigma), rs in sorted(cases.items()):
        oracle = statistics.mean(r["oracle_in"] for r in rs)
        ratios = {t: statistics.mean(r[t] for r in rs) / oracle for t in RULES}
        for t in RULES:
            logs[t].append(math.log(ratios[t]))
            over[t] += ratios[t] > 1.3
            draws_over[t] += sum(r[t] > 1.3 * r["oracle_in"] for r in rs)
        lines.append(f"{dname:16} {M:5d} {sigma:5.2f} {len(rs):5d} | " + " ".join(f"{ratios[t]:13.3f}" for t in RULES))
    summary = {t: dict(geo_mean=math.exp(statistics.mean(logs[t])), cases_over_1_3=over[t],
                       draws_over_1_3=draws_over[t]) for t in RULES}
    lines.append(f"{'geo-mean over cases':34} | " + " ".join(f"{summary[t]['geo_mean']:13.3f}" for t in RULES))
    lines.append(f"{'cases over 1.3x':34} | " + " ".join(f"{over[t]:13d}" for t in RULES))
    lines.append(f"{f'draws over 1.3x (of {len(rows)})':34} | " + " ".join(f"{draws_over[t]:13d}" for t in RULES))
    out_ratio = math.exp(statistics.mean(math.log(r["auto_scaled_out"] / r["auto_out"]) for r in rows))
    summary["auto scaled out of sample"] = dict(geo_mean_over_auto=out_ratio)
    lines.append(f"out of sample, auto scaled / auto (geo-mean over draws): {out_ratio:.3f}")
    return "\n".join(lines), summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distributions", nargs="+", default=accuracy.DISTRIBUTIONS, choices=sorted(REGISTRY))
    p.add_argument("--samples", type=int, nargs="+", default=[128], help="M per draw")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.5], help="noise levels of q_sigma")
    p.add_argument("--draws", type=int, default=10, help="draws per case (seeds seed + r, as accuracy.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=256, help="fresh points for the out-of-sample errors")
    p.add_argument("--quick", action="store_true", help="two distributions, two draws, M = 64 (a smoke run)")
    p.add_argument("--out", help="JSON file for the rows and the summary")
    a = p.parse_args(argv)
    if a.quick:
        a.distributions, a.samples, a.sigmas, a.draws = ["two_mode", "moons"], [64], [0.5], 2
    if a.draws < 1 or min(a.samples) < 3:
        raise ValueError("--draws must be >= 1 and --samples >= 3")
    rows, t0 = [], time.time()
    for dname, M, sigma, rep in itertools.product(a.distributions, a.samples, a.sigmas, range(a.draws)):
        row = measure_draw(dname, M, sigma, a.seed + rep, a.queries)
        row["replicate"] = rep
        rows.append(row)
        print(f"{dname:16} {M:5d} {sigma:5.2f} {rep:3d} oracle {row['oracle_in']:.4f} | "
              + " ".join(f"{t} {row[t] / row['oracle_in']:.2f}" for t in RULES), flush=True)
    table, summary = summarise(rows)
    print(table)
    if a.out:
        write_json(Path(a.out), dict(settings=vars(a), rules=RULES, summary=summary, rows=rows,
                                     machine=platform.processor() or platform.machine(), torch=torch.__version__,
                                     seconds=time.time() - t0))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

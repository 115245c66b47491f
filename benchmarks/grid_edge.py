"""Does auto's bandwidth grid end too early? Smaller multiples of the median distance, measured.

Auto searches bandwidths {0.25, 0.5, 1, 2, 4} x the median distance (``autotune.BANDWIDTH_MULTS``) and the
oracle of ``accuracy.py`` searches the same grid. On thin structures (rings, curves) at large M the best
bandwidth can lie below 0.25 x median, and then both sit on the grid's edge. For every case and draw (the same
draws as ``accuracy.py --replicates``) this scores a grid with ``--extra-mults`` added below auto's, by auto's
exact criterion (``selection_rules.score_draw``) and by the true in-sample error, and compares:

- the oracle on auto's grid against the oracle on the wider grid (what the smaller bandwidths are worth);
- auto's rule on its own grid (what auto does now), on the whole wider grid (the anchor rule over all candidates),
  and with an *edge extension*: auto's choice on its own grid, then, while that choice has the smallest multiple
  searched so far, the best candidate at half that multiple (every knob value) replaces it if it wins by more
  than ``autotune.SURE_SE_RULE`` paired standard errors.

``--extra-knobs`` also extends the knob's grid past its weak end (e.g. eta = 0.003, 0.001 for the SGE): the oracle
on the wider knob grid, and a knob extension after the edge extension (``knob_extension``).

Ratios are mean errors over the draws; geo-means over cases.

    python benchmarks/grid_edge.py --estimator stein --samples 128 --draws 20
    python benchmarks/grid_edge.py --estimator stein --samples 128 --draws 20 --extra-knobs 0.003 0.001
    python benchmarks/grid_edge.py --quick
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import steinops
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import steinops
from steinops.distributions import get_distribution
from steinops.estimators import autotune

import selection_rules  # noqa: E402  (benchmarks/ is on sys.path when this file runs)
from accuracy import DISTRIBUTIONS  # noqa: E402
from kernels import write_json  # noqa: E402


def _index(cands, mult, knob):
    """Index of the candidate (mult, knob) in ``cands`` (the anchor excluded), or None."""
    return next((i for i, c in enumerate(cands) if i and math.isclose(c[0], mult)
                 and (c[1] is None or math.isclose(c[1], knob))), None)


def edge_extension(T, cands, base, se_rule, knob_grid=None):
    """Auto's anchor rule on the candidates ``base`` (indices into T (C, M), the anchor first), then the library's
    edge extension (``autotune.edge_extension``) with ``se_rule`` over ``knob_grid`` (default: every knob value
    in ``cands``), its candidates looked up in ``cands``. Returns an index into ``cands``."""
    chosen = base[int(autotune.anchor_choice(T[base], se_rule))]
    lowest = min(cands[i][0] for i in base[1:])
    floor = min(c[0] for c in cands[1:])

    def score(mult, knob):  # a candidate missing from the grid never wins
        i = _index(cands, float(mult), None if knob is None else float(knob))
        return torch.full_like(T[0], float("inf")) if i is None else T[i]

    mult, knob = cands[chosen]
    values = knob_grid if knob_grid is not None else sorted({c[1] for c in cands[1:]}, key=lambda v: (v is None, v))
    out = autotune.edge_extension(score, dict(terms=T[chosen], mult=torch.tensor(float(mult), dtype=T.dtype),
                                              knob=None if knob is None else torch.tensor(float(knob), dtype=T.dtype)),
                                  lowest, values, se_rule=se_rule, floor=floor)
    if float(out["mult"]) == float(mult) and (knob is None or float(out["knob"]) == float(knob)):
        return chosen
    return _index(cands, float(out["mult"]), None if out["knob"] is None else float(out["knob"]))


def knob_extension(T, cands, chosen, knob_grid, extra_knobs, se_rule):
    """After the edge extension: while the choice's knob is the weakest regularisation searched so far (the grid's
    end that ``extra_knobs`` continue), the next of ``extra_knobs`` (nearest first) at the same bandwidth replaces
    it if it wins by more than ``se_rule`` paired SEs. Returns an index into ``cands``."""
    below = all(v < min(knob_grid) for v in extra_knobs)  # eta, lam: weaker is smaller; eig_mass: larger
    weakest = min(knob_grid) if below else max(knob_grid)
    for nxt in sorted(extra_knobs, reverse=below):
        mult, knob = cands[chosen]
        if knob is None or not math.isclose(knob, weakest):
            break
        j = _index(cands, mult, nxt)
        gain, se = autotune.paired_gain(T[j], T[chosen])
        if not float(gain) < -se_rule * float(se):
            break
        chosen, weakest = j, nxt
    return chosen


def evaluate(draws, cands, base, se_rule, knob_grid=None, extra_knobs=()):
    """Per case: mean errors over the draws of the oracles (auto's grid; the wider bandwidth grid; with
    ``extra_knobs`` also the wider knob grid) and of the rules (auto, the anchor rule over the wider bandwidth grid,
    the edge extension, and with ``extra_knobs`` the edge extension followed by the knob extension)."""
    on_knob_grid = [i for i, c in enumerate(cands) if i == 0 or knob_grid is None or c[1] in knob_grid]
    sums = dict(oracle=0.0, oracle_wide=0.0, oracle_knobs=0.0, auto=0.0, auto_wide=0.0, edge=0.0, edge_knob=0.0)
    picks_below = knob_moves = 0
    for dr in draws:
        T, err = dr["T"], dr["err"]
        sums["oracle"] += float(err[base].min())
        sums["oracle_wide"] += float(err[on_knob_grid].min())
        sums["oracle_knobs"] += float(err.min())
        sums["auto"] += float(err[base[int(autotune.anchor_choice(T[base], se_rule))]])
        sums["auto_wide"] += float(err[on_knob_grid[int(autotune.anchor_choice(T[on_knob_grid], se_rule))]])
        e = edge_extension(T, cands, base, se_rule, knob_grid)
        sums["edge"] += float(err[e])
        picks_below += cands[e][0] < min(cands[i][0] for i in base[1:])
        k = knob_extension(T, cands, e, knob_grid, extra_knobs, se_rule) if extra_knobs else e
        sums["edge_knob"] += float(err[k])
        knob_moves += k != e
    n = len(draws)
    return {k: v / n for k, v in sums.items()} | dict(edge_below=picks_below, knob_moves=knob_moves, draws=n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimator", default="stein", help="an estimator with an exact SURE (stein, kef, ssge, landweber, nu)")
    p.add_argument("--extra-mults", type=float, nargs="+", default=[0.0625, 0.125],
                   help="bandwidth multiples added below auto's grid")
    p.add_argument("--extra-knobs", type=float, nargs="+", default=[],
                   help="knob values beyond the weak end of the estimator's knob grid (e.g. 0.003 0.001 for the SGE's "
                        "eta): adds the wider knob grid's oracle and the knob extension after the edge extension")
    p.add_argument("--distributions", nargs="+", default=DISTRIBUTIONS)
    p.add_argument("--samples", type=int, nargs="+", default=[128])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1])
    p.add_argument("--draws", type=int, default=5, help="draws per case (seeds first-draw .. first-draw + draws - 1)")
    p.add_argument("--first-draw", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: rings, M = 48, sigma = 0.1, 2 draws")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "grid-edge.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.distributions, a.samples, a.sigmas, a.draws = ["rings"], [48], [0.1], 2
    if a.draws < 1 or a.first_draw < 0:
        p.error("--draws must be at least 1 and --first-draw at least 0")
    if any(not 0 < m < min(autotune.BANDWIDTH_MULTS) for m in a.extra_mults):
        p.error(f"--extra-mults must lie in (0, {min(autotune.BANDWIDTH_MULTS)})")
    grid = steinops.score_estimator(a.estimator, bandwidth="auto").knob_grid(min(a.samples))
    if a.extra_knobs and a.estimator == "kef":
        p.error("--extra-knobs: kef's lam grid scales with M; use stein (in-sample KEF = SGE with eta = M lam)")
    if a.extra_knobs and not (all(v < min(grid) for v in a.extra_knobs) or all(v > max(grid) for v in a.extra_knobs)):
        p.error(f"--extra-knobs must all lie below or all above the knob grid {tuple(grid)}")
    mults = tuple(sorted(set(a.extra_mults) | set(autotune.BANDWIDTH_MULTS)))
    se_rule = autotune.SURE_SE_RULE
    t0, rows = time.time(), []
    from tqdm import tqdm
    for dname in tqdm(a.distributions, desc="distributions"):
        dist = get_distribution(dname)
        for M in a.samples:
            for sigma in a.sigmas:
                est = steinops.score_estimator(a.estimator, bandwidth="auto")
                grid = tuple(est.knob_grid(M)) if est.knob_is_auto() else None
                knobs = tuple(sorted(set(grid) | set(a.extra_knobs))) if grid and a.extra_knobs else None
                cands = autotune.fresh_grid(est, M, mults, knobs)
                base = [i for i, c in enumerate(cands)
                        if i == 0 or (c[0] in autotune.BANDWIDTH_MULTS and (grid is None or c[1] in grid))]
                draws = []
                for seed in range(a.first_draw, a.first_draw + a.draws):
                    x = dist.sample(M, sigma, generator=torch.Generator().manual_seed(seed)).double()
                    T, err, _ = selection_rules.score_draw(a.estimator, x, dist.score(x, sigma), "sure", mults, knobs)
                    draws.append(dict(T=T, err=err))
                r = evaluate(draws, cands, base, se_rule, grid, tuple(a.extra_knobs) if knobs else ())
                rows.append(dict(distribution=dname, M=M, sigma=sigma, **r))
    print(f"{a.estimator}: auto's grid {autotune.BANDWIDTH_MULTS} + {tuple(a.extra_mults)}; mean errors over {a.draws} draws")
    print("| case | oracle wider / auto's grid | auto / its oracle | anchor rule on the wider grid / auto | "
          "edge extension / auto | edge extension / wider oracle | draws it went below |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['distribution']} M={r['M']} sigma={r['sigma']} | {r['oracle_wide'] / r['oracle']:.3f} | "
              f"{r['auto'] / r['oracle']:.3f} | {r['auto_wide'] / r['auto']:.3f} | {r['edge'] / r['auto']:.3f} | "
              f"{r['edge'] / r['oracle_wide']:.3f} | {r['edge_below']} / {r['draws']} |")
    geo = lambda k, b: statistics.geometric_mean([r[k] / r[b] for r in rows])  # noqa: E731
    summary = dict(oracle_gain=geo("oracle_wide", "oracle"), auto_vs_oracle=geo("auto", "oracle"),
                   wide_vs_auto=geo("auto_wide", "auto"), edge_vs_auto=geo("edge", "auto"),
                   edge_vs_wide_oracle=geo("edge", "oracle_wide"))
    if a.extra_knobs:
        print(f"knob grid + {tuple(a.extra_knobs)}\n| case | oracle, wider knobs / wider bandwidths | edge + knob extension / "
              "edge extension | edge + knob extension / the widest oracle | draws the knob moved |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['distribution']} M={r['M']} sigma={r['sigma']} | {r['oracle_knobs'] / r['oracle_wide']:.3f} | "
                  f"{r['edge_knob'] / r['edge']:.3f} | {r['edge_knob'] / r['oracle_knobs']:.3f} | "
                  f"{r['knob_moves']} / {r['draws']} |")
        summary |= dict(knob_oracle_gain=geo("oracle_knobs", "oracle_wide"), knob_vs_edge=geo("edge_knob", "edge"),
                        knob_vs_widest_oracle=geo("edge_knob", "oracle_knobs"))
    print("geo-means: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    write_json(Path(a.out), dict(settings=vars(a), mults=mults, rows=rows, summary=summary, seconds=time.time() - t0,
                                 machine=platform.processor() or platform.machine(), torch=torch.__version__))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

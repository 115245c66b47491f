"""How auto's selection rule turns a noisy criterion into a choice, and how noisy the criterion is.

For every (distribution, M, sigma, draw) it scores each candidate of ``bandwidth="auto"``'s grid (the default,
then bandwidth multiples x the knob grid) by auto's per-point criterion terms, and by its in-sample relative
Fisher error against the exact score. The criterion (``--criterion``):
- ``sure``: the in-sample SURE terms auto uses for estimators with an exact criterion (the closed-form
  leave-one-out of the SGE / diagonal KEF, the exact spectral trace of the SSGE / Landweber / nu with d <= 16);
- ``loo``: leave-one-out by refits (``autotune.loo_terms``), what auto uses for nu (and estimators without an
  exact SURE) on a fresh search with M <= ``autotune.LOO_MAX``; the SSGE used it until 2026-12-06.
Then, offline:

1. Selection rules on the same criterion terms, per case: auto's mean error over the draws / the mean of the
   per-draw oracles (the best candidate by the true error), cases over 1.3x, single draws within 1.3x
   ("(auto)" marks auto's own rule for the criterion: anchor 1 with SURE, argmin with leave-one-out):
   - ``anchor k``: the argmin replaces the default only when it wins by more than k paired standard errors;
   - ``argmin``: the plain argmin;
   - ``anchor k, nearest tie`` / ``argmin, nearest tie``: as ``anchor k`` / ``argmin``, but where the argmin is
     taken, the candidates within 1 paired standard error of it tie, and the tie goes to the candidate nearest the
     anchor on the grid (ranks of bandwidth multiple and knob) -- shrinkage towards the default where the
     criterion cannot tell candidates apart;
   - ``smoothest within k SE``: among the candidates within k paired standard errors of the argmin, the one with
     the largest bandwidth, then the largest regulariser (Breiman's one-standard-error rule);
   - ``penalised k``: argmin of mean + k x the candidate's paired standard error against the default.
2. The criterion's calibration: per candidate, the criterion's error in the difference to the default,
   ``(crit_c - crit_0) - (true_c - true_0)`` with ``true = 1/2 E|g - s|^2 - 1/2 E|s|^2`` over the samples (for
   leave-one-out an estimate of the out-of-sample error of fits on M - 1 points, measured against the in-sample
   one: the difference is part of what it gets wrong here); its standard deviation over the draws divided by the
   mean per-point paired standard error (what the anchor rule uses), and the same for the criterion difference
   alone ("spread": near 1 when the per-point SE describes the criterion's own draw-to-draw noise).
3. The best fixed candidate per case (least mean error over the draws, in hindsight: the risk oracle) against the
   per-draw oracles, every rule against it, and the correlation over draws between the criterion's and the true
   in-sample differences to it among its nearest competitors (negative: the draws' own errors move against the
   criterion).

    python benchmarks/selection_rules.py --estimator stein --samples 128 1024 --draws 5
    python benchmarks/selection_rules.py --estimator ssge --criterion loo --samples 128 --draws 10
    python benchmarks/selection_rules.py --quick

Prints tables and writes JSON (``--out``).
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

import torch

try:
    import steinops
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import steinops
from steinops.bandwidth import median_distance
from steinops.distributions import get_distribution
from steinops.estimators import autotune

import spectral_oracle  # noqa: E402  (benchmarks/ is on sys.path when this file runs)
from accuracy import DISTRIBUTIONS, fisher  # noqa: E402  (the same cases and error as the accuracy benchmark)
from kernels import write_json  # noqa: E402

CRITERIA = ("sure", "loo")


def score_draw(name, x, sx, criterion="sure", bandwidth_mults=autotune.BANDWIDTH_MULTS, knob_values=None):
    """Criterion terms (C, M) and true in-sample errors (C,) of every candidate on one draw, and mean |s|^2; the
    candidates are ``autotune.fresh_grid`` with ``bandwidth_mults`` and ``knob_values`` (auto's own grid by
    default)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    est = steinops.score_estimator(name, bandwidth="auto")
    if criterion == "sure" and not autotune.has_exact_sure_for(est, x):
        raise ValueError(f"{name} has no exact criterion on d = {x.shape[-1]}")
    med = median_distance(x)
    terms, errors, cache, bases = [], [], {}, {}
    with torch.no_grad():
        for mult, val in autotune.fresh_grid(est, x.shape[-2], bandwidth_mults, knob_values):
            c = est.candidate(torch.tensor(mult, dtype=x.dtype) * med, torch.tensor(val, dtype=x.dtype))
            terms.append(autotune.sure_terms(c, x, None, cache=cache) if criterion == "sure" else autotune.loo_terms(c, x))
            if spectral_oracle.applies(name, {}):  # the fit's own numbers from one eigh per bandwidth (tested)
                if mult not in bases:
                    bases[mult] = spectral_oracle.SpectralBasis(x, x[:1], mult, est.kernel)
                g = bases[mult].scores(steinops.score_estimator(name, bandwidth=float(mult * med), **{est.knob: val}))[0]
            else:
                g = c.fit(x).scores_
            errors.append(fisher(g, sx))
    return torch.stack(terms), torch.tensor(errors, dtype=torch.float64), float((sx ** 2).sum(-1).mean())


def paired_se(d: torch.Tensor) -> float:
    return float(d.std() / math.sqrt(d.shape[-1] - 1))


def within_se_of_best(T, k):
    """The candidates whose mean is within k paired standard errors of the argmin's (the argmin included)."""
    best = int(T.mean(-1).argmin())
    return [c for c in range(T.shape[0]) if float((T[c] - T[best]).mean()) <= k * paired_se(T[c] - T[best])]


def rule_anchor(T, cands, k):
    return int(autotune.anchor_choice(T, k))  # the anchor, or the argmin where it wins by more than k SE


def rule_anchor_nearest(T, cands, k):
    """The anchor rule, then a tie-break: the candidates within 1 paired SE of the argmin tie, and the tie goes to
    the one nearest the anchor on the grid (L1 distance of the ranks of bandwidth multiple and knob; then the
    least mean)."""
    if rule_anchor(T, cands, k) == 0:
        return 0
    ranks = [{v: i for i, v in enumerate(sorted({c[a] for c in cands}))} for a in (0, 1)]
    dist = lambda c: sum(abs(ranks[a][cands[c][a]] - ranks[a][cands[0][a]]) for a in (0, 1))  # noqa: E731
    tied = within_se_of_best(T, 1.0)
    return min(tied, key=lambda c: (dist(c), float(T[c].mean())))


def rule_argmin(T, cands, k):
    return int(T.mean(-1).argmin())


def rule_smoothest(T, cands, k):
    near = within_se_of_best(T, k)
    return max(near, key=lambda c: cands[c])  # largest bandwidth multiple, then largest regulariser


def rule_penalised(T, cands, k):
    se = torch.tensor([paired_se(T[c] - T[0]) if c else 0.0 for c in range(T.shape[0])], dtype=T.dtype)
    return int((T.mean(-1) + k * se).argmin())


def rules_for(criterion="sure"):
    """{label: (rule, k)}; "(auto)" marks auto's rule for the criterion (``autotune.SURE_SE_RULE`` = 1 paired SE
    with SURE, ``autotune.LOO_SE_RULE`` = 0, the plain argmin, with leave-one-out by refits)."""
    auto_k = autotune.SURE_SE_RULE if criterion == "sure" else autotune.LOO_SE_RULE
    rules = {"anchor 1": (rule_anchor, 1.0), "anchor 2": (rule_anchor, 2.0), "argmin": (rule_argmin, 0.0),
             "anchor 1, nearest tie": (rule_anchor_nearest, 1.0), "argmin, nearest tie": (rule_anchor_nearest, 0.0),
             "smoothest within 1 SE": (rule_smoothest, 1.0), "smoothest within 0.5 SE": (rule_smoothest, 0.5),
             "penalised 1": (rule_penalised, 1.0), "penalised 2": (rule_penalised, 2.0)}
    auto = "argmin" if auto_k == 0 else f"anchor {auto_k:g}"
    return {(f"{label} (auto)" if label == auto else label): rule for label, rule in rules.items()}


def fixed_oracle(draws):
    """The best *fixed* candidate of one case: the one with the least mean error over the draws (the risk oracle, a
    hyper-parameter set once for the case in hindsight), against the per-draw oracles (each draw's best candidate).
    Returns its index, the ratio of the means, the draws where it is over 1.3x the per-draw oracle, and
    ``corr_median``: over the five candidates of least mean error after it, the median correlation over draws
    between the criterion's difference to it and the in-sample error difference to it. Negative: the criterion
    rates a competitor best on the draws where it is worst, as Cp / SURE / cross-validation do (they estimate
    the error averaged over sample sets, not the error of the fit at hand; Bates, Hastie & Tibshirani 2021,
    arXiv:2104.00673): such a criterion cannot follow each draw's own oracle closely."""
    errors = torch.stack([dr["err"] for dr in draws])  # (draws, C)
    best = int(errors.mean(0).argmin())
    per_draw = errors.min(1).values
    corrs = []
    for c in errors.mean(0).argsort()[1:6].tolist():
        crit = [float((dr["T"][c] - dr["T"][best]).mean()) for dr in draws]
        true = [0.5 * (float(dr["err"][c]) - float(dr["err"][best])) * dr["s2"] for dr in draws]
        if statistics.pstdev(crit) > 0 and statistics.pstdev(true) > 0:
            corrs.append(statistics.correlation(crit, true))
    return dict(index=best, cand=list(draws[0]["cands"][best]), ratio=float(errors[:, best].mean() / per_draw.mean()),
                draws_over=int((errors[:, best] > 1.3 * per_draw).sum()), worst_draw=float((errors[:, best] / per_draw).max()),
                corr_median=statistics.median(corrs) if corrs else float("nan"))


def case_label(key) -> str:
    """"dist M=.. sigma=.." for a case key (distribution, M, sigma)."""
    return f"{key[0]} M={key[1]} sigma={key[2]}"


def evaluate_rules(draws_by_case, criterion="sure", fixed=None):
    """{rule: dict(geo, worst, over, draws_ok, draws, misses, and the same against the fixed oracle: geo_fixed,
    worst_fixed, over_fixed, misses_fixed)} over cases {key: [draw dicts with T, err, cands]}. The ratios are the
    rule's mean error over the draws / the per-draw oracles' mean, or / the best fixed candidate's mean
    (``fixed``: {key: ``fixed_oracle(draws)``}, computed here when not given)."""
    if fixed is None:
        fixed = {key: fixed_oracle(draws) for key, draws in draws_by_case.items()}
    out = {}
    for rule, (fn, k) in rules_for(criterion).items():
        ratios, vs_fixed, ok, n, misses, misses_fixed = [], [], 0, 0, [], []
        for key, draws in draws_by_case.items():
            picked = [float(dr["err"][fn(dr["T"], dr["cands"], k)]) for dr in draws]
            oracle = [float(dr["err"].min()) for dr in draws]
            ratio = sum(picked) / sum(oracle)
            ratio_fixed = sum(picked) / sum(float(dr["err"][fixed[key]["index"]]) for dr in draws)
            ratios.append(ratio)
            vs_fixed.append(ratio_fixed)
            ok += sum(p <= 1.3 * o for p, o in zip(picked, oracle))
            n += len(draws)
            name = case_label(key)
            if ratio > 1.3:
                misses.append(f"{name}: {ratio:.2f}x")
            if ratio_fixed > 1.3:
                misses_fixed.append(f"{name}: {ratio_fixed:.2f}x")
        out[rule] = dict(geo=statistics.geometric_mean(ratios), worst=max(ratios), over=len(misses),
                         cases=len(ratios), draws_ok=ok, draws=n, misses=misses,
                         geo_fixed=statistics.geometric_mean(vs_fixed), worst_fixed=max(vs_fixed),
                         over_fixed=len(misses_fixed), misses_fixed=misses_fixed)
    return out


def calibration(draws):
    """Per candidate c != 0 of one case, over the mean per-point paired standard error of (c - default):
    - the sd over draws of the criterion's error in (c - default) against this draw's in-sample error difference
      (``median``, ``largest``, ``largest_at``: what the anchor rule would need to chase each draw's own errors);
    - the sd over draws of the criterion difference itself (``spread_median``, ``spread_largest``: how well the
      per-point SE measures the criterion's own noise, i.e. its error as an estimate of the expected difference).
    Medians over candidates and the largest (with its candidate)."""
    ratios, spread = [], []
    for c in range(1, draws[0]["T"].shape[0]):
        crit = [float((dr["T"][c] - dr["T"][0]).mean()) for dr in draws]
        errs = [cr - 0.5 * (float(dr["err"][c]) - float(dr["err"][0])) * dr["s2"] for cr, dr in zip(crit, draws)]
        se = statistics.mean(paired_se(dr["T"][c] - dr["T"][0]) for dr in draws)
        if se > 0:
            ratios.append((statistics.stdev(errs) / se, c))
            spread.append(statistics.stdev(crit) / se)
    ratios.sort()
    spread.sort()
    return dict(median=ratios[len(ratios) // 2][0], largest=ratios[-1][0], largest_at=list(draws[0]["cands"][ratios[-1][1]]),
                spread_median=spread[len(spread) // 2], spread_largest=spread[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimator", default="stein", help="stein, kef, ssge, landweber, nu (with --criterion sure: an estimator with an exact SURE)")
    p.add_argument("--criterion", choices=CRITERIA, default="sure",
                   help="sure: the exact in-sample SURE (closed form / spectral trace); loo: leave-one-out by refits")
    p.add_argument("--distributions", nargs="+", default=DISTRIBUTIONS)
    p.add_argument("--samples", type=int, nargs="+", default=[128, 1024], help="sample sizes M")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1])
    p.add_argument("--draws", type=int, default=5, help="independent draws per case (seeds first-draw + 0 .. draws - 1, as accuracy.py)")
    p.add_argument("--first-draw", type=int, default=0, help="seed of the first draw (fresh draws to validate a rule chosen on others)")
    p.add_argument("--quick", action="store_true", help="smoke test: two_mode, M = 48, sigma = 0.5, 3 draws")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "selection-rules.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.distributions, a.samples, a.sigmas, a.draws = ["two_mode"], [48], [0.5], 3
    if a.draws < 2:
        p.error("--draws must be at least 2")
    t0 = time.time()
    cases = {}
    from tqdm import tqdm
    grid = list(itertools.product(a.distributions, a.samples, a.sigmas))
    for dname, M, sigma in tqdm(grid, desc="cases"):
        dist = get_distribution(dname)
        draws, cands = [], autotune.fresh_grid(steinops.score_estimator(a.estimator, bandwidth="auto"), M)
        for seed in range(a.first_draw, a.first_draw + a.draws):
            x = dist.sample(M, sigma, generator=torch.Generator().manual_seed(seed)).double()  # accuracy.py's draw
            T, err, s2 = score_draw(a.estimator, x, dist.score(x, sigma), a.criterion)
            draws.append(dict(T=T, err=err, s2=s2, cands=cands))
        cases[(dname, M, sigma)] = draws
    fixed_by_key = {k: fixed_oracle(v) for k, v in cases.items()}
    rules = evaluate_rules(cases, a.criterion, fixed_by_key)
    fixed = {case_label(k): f for k, f in fixed_by_key.items()}
    calib = {case_label(k): calibration(v) for k, v in cases.items()}
    print(f"{a.estimator}, criterion {a.criterion}: {len(cases)} cases x {a.draws} draws; auto mean / oracle mean over the draws")
    print("| rule | geo-mean | worst | cases over 1.3x | draws within 1.3x | which |\n|---|---|---|---|---|---|")
    for rule, r in rules.items():
        print(f"| {rule} | {r['geo']:.3f}x | {r['worst']:.2f}x | {r['over']} / {r['cases']} | {r['draws_ok']} / {r['draws']} | "
              f"{'; '.join(r['misses']) or '-'} |")
    print("\nagainst the best fixed candidate per case (the risk oracle): rule's mean error / its mean error")
    print("| rule | geo-mean | worst | cases over 1.3x | which |\n|---|---|---|---|---|")
    for rule, r in rules.items():
        print(f"| {rule} | {r['geo_fixed']:.3f}x | {r['worst_fixed']:.2f}x | {r['over_fixed']} / {r['cases']} | "
              f"{'; '.join(r['misses_fixed']) or '-'} |")
    print("\nthe best fixed candidate against the per-draw oracles (a value fixed for the case against one tuned per draw on the exact score)")
    print("(correlation: over its 5 nearest competitors, the median correlation over draws between the criterion's and the"
          "\nin-sample error's differences to it)")
    print("| case | candidate | fixed mean / per-draw oracles' mean | draws over 1.3x | worst draw | correlation |"
          "\n|---|---|---|---|---|---|")
    for case, f in fixed.items():
        print(f"| {case} | {tuple(f['cand'])} | {f['ratio']:.3f}x | {f['draws_over']} / {a.draws} | {f['worst_draw']:.2f}x | "
              f"{f['corr_median']:+.2f} |")
    print("\ncriterion calibration, over the mean per-point paired SE of (candidate - default): the sd over draws of the"
          "\ncriterion's error against the draw's in-sample error difference, and of the criterion difference itself")
    print("| case | error: median over candidates | largest | at (bandwidth multiple, knob) | spread: median | largest |"
          "\n|---|---|---|---|---|---|")
    for case, c in calib.items():
        print(f"| {case} | {c['median']:.2f} | {c['largest']:.2f} | {tuple(c['largest_at'])} | {c['spread_median']:.2f} | "
              f"{c['spread_largest']:.2f} |")
    write_json(Path(a.out), dict(settings=vars(a), rules=rules, fixed_oracle=fixed, calibration=calib,
                                 seconds=time.time() - t0, machine=platform.processor() or platform.machine(),
                                 torch=torch.__version__))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

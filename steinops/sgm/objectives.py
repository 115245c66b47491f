"""Training objectives of a noise-conditional score model s(x, sigma) ~ grad log q_sigma(x).

A training step draws a batch x (B, *shape), ``perturb`` splits it into G groups (one noise level each)
of m samples and adds noise; an ``Objective`` turns the model and that ``NoisyBatch`` into a scalar loss.
Every loss uses the lambda(sigma) = sigma^2 weighting and averages over groups and samples
(x~ = noisy sample, z = its standard normal noise, J = d s / d x~, D = prod(shape)):

    dsm     1/2 |sigma s(x~) + z|^2                              (denoising score matching)
    ssm     sigma^2 [ v^T J v + 1/2 (v^T s)^2 ]                  (sliced score matching, v random)
    ssm-vr  sigma^2 [ v^T J v + 1/2 |s|^2 ]                      (its variance-reduced form)
    sm      sigma^2 [ tr J + 1/2 |s|^2 ]                         (Hyvarinen, exact trace; D <= max_dim)
    stein   1/2 sigma^2 |s(x~) - g(x~)|^2                        (g: a Stein estimator fitted on the noisy group)
    ksd     sigma_g^2 KSD^2_U(x~_g, s(x~_g)) per group           (kernelized Stein discrepancy, U-statistic)

ssm, ssm-vr and sm equal 1/2 sigma^2 E|s - grad log q_sigma|^2 up to a constant (integration by parts), dsm
too (Vincent 2011), so all four share their minimiser; stein and ksd never look at the clean data or the
noise, only at the noisy samples of a level.

    batch = perturb(x, schedule.sigmas, levels_per_step=4, generator=g)
    loss, diag = get_objective("ssm", n_projections=1)(model, batch, generator=g)
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import value_checks_suspended
from ..bandwidth import RULES as BANDWIDTH_RULES, select_bandwidth
from ..estimators.base import ESTIMATORS, score_estimator
from ..estimators.window import window_score
from ..ops.ksd import ksd
from .distributed import gather_groups, local_rows, rank_and_world

PROJECTIONS = ("rademacher", "gaussian")


# --------------------------------------------------------------------------------------------------
# noisy batches
# --------------------------------------------------------------------------------------------------
@dataclass
class NoisyBatch:
    """A batch grouped by noise level; G groups of m samples of shape ``shape``.

    Attributes:
        clean: (G, m, *shape) clean data.
        noisy: (G, m, *shape) clean + sigma_g * noise.
        noise: (G, m, *shape) the standard normal noise z.
        sigma: (G,) the level of each group (dtype of the data).
        level: (G,) long, the index of each level in ``schedule.sigmas``.
        sigmas: (L,) all levels of the schedule, largest first (``perturb`` sets it; objectives that train
            one level from another group's samples need it), or None.
    """

    clean: Tensor
    noisy: Tensor
    noise: Tensor
    sigma: Tensor
    level: Tensor
    sigmas: Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.noisy.shape[0]

    @property
    def group_size(self) -> int:
        return self.noisy.shape[1]

    def flat(self) -> tuple[Tensor, Tensor]:
        """The model's inputs: noisy samples (G m, *shape) and their levels (G m,) (group by group)."""
        G, m = self.noisy.shape[:2]
        x = self.noisy.reshape(G * m, *self.noisy.shape[2:])
        return x, self.sigma.to(x.dtype).repeat_interleave(m)

    def shard(self, rank: int, world: int) -> "NoisyBatch":
        """Rows [rank m/W, (rank+1) m/W) of every group (data parallelism: each rank holds a slice of every
        level, so the ranks together hold exactly the single-process batch). ValueError unless W divides m."""
        m = self.group_size
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"rank must be in [0, world) with world >= 1, got rank={rank!r}, world={world!r}")
        if m % world:
            raise ValueError(f"batch: groups of {m} samples cannot be split evenly over {world} ranks; choose a "
                             f"batch_size with (batch_size // levels_per_step) divisible by the number of processes")
        k = m // world
        cut = lambda t: t[:, rank * k:(rank + 1) * k]
        return NoisyBatch(clean=cut(self.clean), noisy=cut(self.noisy), noise=cut(self.noise), sigma=self.sigma,
                          level=self.level, sigmas=self.sigmas)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _on(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where to draw random numbers: the generator's device (so a CPU generator also drives CUDA runs)."""
    return generator.device if generator is not None else device


def perturb(x: Tensor, sigmas: Tensor, levels_per_step: int, *, generator: torch.Generator | None = None) -> NoisyBatch:
    """Group a batch by noise level and add the noise.

    Picks G = min(levels_per_step, L) distinct levels uniformly at random (a random permutation of the L
    levels), splits x in order into G groups of m = B // G samples (the last B % G samples are dropped)
    and returns noisy = clean + sigma_g z, z ~ N(0, I).

    Args:
        x: clean data (B, *shape) (e.g. (B, d) or images (B, C, H, W)), floating.
        sigmas: the noise levels (L,) (e.g. ``schedule.sigmas``), positive.
        levels_per_step: number of levels per batch, >= 1.
        generator: random source of the levels and the noise.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating tensor of shape (B, *shape), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.numel() < 1:
        raise ValueError(f"sigmas must be a 1-D tensor of noise levels (L,), got "
                         f"{tuple(sigmas.shape) if isinstance(sigmas, Tensor) else type(sigmas).__name__}")
    if not bool(((sigmas > 0) & torch.isfinite(sigmas)).all()):
        raise ValueError("sigmas must be positive and finite")
    _positive_int("levels_per_step", levels_per_step)
    B, shape, L = x.shape[0], x.shape[1:], sigmas.numel()
    G = min(levels_per_step, L)
    m = B // G
    if m < 1:
        raise ValueError(f"x: a batch of {B} samples cannot be split into {G} noise-level groups "
                         f"(levels_per_step={levels_per_step}); use a larger batch")
    level = torch.randperm(L, generator=generator, device=_on(generator, x.device))[:G].to(x.device)
    sigma = sigmas.to(x.device)[level].to(x.dtype)
    clean = x[: G * m].reshape(G, m, *shape)
    noise = torch.randn(clean.shape, generator=generator, dtype=x.dtype, device=_on(generator, x.device)).to(x.device)
    noisy = clean + sigma.view(G, 1, *([1] * len(shape))) * noise
    return NoisyBatch(clean=clean, noisy=noisy, noise=noise, sigma=sigma, level=level, sigmas=sigmas.to(x.device))


def window_ladder(sigmas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For each level of a schedule (any order; float64, CPU): the next coarser level (0 if none), the window
    bandwidth h = sqrt(coarser^2 - sigma^2) that turns samples of the level into targets for it (1 if none),
    and the index of the next finer level (-1 if none). Shapes (L,) each."""
    s = sigmas.detach().double().cpu()
    above = torch.where(s[None, :] > s[:, None], s[None, :], torch.inf).min(1).values
    below = torch.where(s[None, :] < s[:, None], s[None, :], -torch.inf)
    has = torch.isfinite(above)
    coarse = torch.where(has, above, 0.0)
    h = torch.where(has, (coarse.square() - s.square()).clamp_min(0).sqrt(), 1.0)
    finer = torch.where(torch.isfinite(below.max(1).values), below.argmax(1), -1)
    return coarse, h, finer


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
def _sum_rows(t: Tensor) -> Tensor:
    """(N, *shape) -> (N,): sum over everything but the first dimension."""
    return t.reshape(t.shape[0], -1).sum(-1)


@functools.lru_cache(maxsize=64)
def _index(idx: tuple[int, ...], device: torch.device) -> Tensor:
    """A long tensor of ``idx``, made once: the objectives select the same few index sets at every step."""
    return torch.tensor(idx, device=device)


def _groups(t: Tensor, idx: list[int]) -> Tensor:
    """Rows ``idx`` (ascending group indices) of t, without a copy when they are all of t's rows."""
    if len(idx) == t.shape[0]:
        return t
    return t.index_select(0, _index(tuple(idx), t.device))


def _score(model, x: Tensor, sigma: Tensor) -> Tensor:
    s = model(x, sigma)
    if not isinstance(s, Tensor) or s.shape != x.shape:
        raise ValueError(f"model(x, sigma) must return a tensor of x's shape {tuple(x.shape)}, got "
                         f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
    return s


def draw_projections(shape, projection: str, *, generator: torch.Generator | None = None,
                     dtype=torch.float32, device=None) -> Tensor:
    """Random slicing directions v of the given shape with E[v v^T] = I: Rademacher (+-1) or standard normal."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    where = _on(generator, device)
    if projection == "gaussian":
        v = torch.randn(shape, generator=generator, dtype=dtype, device=where)
    else:
        v = torch.randint(0, 2, shape, generator=generator, device=where).to(dtype) * 2 - 1
    return v.to(device)


def score_and_vjv(model, x: Tensor, sigma: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """s = model(x, sigma) (N, *shape) and v^T J v (N,) per sample, J = d s / d x, by ONE forward-mode
    Jacobian-vector product (``torch.func.jvp``: the tangent J v comes with the forward pass).

    Both outputs are differentiable with respect to the model's parameters (reverse mode over forward mode),
    so a loss built from them trains the model. ``x`` itself is not differentiated through.
    """
    if v.shape != x.shape:
        raise ValueError(f"v must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}")
    s, jv = torch.func.jvp(lambda y: _score(model, y, sigma), (x.detach(),), (v.to(x.dtype),))
    return s, _sum_rows(v.to(jv.dtype) * jv)


def _rms(t: Tensor) -> float:
    return float(t.detach().double().square().mean().sqrt())


# --------------------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------------------
class Objective:
    """A training loss: ``loss, diagnostics = objective(model, batch, generator=g)``.

    ``loss`` is a scalar differentiable with respect to the model's parameters, ``diagnostics`` a dict of
    floats for logging. ``min_group`` is the smallest group size m the objective accepts. ``state_dict`` /
    ``load_state_dict`` carry whatever the objective keeps between calls (for bit-exact resume).
    """

    name = "base"
    min_group = 1
    forward_mode_ad = False  # True: the loss takes torch.func.jvp through the model (see train/ddp.py)

    def __init__(self):  # no options
        pass

    def __call__(self, model, batch: NoisyBatch, *, generator: torch.Generator | None = None):
        if not isinstance(batch, NoisyBatch):
            raise TypeError(f"batch must be a NoisyBatch (see perturb), got {type(batch).__name__}")
        if batch.noisy.dim() < 3 or batch.sigma.shape != batch.noisy.shape[:1]:
            raise ValueError(f"batch: noisy must be (G, m, *shape) with sigma (G,), got noisy "
                             f"{tuple(batch.noisy.shape)} and sigma {tuple(batch.sigma.shape)}")
        if batch.group_size < self.min_group:
            raise ValueError(f"batch: groups of m={batch.group_size} samples are smaller than min_group="
                             f"{self.min_group} of method {self.name!r}; use a larger batch_size or fewer "
                             f"levels_per_step")
        return self._loss(model, batch, generator)

    def _loss(self, model, batch: NoisyBatch, generator) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict:
        return {}


class DenoisingScoreMatching(Objective):
    """dsm: mean 1/2 |sigma s(x~, sigma) + z|^2 (the sigma^2-weighted DSM of Vincent 2011 / NCSN)."""

    name = "dsm"

    def _loss(self, model, batch, generator):
        x, sig = batch.flat()
        s = _score(model, x, sig)
        z = batch.noise.reshape(x.shape).to(s.dtype)
        sig_s = sig.to(s.dtype).view(-1, *([1] * (x.dim() - 1))) * s
        loss = (0.5 * _sum_rows((sig_s + z).square())).mean()
        return loss, {"sigma_score_rms": _rms(sig_s)}


class SlicedScoreMatching(Objective):
    """ssm: mean sigma^2 [ v^T J v + 1/2 (v^T s)^2 ] over the samples and ``n_projections`` directions v per
    sample (Song et al. 2019), v ~ ``projection`` ("rademacher" or "gaussian"), drawn with ``generator``.
    v^T J v is one Jacobian-vector product (``score_and_vjv``) on the batch repeated n_projections times."""

    name = "ssm"
    variance_reduced = False
    forward_mode_ad = True

    def __init__(self, n_projections: int = 1, projection: str = "rademacher"):
        self.n_projections = _positive_int("n_projections", n_projections)
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        self.projection = projection

    def _options(self):
        return {"n_projections": self.n_projections, "projection": self.projection}

    def _loss(self, model, batch, generator):
        x, sig = batch.flat()
        K = self.n_projections
        xr = x.repeat(K, *([1] * (x.dim() - 1)))  # (K N, *shape), block k = projection k
        sr = sig.repeat(K)
        v = draw_projections(xr.shape, self.projection, generator=generator, dtype=x.dtype, device=x.device)
        s, vjv = score_and_vjv(model, xr, sr, v)
        if self.variance_reduced:  # E_v (v^T s)^2 = |s|^2 in closed form
            quad = _sum_rows(s.square())
        else:
            quad = _sum_rows(v.to(s.dtype) * s).square()
        w = sr.to(s.dtype).square()
        loss = (w * (vjv + 0.5 * quad)).mean()
        return loss, {"sigma_score_rms": _rms(sr.to(s.dtype).view(-1, *([1] * (x.dim() - 1))) * s),
                      "vjv_weighted": float((w * vjv).detach().mean())}


class SlicedScoreMatchingVR(SlicedScoreMatching):
    """ssm-vr: mean sigma^2 [ v^T J v + 1/2 |s|^2 ] (the variance-reduced sliced score matching)."""

    name = "ssm-vr"
    variance_reduced = True


class ScoreMatching(Objective):
    """sm: mean sigma^2 [ tr J + 1/2 |s|^2 ] with the exact trace (Hyvarinen 2005).

    tr J = sum_i e_i^T J e_i: D Jacobian-vector products, done as one ``torch.func.jvp`` on the batch
    repeated D times (D = prod(shape)), so the cost is D forward passes; ValueError if D > ``max_dim``.
    """

    name = "sm"
    forward_mode_ad = True

    def __init__(self, max_dim: int = 64):
        self.max_dim = _positive_int("max_dim", max_dim)

    def _options(self):
        return {"max_dim": self.max_dim}

    def _loss(self, model, batch, generator):
        x, sig = batch.flat()
        N, shape = x.shape[0], x.shape[1:]
        D = math.prod(shape)
        if D > self.max_dim:
            raise ValueError(f"sm: the data dimension D={D} exceeds max_dim={self.max_dim} (the exact trace costs "
                             f"D forward passes); raise max_dim or use ssm / ssm-vr")
        basis = torch.eye(D, dtype=x.dtype, device=x.device).reshape(D, *shape)
        tangents = basis.repeat_interleave(N, 0)  # block i: e_i for every sample
        xr = x.repeat(D, *([1] * len(shape)))
        s, diag = score_and_vjv(model, xr, sig.repeat(D), tangents)  # diag: J_ii, block i
        trace = diag.view(D, N).sum(0)
        s = s[:N]
        w = sig.to(s.dtype).square()
        loss = (w * (trace + 0.5 * _sum_rows(s.square()))).mean()
        return loss, {"sigma_score_rms": _rms(sig.to(s.dtype).view(-1, *([1] * len(shape))) * s)}


class SteinObjective(Objective):
    """stein: regress the model on nonparametric score estimates of the noisy samples,
    mean 1/2 sigma^2 |s(x~) - g(x~)|^2.

    g: a steinops estimator (``estimator`` in ``steinops.ESTIMATORS``, ``**estimator_options`` passed to
    ``steinops.score_estimator``: kernel, bandwidth (e.g. ``steinops.AutoTune(...)``), eta / lam / ...) fitted
    under ``no_grad`` on the noisy groups only, in one batched fit over (G, m, D) (images flattened to
    D = C H W for the estimator), in-sample estimates ``scores_``; the targets are constants. The clean data
    and the noise are never used. The estimator instance persists across calls (AutoTune warm starts);
    ``state_dict`` keeps its tuning state. The fit runs in the dtype of the noisy samples.

    Bandwidth: the estimator's (default: 2 x the median distance of the group). With ``sigma_bandwidth=c``
    it is capped at c sigma per group: q_sigma = p * N(0, sigma^2 I) has no structure finer than sigma, but
    when p has structure finer than its global spread (clusters, rings) the median rule over-smooths the
    small levels; the cap resolves them. It uses the group's noise level, never the noise itself.

    Data parallelism: with ``gather=True`` each rank all-gathers the noisy slices of its groups
    (``NoisyBatch.shard``), fits on the whole group and keeps its own rows' targets: the same targets as one
    process with the global batch, for one all-gather of (G, m, D) per step (window targets excepted: each rank
    draws its own query noise and decides on its own rows' n_eff, the same in law but not bit-identical). ``gather=False`` fits on the
    local m / W rows only: no communication, but a noisier and (through the bandwidth and the ridge) more
    biased estimate. Without an initialised process group both are the single-process objective.

    Window targets (``window_neff=N``; the driver's ``--window-neff``): the regression estimators' bias is
    shrinkage towards zero where samples are sparse, and on the NCSN toy it sits between the modes at the
    middle levels, where annealed Langevin splits the mass. There the Gaussian-window Stein ratio
    (``steinops.estimators.window``) is better: samples of q_sigma, windowed at h = sqrt(sigma_c^2 - sigma^2),
    give the score of q_sigma * N(0, h^2 I) = q_{sigma_c} (sigma_c: the next coarser level) with only a ratio
    bias of order 1 / n_eff. So each group also trains the next coarser level, at points y = x + h z ~ q_{sigma_c},
    when the median n_eff of its windows is >= N; a level is regressed on its own group's estimate only while
    its finer level's windows were (last seen, this step included) below N, or when it is the finest level.
    ``benchmarks/window_targets.py`` measures both targets' bias per level against the exact scores.

    Regularisation: unless the estimator's knob (``eta``, ``lam``, ``eig_mass``; or ``n_eigen`` / ``n_iter``)
    is given, it is set at each fit to the estimator's least-regularised grid value
    (``knob_least_regularised(m)``: eta = 0.01 for the SGE, lam = 0.01 / m for KEF, eig_mass = 0.999 for
    SSGE), not to its one-shot default. The network converges to the conditional mean of its targets, so
    only the estimator's bias is inherited and its variance is averaged away over steps; the one-shot
    defaults (eta = 0.3) minimise bias + variance, and their ridge shrinks the targets towards zero where the
    density is low (tails, between modes: where Langevin decides which mode a particle joins). Measured on the NCSN
    toy (``benchmarks/target_bias.py``, and the driver's demo, 3000 steps): eta = 0.3 gives sample energy
    distance 0.31 and mode-weight error 0.11, eta = 0.01 gives 0.024 and 0.025 (DSM: 0.13 and 0.06; at 5000
    steps DSM reaches 0.002 / 0.010 and Stein 0.014 / 0.021, ``benchmarks/toy_quality.py``).
    """

    name = "stein"
    min_group = 8

    def __init__(self, estimator: str = "stein", *, sigma_bandwidth: float | None = None, gather: bool = False,
                 window_neff: float | None = None, **estimator_options):
        if window_neff is not None and (isinstance(window_neff, bool) or not isinstance(window_neff, (int, float))
                                        or not (math.isfinite(window_neff) and window_neff >= 1)):
            raise ValueError(f"window_neff must be a number >= 1 or None, got {window_neff!r}")
        self.window_neff = None if window_neff is None else float(window_neff)
        self._neff = None  # [L] the last median n_eff of each level's windows (NaN: not seen yet)
        self._ladder_cache = None
        self._last_neff = 0.0
        if not isinstance(gather, bool):
            raise ValueError(f"gather must be True or False, got {gather!r}")
        self.gather = gather
        if not isinstance(estimator, str) or estimator.lower() not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
        if sigma_bandwidth is not None:
            if isinstance(sigma_bandwidth, bool) or not isinstance(sigma_bandwidth, (int, float)) or not (
                    math.isfinite(sigma_bandwidth) and sigma_bandwidth > 0):
                raise ValueError(f"sigma_bandwidth must be a positive number or None, got {sigma_bandwidth!r}")
            rule = estimator_options.get("bandwidth", "median")
            if not (isinstance(rule, str) or (isinstance(rule, (int, float)) and not isinstance(rule, bool))):
                raise ValueError("sigma_bandwidth caps a rule or numeric bandwidth; it cannot be combined with "
                                 f"bandwidth={rule!r} (e.g. AutoTune)")
        self.estimator_name = estimator.lower()
        self.sigma_bandwidth = None if sigma_bandwidth is None else float(sigma_bandwidth)
        self.bandwidth_rule = estimator_options.get("bandwidth", "median")
        self.estimator_options = dict(estimator_options)
        self.estimator = score_estimator(self.estimator_name, **estimator_options)  # bad options fail here
        knob = self.estimator.knob
        self.low_bias_knob = knob is not None and not ({knob, "n_eigen", "n_iter"} & set(estimator_options))

    def _options(self):
        return {"estimator": self.estimator_name, "sigma_bandwidth": self.sigma_bandwidth, "gather": self.gather,
                "window_neff": self.window_neff, **self.estimator_options}

    def _loss(self, model, batch, generator):
        G, m = batch.noisy.shape[:2]
        shape = batch.noisy.shape[2:]
        noisy = batch.noisy.detach().reshape(G, m, -1)
        parts = []  # (inputs (k, m, D), levels (k,), targets (k, m, D), bandwidths (k,)) per kind of target
        info = {}
        # the value checks (finite inputs, positive bandwidths) are skipped here: the inputs are made from the
        # data by perturb and a NaN anywhere reaches the loss, which the training loop checks at every step
        with torch.no_grad(), value_checks_suspended():
            xg = gather_groups(noisy) if self.gather else noisy  # the whole group from every rank's slice
            regress = list(range(G))
            if self.window_neff is not None:
                y, coarse, g_win, h_win, use, regress = self._window_targets(batch, xg, generator)
                if use:
                    parts.append(tuple(_groups(t, use) for t in (y, coarse, g_win, h_win)))
                info = {"window_groups": len(use) / G, "window_neff": self._last_neff}
            if regress:
                # AutoTune keeps its choice between fits only for a fixed batch shape: give it every group
                fit = regress if self.estimator._autotune_settings() is None else list(range(G))
                xr = _groups(xg, fit)
                if self.low_bias_knob:
                    setattr(self.estimator, self.estimator.knob, self.estimator.knob_least_regularised(xr.shape[1]))
                if self.sigma_bandwidth is not None:  # h = min(rule(x), c sigma) per group
                    h = torch.as_tensor(select_bandwidth(xr, self.bandwidth_rule), dtype=xr.dtype,
                                        device=xr.device).expand(xr.shape[0])
                    self.estimator.bandwidth = torch.minimum(
                        h, self.sigma_bandwidth * _groups(batch.sigma, fit).to(xr.dtype))
                self.estimator.fit(xr)
                keep = [fit.index(i) for i in regress]  # the regressed groups' rows of the fit
                g = _groups(self.estimator.scores_.detach(), keep)
                if self.gather:
                    g = local_rows(g, m)
                bw = self.estimator.bandwidth_.to(xr.dtype).reshape(-1).expand(len(fit))
                parts.append((_groups(noisy, regress), _groups(batch.sigma, regress).to(xr.dtype), g, _groups(bw, keep)))
            inputs, levels, targets, bandwidths = (torch.cat(t) if len(t) > 1 else t[0] for t in zip(*parts))
            x = inputs.reshape(-1, *shape)
            sig = levels.repeat_interleave(m).to(batch.noisy.dtype)
            target = targets.reshape(x.shape).to(batch.noisy.dtype)
        s = _score(model, x, sig)
        w = sig.to(s.dtype).square()
        loss = (0.5 * w * _sum_rows((s - target).square())).sum() / (G * m)
        with torch.no_grad():  # the diagnostics in one reduction and one host transfer (they run every step)
            sig_col = sig.to(s.dtype).view(-1, *([1] * (x.dim() - 1)))
            stats = torch.stack([target.square().mean(), (sig_col * target).square().mean(),
                                 (sig_col * s).square().mean(), bandwidths.to(s.dtype).mean()]).double().tolist()
        return loss, {"target_rms": math.sqrt(stats[0]), "sigma_target_rms": math.sqrt(stats[1]),
                      "sigma_score_rms": math.sqrt(stats[2]), "bandwidth": stats[3], **info}

    def _window_targets(self, batch, xg, generator):
        """Window targets of every group for the next coarser level, and which groups use them.

        Group g at level sigma_i (samples x of q_{sigma_i}) and the next coarser level sigma_c > sigma_i:
        h = sqrt(sigma_c^2 - sigma_i^2), queries y = x + h z (z fresh standard normal, so y ~ q_{sigma_c}),
        targets ``window_score`` of the group at y leaving out each query's own sample: then
        E[numerator] / E[denominator] = grad log q_{sigma_c}(y) exactly (``estimators.window``).

        Returns y (G, m, D), sigma_c (G,), targets (G, m, D), h (G,), ``use``: the groups (indices, ascending)
        that have a coarser level and median n_eff >= window_neff, and ``regress``: the groups whose own level
        also needs regression targets (it is the finest level, or the next finer level's groups were last
        seen below the threshold: that level's windows do not cover this one; and every group when no group
        would give anything, so a step is never empty). Under ``gather`` each rank decides on its own queries.
        The bookkeeping over the G groups and L levels is plain Python: a handful of numbers per step, where
        tensor indexing would cost more than the window op itself.
        """
        G, m = batch.noisy.shape[:2]
        if batch.sigmas is None:
            raise ValueError("batch: window targets need the schedule (NoisyBatch.sigmas); build it with perturb")
        coarse_of, h_of, finer_of = self._ladder(batch.sigmas)
        if self._neff is None or len(self._neff) != len(coarse_of):
            self._neff = [math.nan] * len(coarse_of)
        lv = batch.level.tolist()
        has_coarse = [coarse_of[i] > 0 for i in lv]
        # sigma_c (0: none, unused) and h (1: none, unused) of each group, in one host-to-tensor copy
        coarse, h = torch.tensor([[coarse_of[i] for i in lv], [h_of[i] for i in lv]], dtype=xg.dtype,
                                 device=xg.device).unbind(0)
        x_local = batch.noisy.detach().reshape(G, m, -1)
        z = torch.randn(x_local.shape, generator=generator, dtype=x_local.dtype,
                        device=_on(generator, x_local.device)).to(x_local.device)
        y = x_local + h.view(G, 1, 1) * z
        offset = 0 if xg.shape[1] == m else rank_and_world()[0] * m  # this rank's rows of a gathered group
        exclude = _index(tuple(range(offset, offset + m)), xg.device)  # each query's own sample
        g, neff = window_score(xg, y, h, exclude=exclude, return_neff=True)
        med = neff.median(-1).values.tolist()
        seen = [i for i in range(G) if has_coarse[i]]
        use = [i for i in seen if med[i] >= self.window_neff]
        for i in seen:
            self._neff[lv[i]] = med[i]
        self._last_neff = sum(med[i] for i in seen) / len(seen) if seen else 0.0
        # the level just below each group's: was it (last seen) able to give this level its window targets?
        regress = [i for i in range(G) if not (finer_of[lv[i]] >= 0 and self._neff[finer_of[lv[i]]] >= self.window_neff)]
        if not use and not regress:  # e.g. one group, at the coarsest level, already covered: no empty step
            regress = list(range(G))
        return y, coarse, g, h, use, regress

    def _ladder(self, sigmas: Tensor) -> tuple[list, list, list]:
        """``window_ladder(sigmas)`` as Python lists, cached for the tensor the training loop passes at every step."""
        if self._ladder_cache is None or self._ladder_cache[0] is not sigmas:
            self._ladder_cache = (sigmas, tuple(t.tolist() for t in window_ladder(sigmas)))
        return self._ladder_cache[1]

    def state_dict(self) -> dict:
        last = self.estimator._last_tuned
        if last is not None:
            last = {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in last.items()}
        return {"estimator": self.estimator_name, "last_tuned": last, "n_fits": int(self.estimator._n_fits),
                "window_neff": None if self._neff is None else torch.tensor(self._neff, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        missing = {"last_tuned", "n_fits"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)} (not a stein objective's state_dict)")
        if state.get("estimator", self.estimator_name) != self.estimator_name:
            raise ValueError(f"state is for estimator {state['estimator']!r}, this objective uses {self.estimator_name!r}")
        last = state["last_tuned"]
        if last is not None:
            last = {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in last.items()}
        self.estimator._last_tuned = last
        self.estimator._n_fits = int(state["n_fits"])
        neff = state.get("window_neff")
        self._neff = None if neff is None else torch.as_tensor(neff, dtype=torch.float64).tolist()


class KSDObjective(Objective):
    """ksd: mean over groups of sigma_g^2 KSD^2_U(x~_g, s(x~_g)) (``steinops.ksd``, U-statistic, i != j), the
    model's scores at the noisy samples of each group against those samples (images flattened to D).

    Options: kernel "rbf" or "imq"; bandwidth a positive number or a rule name ("median": computed per group
    from the noisy samples, detached). The U-statistic is unbiased, so the loss can be slightly negative.
    ``gather=True`` (data parallelism) all-gathers every rank's samples and scores (differentiably) so each
    group's KSD pairs all its samples, as in one process; ``gather=False`` pairs only the local slice.
    """

    name = "ksd"
    min_group = 8

    def __init__(self, kernel: str = "rbf", bandwidth="median", gather: bool = False):
        if not isinstance(gather, bool):
            raise ValueError(f"gather must be True or False, got {gather!r}")
        self.gather = gather
        if kernel not in ("rbf", "imq"):
            raise ValueError(f"kernel must be 'rbf' or 'imq', got {kernel!r}")
        if isinstance(bandwidth, str):
            if bandwidth not in BANDWIDTH_RULES:
                raise ValueError(f"bandwidth must be a positive number or one of {BANDWIDTH_RULES}, got {bandwidth!r}")
        elif isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not (
                math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be a positive number or one of {BANDWIDTH_RULES}, got {bandwidth!r}")
        self.kernel, self.bandwidth = kernel, bandwidth

    def _options(self):
        return {"kernel": self.kernel, "bandwidth": self.bandwidth, "gather": self.gather}

    def _loss(self, model, batch, generator):
        G, m = batch.noisy.shape[:2]
        x, sig = batch.flat()
        s = _score(model, x, sig)
        xg = batch.noisy.detach().reshape(G, m, -1).to(s.dtype)
        sg = s.reshape(G, m, -1)
        if self.gather:  # every rank computes the whole-group loss; all_gather's backward routes the gradients
            xg, sg = gather_groups(xg), gather_groups(sg, differentiable=True)
        if isinstance(self.bandwidth, str):
            with torch.no_grad():
                h = torch.as_tensor(select_bandwidth(xg, self.bandwidth), dtype=s.dtype, device=s.device)
                h = h.expand(G).detach()
        else:
            h = torch.full((G,), float(self.bandwidth), dtype=s.dtype, device=s.device)
        k = ksd(xg, sg, kernel=self.kernel, bandwidth=h, u_statistic=True)  # (G,)
        w = batch.sigma.to(k.dtype).square()
        loss = (w * k).mean()
        return loss, {"ksd_weighted": float(loss.detach()), "ksd_mean": float(k.detach().double().mean()),
                      "bandwidth": float(h.double().mean())}


OBJECTIVES: dict[str, type] = {
    "dsm": DenoisingScoreMatching,
    "ssm": SlicedScoreMatching,
    "ssm-vr": SlicedScoreMatchingVR,
    "sm": ScoreMatching,
    "stein": SteinObjective,
    "ksd": KSDObjective,
}


def get_objective(name: str, **options) -> Objective:
    """The objective ``name`` (see ``OBJECTIVES``) with its options, e.g. ``get_objective("ssm", n_projections=2)``.

    ValueError naming ``method`` for an unknown name and naming the option for unknown or bad options
    (for "stein", options other than ``estimator`` go to ``steinops.score_estimator``, which checks them).
    """
    if not isinstance(name, str) or name.lower() not in OBJECTIVES:
        raise ValueError(f"method must be one of {sorted(OBJECTIVES)}, got {name!r}")
    cls = OBJECTIVES[name.lower()]
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [p for p in params if p != "self"]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {name!r}; its options are {known}")
    return cls(**options)

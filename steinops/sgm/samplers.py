"""Samplers for noise-conditional score models: Langevin, annealed Langevin (NCSN), the VE-SDE
predictor-corrector sampler and probability-flow ODE (Song et al. 2021), and a training-free sampler
driven by a steinops score estimator fitted on noisy copies of the data.

A score function is called as ``score_fn(x, sigma)`` with x (N, d) and sigma (N,) (x's dtype/device)
and returns (N, d) ~ grad log q_sigma(x), q_sigma = q * N(0, sigma^2 I). Every sampler runs under
``torch.no_grad``, is deterministic given ``generator`` (a ``torch.Generator`` on x0's device) and returns
a ``SampleResult``: the samples, optionally the trajectory (every ``record_every``-th state of the chain,
the initial one included: shape (n_updates // record_every + 1, N, d)) and the number of score
evaluations ``nfe``.

    langevin             x <- x + a s(x, sigma) + sqrt(2a) z                       (one fixed level)
    annealed_langevin    the same with a_i = eps sigma_i^2 / sigma_L^2, T steps per level, then
                         optionally the denoising step x + sigma_L^2 s(x, sigma_L)
    pc_sampler           reverse-diffusion predictor on sigma_i = sigma(t_i), t_i from 1 to t_min:
                             x <- x + (sigma_i^2 - sigma_{i+1}^2) s(x, sigma_i) + sqrt(sigma_i^2 - sigma_{i+1}^2) z
                         preceded at every level by Langevin corrector steps of size 2 (snr |z| / |s|)^2
    probability_flow_ode dx/dt = -1/2 g(t)^2 s(x, sigma(t)) from t = 1 to t_min (scipy solve_ivp)
    training_free_sampler  annealed Langevin with ``EstimatorScore`` (no network)
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .noise import VESDE, NoiseSchedule

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    """samples (N, d); trajectory (T', N, d) or None; nfe = number of score evaluations (batched calls)."""

    samples: torch.Tensor
    trajectory: torch.Tensor | None
    nfe: int


# -- argument checks (ValueError naming the argument) ---------------------------------------------------
def _positive(name, value, *, allow_zero=False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} number, got {value}")
    return value


def _integer(name, value, minimum) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_x0(x0) -> torch.Tensor:
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point torch.Tensor of shape (N, d), got {type(x0).__name__}"
                         + (f" of dtype {x0.dtype}" if isinstance(x0, torch.Tensor) else ""))
    if x0.dim() < 2 or x0.shape[0] < 1 or x0[0].numel() < 1:
        raise ValueError(f"x0 must have shape (N, d) with N >= 1, got {tuple(x0.shape)}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains NaN or infinite values")
    return x0


def _check_common(score_fn, x0, generator, record_every):
    if not callable(score_fn):
        raise ValueError(f"score_fn must be callable as score_fn(x, sigma), got {type(score_fn).__name__}")
    x0 = _check_x0(x0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return x0, _integer("record_every", record_every, 0)


def _check_sigmas(sigmas) -> torch.Tensor:
    """Noise levels as a float64 tensor (L,), positive, finite, strictly decreasing (a NoiseSchedule works too)."""
    if isinstance(sigmas, NoiseSchedule):
        sigmas = sigmas.sigmas
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"sigmas must be a 1-D sequence of noise levels, got {type(sigmas).__name__}") from None
    if s.dim() != 1 or s.numel() < 1:
        raise ValueError(f"sigmas must have shape (L,) with L >= 1, got {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError("sigmas must be finite and positive")
    if s.numel() > 1 and not bool((s[1:] < s[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing (sigma_1 > ... > sigma_L)")
    return s


def _check_sde(sde) -> VESDE:
    if isinstance(sde, NoiseSchedule):
        sde = sde.sde()
    if not isinstance(sde, VESDE):
        raise ValueError(f"sde must be a VESDE (or a NoiseSchedule), got {type(sde).__name__}")
    return sde


def _check_t_min(t_min) -> float:
    t_min = _positive("t_min", t_min, allow_zero=True)
    if t_min >= 1:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    return t_min


# -- shared machinery ------------------------------------------------------------------------------
class _Chain:
    """Counts score evaluations (checking the output shape), records the trajectory, drives the progress bar."""

    def __init__(self, score_fn, x0, record_every, total, progress, desc):
        self.score_fn, self.nfe, self.k, self.step = score_fn, 0, record_every, 0
        self.states = [x0.clone()] if record_every else None
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False)

    def score(self, x, sigma: float) -> torch.Tensor:
        s = self.score_fn(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))
        self.nfe += 1
        if not isinstance(s, torch.Tensor) or s.shape != x.shape:
            raise ValueError(f"score_fn must return a tensor of shape {tuple(x.shape)}, "
                             f"got {tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
        return s.to(x.dtype)

    def noise(self, x, generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    def advance(self, x):
        """Called after every update of the chain state."""
        self.step += 1
        if self.k and self.step % self.k == 0:
            self.states.append(x.clone())
        if self.bar is not None:
            self.bar.update(1)

    def result(self, x) -> SampleResult:
        if self.bar is not None:
            self.bar.close()
        traj = torch.stack(self.states) if self.k else None
        return SampleResult(x, traj, self.nfe)


# -- score functions -------------------------------------------------------------------------------
def exact_score_fn(dist) -> ScoreFn:
    """The exact score of a ``steinops.distributions`` law: ``dist.score(x, sigma)`` once per distinct sigma
    (computed in float64), returned in x's dtype. sigma: a scalar or an (N,) tensor."""
    if not callable(getattr(dist, "score", None)):
        raise ValueError(f"dist must have a score(x, sigma) method, got {type(dist).__name__}")

    def score(x: torch.Tensor, sigma) -> torch.Tensor:
        sig = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().reshape(-1)
        xd = x.detach().to(torch.float64)
        if sig.numel() == 1:
            return dist.score(xd, float(sig)).to(x)
        if sig.numel() != x.shape[0]:
            raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sig.shape)}")
        out = torch.empty_like(xd)
        for s in torch.unique(sig).tolist():
            rows = (sig == s).to(x.device)
            out[rows] = dist.score(xd[rows], s).to(out)
        return out.to(x)

    return score


def network_score_fn(model: torch.nn.Module) -> ScoreFn:
    """``model(x, sigma)`` under no_grad, with x and sigma cast to the model's dtype/device and the output
    cast back to x's. The model's train/eval mode is left as it is."""
    if not callable(model):
        raise ValueError(f"model must be callable as model(x, sigma), got {type(model).__name__}")

    def score(x: torch.Tensor, sigma) -> torch.Tensor:
        p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        dtype, device = (p.dtype, p.device) if p is not None else (x.dtype, x.device)
        sig = torch.as_tensor(sigma, dtype=dtype, device=device)
        with torch.no_grad():
            out = model(x.to(dtype=dtype, device=device), sig)
        return out.to(dtype=x.dtype, device=x.device)

    return score


# -- samplers --------------------------------------------------------------------------------------
def langevin(score_fn: ScoreFn, x0: torch.Tensor, *, sigma: float, step_size: float, n_steps: int,
             generator: torch.Generator | None = None, record_every: int = 0, progress: bool = False) -> SampleResult:
    """Plain (unadjusted) Langevin dynamics at one level: x <- x + a s(x, sigma) + sqrt(2a) z, n_steps times.
    sigma >= 0 (0: the clean data score, for laws that have one); a = step_size > 0. nfe = n_steps."""
    x, record_every = _check_common(score_fn, x0, generator, record_every)
    sigma = _positive("sigma", sigma, allow_zero=True)
    a = _positive("step_size", step_size)
    n_steps = _integer("n_steps", n_steps, 1)
    chain = _Chain(score_fn, x, record_every, n_steps, progress, "langevin")
    with torch.no_grad():
        x = x.clone()
        for _ in range(n_steps):
            x = x + a * chain.score(x, sigma) + math.sqrt(2 * a) * chain.noise(x, generator)
            chain.advance(x)
    return chain.result(x)


def annealed_langevin(score_fn: ScoreFn, x0: torch.Tensor, sigmas, *, eps: float, n_steps_each: int,
                      denoise: bool = True, generator: torch.Generator | None = None, record_every: int = 0,
                      progress: bool = False) -> SampleResult:
    """Annealed Langevin dynamics (NCSN): for each level sigma_i of ``sigmas`` (L,) (decreasing, or a
    NoiseSchedule), ``n_steps_each`` steps x <- x + a_i s(x, sigma_i) + sqrt(2 a_i) z with
    a_i = eps sigma_i^2 / sigma_L^2; then, if ``denoise``, x <- x + sigma_L^2 s(x, sigma_L) (Tweedie).
    nfe = L n_steps_each (+1); the trajectory holds the L n_steps_each Langevin updates (not the denoising)."""
    x, record_every = _check_common(score_fn, x0, generator, record_every)
    sigmas = _check_sigmas(sigmas).tolist()
    eps = _positive("eps", eps)
    T = _integer("n_steps_each", n_steps_each, 1)
    chain = _Chain(score_fn, x, record_every, len(sigmas) * T, progress, "annealed langevin")
    s_last2 = sigmas[-1] ** 2
    with torch.no_grad():
        x = x.clone()
        for sigma in sigmas:
            a = eps * sigma**2 / s_last2
            for _ in range(T):
                x = x + a * chain.score(x, sigma) + math.sqrt(2 * a) * chain.noise(x, generator)
                chain.advance(x)
        if denoise:
            x = x + s_last2 * chain.score(x, sigmas[-1])
    return chain.result(x)


def pc_sampler(score_fn: ScoreFn, x0: torch.Tensor, sde: VESDE, *, n_steps: int, snr: float = 0.16,
               n_corrector: int = 1, denoise: bool = True, t_min: float = 1e-3,
               generator: torch.Generator | None = None, record_every: int = 0, progress: bool = False) -> SampleResult:
    """Predictor-corrector sampler for the VE SDE (Song et al. 2021), x0 ~ the prior N(0, sigma_max^2 I).

    Levels sigma_i = sde.sigma(t_i), t_i = linspace(1, t_min, n_steps + 1). For i = 0 .. n_steps - 1:
      corrector (``n_corrector`` times, at sigma_i): z ~ N(0, I), a = 2 (snr mean_n|z_n| / mean_n|s_n|)^2,
          x <- x + a s(x, sigma_i) + sqrt(2a) z      (norms per sample, averaged over the batch);
      predictor (reverse diffusion): x <- x + (sigma_i^2 - sigma_{i+1}^2) s(x, sigma_i) + sqrt(sigma_i^2 - sigma_{i+1}^2) z.
    The chain ends at sigma(t_min) (x ~ q_{sigma(t_min)}); ``denoise`` adds x <- x + sigma(t_min)^2 s(x, sigma(t_min)).
    nfe = n_steps (1 + n_corrector) (+1). One trajectory entry per (corrector + predictor) step."""
    x, record_every = _check_common(score_fn, x0, generator, record_every)
    sde = _check_sde(sde)
    n_steps = _integer("n_steps", n_steps, 1)
    n_corrector = _integer("n_corrector", n_corrector, 0)
    snr = _positive("snr", snr)
    t_min = _check_t_min(t_min)
    sig = [float(sde.sigma(t)) for t in np.linspace(1.0, t_min, n_steps + 1)]
    chain = _Chain(score_fn, x, record_every, n_steps, progress, "pc sampler")
    flat = lambda v: v.reshape(v.shape[0], -1)
    with torch.no_grad():
        x = x.clone()
        for i in range(n_steps):
            for _ in range(n_corrector):
                s = chain.score(x, sig[i])
                z = chain.noise(x, generator)
                s_norm = flat(s).norm(dim=-1).mean()
                z_norm = flat(z).norm(dim=-1).mean()
                if s_norm > 0:  # a zero score field leaves x as it is (the step size would be infinite)
                    a = 2 * (snr * z_norm / s_norm) ** 2
                    x = x + a * s + torch.sqrt(2 * a) * z
            var = sig[i] ** 2 - sig[i + 1] ** 2
            x = x + var * chain.score(x, sig[i]) + math.sqrt(var) * chain.noise(x, generator)
            chain.advance(x)
        if denoise:
            x = x + sig[-1] ** 2 * chain.score(x, sig[-1])
    return chain.result(x)


def probability_flow_ode(score_fn: ScoreFn, x0: torch.Tensor, sde: VESDE, *, rtol: float = 1e-5, atol: float = 1e-5,
                         method: str = "RK45", t_min: float = 1e-3, denoise: bool = False, record_every: int = 0,
                         progress: bool = False) -> SampleResult:
    """Probability-flow ODE of the VE SDE, dx/dt = -1/2 g(t)^2 s(x, sigma(t)), integrated from t = 1
    (x0 ~ the prior) to ``t_min`` by ``scipy.integrate.solve_ivp`` (``method``, ``rtol``, ``atol``) on the
    flattened state in float64; the score is evaluated in x0's dtype. The samples follow q_{sigma(t_min)};
    ``denoise`` adds x <- x + sigma(t_min)^2 s(x, sigma(t_min)). Deterministic. nfe counts every score call.
    ``record_every=k`` keeps every k-th accepted solver step (the initial state included)."""
    x0, record_every = _check_common(score_fn, x0, None, record_every)
    sde = _check_sde(sde)
    rtol, atol = _positive("rtol", rtol), _positive("atol", atol)
    t_min = _check_t_min(t_min)
    if not isinstance(method, str):
        raise ValueError(f"method must be a solve_ivp method name such as 'RK45', got {method!r}")
    chain = _Chain(score_fn, x0, 0, 1000, progress, "probability-flow ODE")
    shape, dtype, device = x0.shape, x0.dtype, x0.device

    def rhs(t, y):
        x = torch.from_numpy(y).reshape(shape).to(dtype=dtype, device=device)
        s = chain.score(x, float(sde.sigma(t)))
        if chain.bar is not None:  # progress in t (solver stages are not monotone: show the furthest point)
            done = int(1000 * (1 - t) / (1 - t_min))
            if done > chain.bar.n:
                chain.bar.update(done - chain.bar.n)
        return (-0.5 * float(sde.g2(t))) * s.detach().to("cpu", torch.float64).numpy().ravel()

    y0 = x0.detach().to("cpu", torch.float64).numpy().ravel()
    with torch.no_grad():
        try:
            sol = solve_ivp(rhs, (1.0, t_min), y0, method=method, rtol=rtol, atol=atol)
        except ValueError as e:
            if "method" in str(e):
                raise ValueError(f"method must be a solve_ivp method name such as 'RK45', got {method!r}") from None
            raise
        if not sol.success:
            raise RuntimeError(f"probability-flow ODE solver failed: {sol.message}")
        to_x = lambda y: torch.from_numpy(np.ascontiguousarray(y)).reshape(shape).to(dtype=dtype, device=device)
        x = to_x(sol.y[:, -1])
        if denoise:
            s_min = float(sde.sigma(t_min))
            x = x + s_min**2 * chain.score(x, s_min)
    out = chain.result(x)
    if record_every:
        out.trajectory = torch.stack([to_x(sol.y[:, j]) for j in range(0, sol.y.shape[1], record_every)])
    return out


# -- training-free sampling ------------------------------------------------------------------------
def _level_view(est, level: int, L: int):
    """A shallow copy of a fitted batched estimator (batch shape (L,)) whose fitted tensors are indexed at
    ``level``, so ``predict`` costs one level instead of L. Every tensor attribute with leading size L is
    indexed; the caller checks the view against the full prediction."""
    view = copy.copy(est)
    for k, v in vars(est).items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == L:
            setattr(view, k, v[level])
    return view


class EstimatorScore:
    """A training-free score s(x, sigma_l): one steinops estimator fitted at construction, batched over the
    levels, on noisy copies of the data x_l^m = data^{(l, m)} + sigma_l z_l^m, shape (L, M, d), and used
    out of sample (``predict``) at the level whose sigma matches (relative tolerance 1e-6).

    Args:
        estimator: an unfitted ``ScoreEstimator`` (e.g. ``steinops.score_estimator("stein", eta=0.1)``) or
            a name in ``steinops.ESTIMATORS`` (default options).
        data: (N, d) clean samples.
        sigmas: (L,) decreasing noise levels (or a NoiseSchedule).
        max_samples: M = min(N, max_samples) rows per level (a fresh random subset per level when M < N).
        generator: for the subsets and the noise.
    After construction: ``estimator`` (fitted, batch shape (L,)), ``sigmas`` (L,), ``noisy`` (L, M, d).
    """

    def __init__(self, estimator, data: torch.Tensor, sigmas, *, max_samples: int | None = None,
                 generator: torch.Generator | None = None):
        from ..estimators.base import ScoreEstimator, score_estimator

        if isinstance(estimator, str):
            estimator = score_estimator(estimator)
        if not isinstance(estimator, ScoreEstimator):
            raise ValueError(f"estimator must be a ScoreEstimator or an estimator name, got {type(estimator).__name__}")
        if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.dim() != 2 or data.shape[0] < 2:
            raise ValueError(f"data must be a floating tensor of shape (N >= 2, d), got "
                             f"{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}")
        if not bool(torch.isfinite(data).all()):
            raise ValueError("data contains NaN or infinite values")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.sigmas = _check_sigmas(sigmas)
        N, L = data.shape[0], self.sigmas.numel()
        M = N if max_samples is None else min(N, _integer("max_samples", max_samples, 2))
        dev = data.device
        if M < N:
            idx = torch.stack([torch.randperm(N, generator=generator, device=dev)[:M] for _ in range(L)])
            clean = data[idx]  # (L, M, d)
        else:
            clean = data.expand(L, N, data.shape[1])
        z = torch.randn(clean.shape, generator=generator, dtype=data.dtype, device=dev)
        self.noisy = clean + self.sigmas.to(data)[:, None, None] * z
        with torch.no_grad():
            self.estimator = estimator.fit(self.noisy)
        self._views = [_level_view(self.estimator, l, L) for l in range(L)]
        # the per-level view must reproduce the batched prediction (else predict all levels, take the row)
        probe = self.noisy[:, :2]
        with torch.no_grad():
            full = self.estimator.predict(probe)
            ok = all(torch.allclose(v.predict(probe[l]), full[l], rtol=1e-6, atol=1e-8 * float(full[l].abs().max() + 1))
                     for l, v in enumerate(self._views))
        if not ok:
            self._views = None

    def level(self, sigma: float) -> int:
        """Index of the fitted level equal to ``sigma`` (relative tolerance 1e-6); ValueError otherwise."""
        rel = (self.sigmas - sigma).abs() / self.sigmas
        l = int(torch.argmin(rel))
        if float(rel[l]) > 1e-6:
            raise ValueError(f"sigma={sigma:.6g} is not one of the fitted levels {self.sigmas.tolist()}")
        return l

    def predict_level(self, x: torch.Tensor, l: int) -> torch.Tensor:
        """Out-of-sample estimate at x (N, d) with the fit of level l -> (N, d) in x's dtype."""
        with torch.no_grad():
            if self._views is not None:
                out = self._views[l].predict(x)
            else:
                L = self.sigmas.numel()
                out = self.estimator.predict(x.expand(L, *x.shape))[l]
        return out.to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sig = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().reshape(-1)
        if sig.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sig.shape)}")
        values = torch.unique(sig).tolist()
        if len(values) == 1:
            return self.predict_level(x, self.level(values[0]))
        out = torch.empty_like(x)
        for s in values:
            rows = (sig == s).to(x.device)
            out[rows] = self.predict_level(x[rows], self.level(s))
        return out


def training_free_sampler(estimator, data: torch.Tensor, sigmas, x0: torch.Tensor, *, eps: float, n_steps_each: int,
                          denoise: bool = True, max_samples: int | None = None, generator: torch.Generator | None = None,
                          record_every: int = 0, progress: bool = False) -> SampleResult:
    """Annealed Langevin (see ``annealed_langevin``) with the score of an ``EstimatorScore`` fitted on
    ``data`` (N, d) at ``sigmas`` (one batched fit over the L levels); no network. ``generator`` draws the
    fit's subsets and noise, then the Langevin noise."""
    x0 = _check_x0(x0)
    _positive("eps", eps)
    _integer("n_steps_each", n_steps_each, 1)
    score = EstimatorScore(estimator, data, sigmas, max_samples=max_samples, generator=generator)
    return annealed_langevin(score, x0, score.sigmas, eps=eps, n_steps_each=n_steps_each, denoise=denoise,
                             generator=generator, record_every=record_every, progress=progress)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "langevin": langevin,
    "annealed": annealed_langevin,
    "pc": pc_sampler,
    "ode": probability_flow_ode,
    "training_free": training_free_sampler,
}

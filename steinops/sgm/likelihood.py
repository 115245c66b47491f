"""Likelihood of a VE-SDE score model in bits per dimension, through the probability-flow ODE
(Song et al. 2021, "Score-Based Generative Modeling through SDEs", section 4.3 and appendix D.2).

The probability-flow ODE dx/dt = f(x, t) = -1/2 g(t)^2 s(x, sigma(t)) carries the marginals p_t, and along
a solution x(t) the instantaneous change of variables gives d log p_t(x(t)) / dt = -div f(x(t), t). Hence

    log p_{t_min}(x) = log p_1(x(1)) + int_{t_min}^1 div f(x(t), t) dt,     x(t_min) = x,

with p_1 replaced by the prior N(0, sigma_max^2 I) and div f by Hutchinson's estimator eps^T (df/dx) eps.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from .noise import VESDE, NoiseSchedule

__all__ = ["bits_per_dim"]

PROBES = ("rademacher", "gaussian")


def _positive(name: str, value) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def _check_inputs(score_fn, x, sde, bin_width, generator, n_probes, probe, rtol, atol, t_min, method):
    if not callable(score_fn):
        raise ValueError(f"score_fn must be callable as score_fn(x, sigma), got {type(score_fn).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point torch.Tensor of shape (N, ...), got "
                         f"{type(x).__name__}" + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    if x.dim() < 2 or x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"x must have shape (N, ...) with N >= 1 and at least one value per item, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values")
    if isinstance(sde, NoiseSchedule):
        sde = sde.sde()
    if not isinstance(sde, VESDE):
        raise ValueError(f"sde must be a VESDE (or a NoiseSchedule), got {type(sde).__name__}")
    bin_width = _positive("bin_width", bin_width)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, numbers.Integral) or n_probes < 1:
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    if not isinstance(probe, str) or probe.lower() not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    rtol, atol = _positive("rtol", rtol), _positive("atol", atol)
    t_min = _positive("t_min", t_min)
    if t_min >= 1:
        raise ValueError(f"t_min must be in (0, 1), got {t_min}")
    if not isinstance(method, str):
        raise ValueError(f"method must be a solve_ivp method name such as 'RK45', got {method!r}")
    return sde, bin_width, int(n_probes), probe.lower(), rtol, atol, t_min


def _draw_probes(n_probes: int, x: Tensor, kind: str, generator) -> Tensor:
    """(n_probes, *x.shape) fixed probes with E[eps eps^T] = I: +-1 entries or standard normal."""
    gdev = generator.device if generator is not None else x.device
    shape = (n_probes, *x.shape)
    if kind == "rademacher":
        eps = torch.randint(0, 2, shape, generator=generator, device=gdev).to(x.dtype) * 2 - 1
    else:
        eps = torch.randn(shape, generator=generator, device=gdev, dtype=x.dtype)
    return eps.to(x.device)


def _score_caller(score_fn):
    """score_fn(x, sigma) with grad enabled; a Module gets x and sigma in its parameters' dtype/device."""
    p = next(iter(score_fn.parameters()), None) if isinstance(score_fn, torch.nn.Module) else None

    def call(x: Tensor, sigma: float) -> Tensor:
        dtype, device = (p.dtype, p.device) if p is not None else (x.dtype, x.device)
        sig = torch.full((x.shape[0],), sigma, dtype=dtype, device=device)
        s = score_fn(x.to(dtype=dtype, device=device), sig)
        if not isinstance(s, Tensor) or s.shape != x.shape:
            raise ValueError(f"score_fn must return a tensor of shape {tuple(x.shape)}, got "
                             f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
        if not s.requires_grad:
            raise ValueError("score_fn output does not depend on x through autograd: the divergence needs a "
                             "differentiable score (pass the network itself, not network_score_fn(model), "
                             "which runs under no_grad)")
        return s.to(device=x.device)

    return call


def bits_per_dim(score_fn, x: Tensor, sde: VESDE, *, bin_width: float, generator: torch.Generator | None = None,
                 n_probes: int = 1, probe: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                 t_min: float = 1e-5, method: str = "RK45", dequantize: bool = True,
                 progress: bool = False) -> dict:
    """Negative log-likelihood in bits per dimension of discrete data x under a VE-SDE score model.

    Steps:
      1. Uniform dequantisation (``dequantize=True``): x~ = x + bin_width u, u ~ U[0, 1)^D drawn with
         ``generator`` (the data values are the LEFT edges of their bins). With ``dequantize=False``, x~ = x.
      2. The augmented ODE for the state [x, delta] from t = t_min to t = 1 (scipy ``solve_ivp``, float64
         state, all N items batched into one state vector):
             dx/dt     = f(x, t) = -1/2 g(t)^2 s(x, sigma(t))
             ddelta/dt = div f(x, t) ~= -1/2 g(t)^2 mean_k eps_k^T (ds/dx) eps_k
         with ``n_probes`` fixed probes eps_k (Rademacher +-1 or standard Gaussian) drawn once per call
         (after u) with ``generator``; eps^T (ds/dx) is one vector-Jacobian product (torch.autograd) in the
         score's dtype. Each item's divergence only involves its own rows, so the score must act per item
         (a network in eval mode: no BatchNorm batch statistics).
      3. log p(x~) = log N(x(1); 0, sigma(1)^2 I) + delta(1): the prior is N(0, sigma_max^2 I)
         (sigma(1) = sigma_max). The true marginal at t = 1 is the data convolved with noise of variance
         sigma_max^2 - sigma_min^2 (plus the data spread); the prior ignores both, as is standard.
      4. bpd = -(log p(x~) + D log bin_width) / (D ln 2) per item: the log(bin_width) term turns the density
         of the dequantised data into the probability mass of one bin.

    ``t_min > 0`` replaces t = 0: the model's density is that of the noise level sigma(t_min) ~= sigma_min,
    where the score is defined. With dequantisation the result, averaged over u, is an upper bound on the
    model's negative log-likelihood of the discrete data in bits/dim (Jensen: the variational dequantisation
    bound); a single draw of u is a noisy estimate of that bound, not itself a bound. The trajectory x(t) does
    not depend on the probes and delta is linear in the divergence estimates, so log p (and bpd) is unbiased
    over the probes (up to the solver's step choice); for a score whose Jacobian is a multiple of the
    identity (or diagonal) Rademacher probes give the exact trace.

    Args:
        score_fn: s(x, sigma) with x of x's shape and sigma (N,), differentiable in x (an ``nn.Module``
            such as the score network itself is called in its parameters' dtype/device; its train/eval
            mode is left as it is).
        x: (N, ...) floating data, e.g. (N, C, H, W) images scaled to [0, 1] or [-1, 1].
        sde: the ``VESDE`` (or a ``NoiseSchedule``: its ``sde()``).
        bin_width: width of one quantisation bin in data units, e.g. 1 / (K - 1) for K levels on [0, 1]
            (use 1 with ``dequantize=False`` to get -log p(x) / (D ln 2) of continuous data).
        generator: for u and the probes.   n_probes: probes per item (>= 1).   probe: "rademacher" | "gaussian".
        rtol, atol, method: ``solve_ivp`` options.   t_min: start time in (0, 1).
        progress: a tqdm bar in t.

    Returns:
        {"bpd_mean": float, "bpd_std": float (over items, 0 for N = 1), "bpd": (N,) float64 tensor,
         "nfe": number of score evaluations (each a batched call over all N items)}.
    """
    sde, bin_width, n_probes, probe, rtol, atol, t_min = _check_inputs(
        score_fn, x, sde, bin_width, generator, n_probes, probe, rtol, atol, t_min, method)
    x = x.detach()
    shape, dtype, device = x.shape, x.dtype, x.device
    n, dim = shape[0], x[0].numel()
    if dequantize:
        gdev = generator.device if generator is not None else device
        x = x + bin_width * torch.rand(shape, generator=generator, device=gdev, dtype=dtype).to(device)
    eps = _draw_probes(n_probes, x, probe, generator)
    score = _score_caller(score_fn)
    nfe = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=1000, desc="bits/dim ODE", leave=False)

    def rhs(t, y):
        nonlocal nfe
        xt = torch.from_numpy(y[:n * dim]).reshape(shape).to(dtype=dtype, device=device).requires_grad_(True)
        with torch.enable_grad():
            s = score(xt, float(sde.sigma(t)))
            nfe += 1
            div_s = torch.zeros(n, dtype=torch.float64, device=device)
            for k in range(n_probes):
                (vjp,) = torch.autograd.grad(s, xt, grad_outputs=eps[k].to(s.dtype), retain_graph=k < n_probes - 1)
                div_s += (vjp * eps[k]).reshape(n, -1).sum(1).double()
        g2 = float(sde.g2(t))
        dx = (-0.5 * g2) * s.detach().to("cpu", torch.float64).numpy().ravel()
        ddelta = (-0.5 * g2) * (div_s / n_probes).cpu().numpy()
        if bar is not None:  # solver stages are not monotone in t: show the furthest point
            done = int(1000 * (t - t_min) / (1 - t_min))
            if done > bar.n:
                bar.update(done - bar.n)
        return np.concatenate([dx, ddelta])

    y0 = np.concatenate([x.to("cpu", torch.float64).numpy().ravel(), np.zeros(n)])
    try:
        sol = solve_ivp(rhs, (t_min, 1.0), y0, method=method, rtol=rtol, atol=atol)
    except ValueError as e:
        if "method" in str(e).lower():
            raise ValueError(f"method must be a solve_ivp method name such as 'RK45', got {method!r}") from None
        raise
    finally:
        if bar is not None:
            bar.close()
    if not sol.success:
        raise RuntimeError(f"bits_per_dim: ODE solver failed: {sol.message}")
    y1 = sol.y[:, -1]
    x1 = y1[:n * dim].reshape(n, dim)
    delta = y1[n * dim:]
    s1 = sde.sigma_max
    prior_logp = -0.5 * dim * math.log(2 * math.pi * s1**2) - 0.5 * (x1**2).sum(1) / s1**2
    logp = prior_logp + delta
    bpd = torch.from_numpy(-(logp + dim * math.log(bin_width)) / (dim * math.log(2)))
    return {
        "bpd_mean": float(bpd.mean()),
        "bpd_std": float(bpd.std()) if n > 1 else 0.0,
        "bpd": bpd,
        "nfe": nfe,
    }

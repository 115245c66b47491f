"""The Gaussian-window Stein ratio: the exact score of a Gaussian-smoothed density, from samples.

Stein's identity E_q[grad_x f(x) + f(x) grad log q(x)] = 0 with the Gaussian window
f(x) = k_h(x, y) = exp(-|x - y|^2 / (2 h^2)) gives, for any point y,

    E_q[k_h(x, y) grad log q(x)] = -E_q[grad_x k_h(x, y)] = E_q[k_h(x, y) (y - x)] / h^2,

and because k_h is (up to a constant) the N(y, h^2 I) density, E_q[k_h(x, y)] is proportional to
(q * N(0, h^2 I))(y) and the left-hand side to its gradient. So, EXACTLY,

    grad log (q * N(0, h^2 I))(y) = E_q[k_h(x, y) (x - y)] / (h^2 E_q[k_h(x, y)]),

and its sample version (a softmax-weighted mean shift; the score of a Gaussian kernel density estimate) is

    g(y) = sum_j w_j(y) (x_j - y) / h^2,     w_j(y) = softmax_j(-|y - x_j|^2 / (2 h^2)).

Unlike the regression estimators (SGE, KEF, ...), whose kernel bias is shrinkage towards zero where samples
are sparse, this estimator's only bias is the ratio bias of order 1 / n_eff (n_eff: the effective number of
samples under the window). Its smoothing is not a bias at all when q is a noisy density of the variance-
exploding family: q_sigma * N(0, h^2 I) = q_sigma' with sigma' = sqrt(sigma^2 + h^2). Samples of one noise
level therefore give nearly unbiased score targets for a coarser level (``SteinObjective``'s window targets).
It needs h above the samples' spacing (n_eff >> 1), so it complements the regression estimators, which
resolve the fine levels.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import value_checks_enabled
from ..ops.backends import compiled_extension

_CHUNK_ELEMENTS = 1 << 24  # query chunks keep the (..., n, M) weights under this many elements


def _check(samples, queries, bandwidth, exclude) -> tuple[Tensor, Tensor | None]:
    for name, t in (("samples", samples), ("queries", queries)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 2:
            raise TypeError(f"{name} must be a floating tensor of shape (..., n, d), got "
                            f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if queries.shape[:-2] != samples.shape[:-2] or queries.shape[-1] != samples.shape[-1]:
        raise ValueError(f"queries must have shape (..., N, {samples.shape[-1]}) with the samples' leading dims "
                         f"{tuple(samples.shape[:-2])}, got {tuple(queries.shape)}")
    if queries.dtype != samples.dtype or queries.device != samples.device:
        raise TypeError(f"queries must have the samples' dtype and device, got {queries.dtype} on {queries.device} "
                        f"for samples {samples.dtype} on {samples.device}")
    M = samples.shape[-2]
    if M < 1 or (exclude is not None and M < 2):
        raise ValueError(f"samples: need at least {1 if exclude is None else 2} samples per set, got {M}")
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, Tensor)):
        raise TypeError(f"bandwidth must be a number or a tensor of shape {tuple(samples.shape[:-2])}, got "
                        f"{type(bandwidth).__name__}")
    h = torch.as_tensor(bandwidth, dtype=samples.dtype, device=samples.device)
    if h.dim() and h.shape != samples.shape[:-2]:
        raise ValueError(f"bandwidth must be a scalar or have shape {tuple(samples.shape[:-2])}, got {tuple(h.shape)}")
    if value_checks_enabled() and not bool(((h > 0) & torch.isfinite(h)).all()):
        raise ValueError(f"bandwidth must be positive and finite, got {bandwidth!r}")
    if exclude is not None:
        if not isinstance(exclude, Tensor) or exclude.dtype != torch.long or exclude.shape != queries.shape[-2:-1]:
            raise TypeError(f"exclude must be None or a long tensor of shape ({queries.shape[-2]},), got "
                            f"{tuple(exclude.shape) if isinstance(exclude, Tensor) else type(exclude).__name__}")
        # a value check (skipped when suspended); the compiled op checks the range itself in any case
        if value_checks_enabled() and exclude.numel() and not (0 <= int(exclude.min()) and int(exclude.max()) < M):
            raise ValueError(f"exclude must index the {M} samples, got values in [{int(exclude.min())}, "
                             f"{int(exclude.max())}]")
        exclude = exclude.to(samples.device)
    return h, exclude


def _compiled(samples: Tensor, queries: Tensor, h: Tensor) -> bool:
    """Whether the compiled CPU op applies: CPU float32/64 sets of low dimension (it forms differences
    directly), nothing needing a gradient, the extension built."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (samples, queries, h))
    return (samples.device.type == "cpu" and samples.dtype in (torch.float32, torch.float64)
            and samples.shape[-1] <= 16 and not needs_grad and not torch.compiler.is_compiling()
            and compiled_extension() is not None)


def window_score(samples: Tensor, queries: Tensor, bandwidth, *, exclude: Tensor | None = None,
                 return_neff: bool = False):
    """grad log (q * N(0, h^2 I)) at ``queries``, estimated from ``samples`` of q (module docstring).

    g(y_n) = sum_j w_nj (x_j - y_n) / h^2,  w_n = softmax_j(-|y_n - x_j|^2 / (2 h^2)) over j != exclude[n].

    Args:
        samples: (..., M, d) samples x_j of q.
        queries: (..., N, d) points y_n, same leading dims, dtype and device.
        bandwidth: h, a positive number or a (...,) tensor (one per sample set).
        exclude: None, or (N,) long: query n ignores sample exclude[n] (leave-one-out, for queries made from
            the samples themselves, e.g. y_n = x_n + h z_n: then y_n is independent of the other samples and
            the estimate is a ratio of two unbiased sums).
        return_neff: also return n_eff (..., N) = 1 / sum_j w_nj^2 (Kish's effective number of samples under
            each query's window; the ratio bias is of order 1 / n_eff).
    Returns:
        (..., N, d) estimates (and n_eff). O(N M d) time. On CPU (d <= 16, no gradient needed) one compiled
        pass per query (``steinops_C::window_score``: float64 sums, no N x M array); otherwise dense torch per
        query chunk, weights of at most 2^24 elements at a time, never an N x M x d tensor, differentiable by
        autograd in samples, queries and bandwidth.
    """
    h, exclude = _check(samples, queries, bandwidth, exclude)
    lead = samples.shape[:-2]
    if _compiled(samples, queries, h):  # one pass per query in C++ (csrc/cpu/window_score.cpp), same values
        d = samples.shape[-1]
        g, neff = torch.ops.steinops_C.window_score(
            samples.reshape(-1, *samples.shape[-2:]).contiguous(),
            queries.reshape(-1, *queries.shape[-2:]).contiguous(),
            h.expand(lead).reshape(-1).contiguous(),
            torch.empty(0, dtype=torch.long) if exclude is None else exclude.contiguous())
        g, neff = g.reshape(*lead, -1, d), neff.reshape(*lead, -1)
        return (g, neff) if return_neff else g
    h2 = h.square().reshape(*h.shape, *([1] * (len(lead) - h.dim())), 1, 1) if h.dim() else h.square()
    centre = samples.mean(-2, keepdim=True)  # distances of centred points lose less to cancellation
    xs, ys = samples - centre, queries - centre
    M, N = xs.shape[-2], ys.shape[-2]
    step = max(1, _CHUNK_ELEMENTS // max(1, M * math.prod(lead)))
    out, neffs = [], []
    for s in range(0, N, step):
        y = ys[..., s:s + step, :]
        d2 = torch.cdist(y, xs, compute_mode="donot_use_mm_for_euclid_dist").square()
        logits = -d2 / (2 * h2)
        if exclude is not None:
            mask = torch.zeros(y.shape[-2], M, dtype=torch.bool, device=y.device)
            mask[torch.arange(y.shape[-2], device=y.device), exclude[s:s + step]] = True
            logits = logits.masked_fill(mask, float("-inf"))
        w = torch.softmax(logits, -1)
        out.append((w @ xs - y) / h2)
        if return_neff:
            neffs.append(1.0 / w.square().sum(-1))
    g = torch.cat(out, -2)
    return (g, torch.cat(neffs, -1)) if return_neff else g

"""Low-rank-plus-ridge preconditioners for the kernel systems ``(K(x, x) + eta I) X = B``.

A rank-r factor ``L (..., M, r)`` with ``L L^T ~ K`` gives the preconditioner ``P = L L^T + eta I``,
applied by the Woodbury identity through an r x r Cholesky factor (never M x M)::

    P^{-1} V = (V - L C^{-1} L^T V) / eta,      C = eta I_r + L^T L                      (V (..., M, E))

P is symmetric positive definite for ANY L (eta > 0), so preconditioned CG converges whatever the
quality of the factor; the quality only sets the iteration count. With the eigenvalues of K above
about eta captured by L, ``P^{-1} (K + eta I)`` has its spectrum in ``[1, 1 + |K - L L^T| / eta]``
and CG needs a few iterations instead of ~sqrt(lambda_max(K) / eta).

Factors (memory O(M r), one kernel column or block ``K(x, x_S)`` at a time by ``steinops.ops.gram``):

* ``"pivchol"``: partial pivoted Cholesky (greedy: the next pivot is the largest entry of the residual
  diagonal ``diag(K - L L^T)``, which starts at ``k(0) = 1`` for RBF and IMQ). Step j computes the
  column ``K(x, x_p)`` and ``l_j = (K(x, x_p) - L l_p) / sqrt(res_p)``; ``res -= l_j^2``. r steps cost
  O(M r (d + r)); the trace of the residual diagonal bounds the approximation error ``|K - L L^T|``.
* ``"nystrom"``: r landmarks drawn uniformly without replacement, ``L = K(x, x_S) R^{-1}`` with
  ``R^T R = K(x_S, x_S)`` (jittered Cholesky): one block kernel product, much cheaper to build than the
  pivoted Cholesky's r sequential steps. Greedy pivots adapt to the data (isolated points and small
  clusters get their own columns) where uniform landmarks can miss them; on spread-out high-dimensional data
  (noisy MNIST) the two converged alike at equal rank (``benchmarks/large_m.py``).

Both satisfy ``0 <= K - L L^T`` (in exact arithmetic), which gives the spectrum bound above.

The factor and the r x r system are computed in float64 (by default, ``dtype=``): in float32 the
Woodbury subtraction loses ``eps * lambda_max(K) / eta`` (~0.03 at M = 10^5, eta = 0.3), which slows
CG at small eta; the float64 work is O(M r E) per application, small next to the O(M^2 E) kernel
product. Everything is computed without gradient (the preconditioner changes the iterates, not
the solution).
"""
from __future__ import annotations

import numbers
import time

import torch

from . import _checks
from .kernels import get_kernel
from .ops.gram import gram
from .solvers import cholesky_jitter

PRECONDITIONERS = ("pivchol", "nystrom")
# benchmarks/large_m.py on CPU (benchmarks/README.md): rank 200 was the fastest pivoted Cholesky at M = 20000, d = 3
# (1 iteration instead of 23) and within the load noise of rank 400 at M = 8192, d = 784 (10 / 7 iterations instead
# of 82); larger ranks pay off where one product is expensive next to the setup (large M on a GPU)
DEFAULT_RANK = 200


def check_rank(rank, what: str = "rank") -> int:
    """``rank`` as a positive int (TypeError / ValueError naming it as ``what`` otherwise)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{what} must be a positive int, got {type(rank).__name__} {rank!r}")
    if int(rank) < 1:
        raise ValueError(f"{what} must be a positive int, got {rank}")
    return int(rank)


def check_preconditioner(name, *, allow_auto: bool = False):
    """None or one of ``PRECONDITIONERS`` (lower-cased); also "auto" when ``allow_auto``."""
    if name is None:
        return None
    choices = PRECONDITIONERS + (("auto",) if allow_auto else ())
    if not isinstance(name, str) or name.lower() not in choices:
        raise ValueError(f"preconditioner must be None or one of {choices}, got {name!r}")
    return name.lower()


class LowRankPreconditioner:
    """``V -> (L L^T + eta I)^{-1} V`` for a factor L (..., M, r) and eta (...), by Woodbury.

    Attributes: ``factor`` L (..., M, r), ``eta`` (...), ``rank`` r, ``residual_trace`` (...) the trace
    of ``K - L L^T`` where the builder knows it (pivoted Cholesky; None otherwise), ``setup_seconds``
    (filled in by ``kernel_preconditioner``).

    ``local(start, stop, allreduce)`` gives a copy applying to rows [start, stop) of L only (row-sharded
    solves, see ``steinops.estimators.sharded``): V then holds those rows, and ``allreduce`` (applied to
    ``L^T V`` (..., r, E)) sums the partial products over the processes.
    """

    def __init__(self, factor: torch.Tensor, eta: torch.Tensor, *, residual_trace: torch.Tensor | None = None):
        self.factor = factor
        self.eta = eta.to(factor.dtype).expand(factor.shape[:-2])
        self.rank = factor.shape[-1]
        self.residual_trace = residual_trace
        self.setup_seconds = None
        eye = torch.eye(self.rank, dtype=factor.dtype, device=factor.device)
        C = self.eta[..., None, None] * eye + factor.transpose(-1, -2) @ factor
        self._chol = cholesky_jitter(C)
        self.allreduce = None

    def local(self, start: int, stop: int, allreduce=None) -> "LowRankPreconditioner":
        """A copy applying to rows [start, stop) only, ``L^T V`` summed by ``allreduce``."""
        other = object.__new__(LowRankPreconditioner)
        other.__dict__.update(self.__dict__)
        other.factor = self.factor[..., start:stop, :]
        other.allreduce = allreduce
        return other

    @torch.no_grad()
    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        L = self.factor
        Vf = V.to(L.dtype)
        LtV = L.transpose(-1, -2) @ Vf  # (..., r, E)
        if self.allreduce is not None:
            LtV = self.allreduce(LtV)
        W = torch.cholesky_solve(LtV, self._chol)
        out = (Vf - L @ W) / self.eta[..., None, None]
        return out.to(V.dtype)


@torch.no_grad()
def pivoted_cholesky(x: torch.Tensor, bandwidth, *, rank: int, kernel="rbf", backend: str | None = None,
                     dtype: torch.dtype | None = torch.float64, tol: float | None = None):
    """Partial pivoted Cholesky of the kernel Gram ``K(x, x)``: ``(L, residual_trace)``.

    x (..., M, d); bandwidth a number or a tensor (...). Returns L (..., M, r') with ``r' <= rank``
    (``min(rank, M)``, fewer when every residual diagonal of the batch is below ``tol`` first) and the
    trace of ``K - L L^T`` (...). Pivots are chosen per batch element. The factor is in ``dtype``
    (float64 by default; None: x's dtype). ``tol`` defaults to ``100 * eps`` of x's dtype: a pivot whose
    residual diagonal is below it adds a zero column (no division by a rounding error).
    """
    rank = check_rank(rank)
    _checks.points("x", x, min_rows=1)
    prof = get_kernel(kernel)
    *batch, M, d = x.shape
    r = min(rank, M)
    fdt = x.dtype if dtype is None else dtype
    tol = 100 * torch.finfo(x.dtype).eps if tol is None else tol
    h = _checks.bandwidth_tensor(bandwidth, tuple(batch), x)
    xb = x.detach().reshape(-1, M, d)
    hb = h.reshape(-1)
    nb = xb.shape[0]
    # residual diagonal diag(K - L L^T), at first k(0) = 1 (RBF and IMQ)
    res = torch.ones(nb, M, dtype=fdt, device=x.device)
    Lt = torch.zeros(nb, r, M, dtype=fdt, device=x.device)  # rows of L^T: row j written at step j
    with _checks.value_checks_suspended():  # x was checked above; the checks would cost more than the steps
        used = _pivot_steps(xb, hb, res, Lt, prof, backend, tol)
    L = Lt[:, :used].transpose(-1, -2).reshape(*batch, M, used)
    return L, res.sum(-1).reshape(batch)


def _pivot_steps(xb, hb, res, Lt, prof, backend, tol) -> int:
    """The greedy steps of ``pivoted_cholesky`` on flattened sets xb (nb, M, d): fills Lt (nb, r, M) and
    updates the residual diagonal res (nb, M) in place; returns the number of columns used."""
    nb, r, fdt = xb.shape[0], Lt.shape[1], Lt.dtype
    ar = torch.arange(nb, device=xb.device)
    for j in range(r):
        resmax, piv = res.max(-1)  # (nb,)
        if j % 16 == 0 and bool((resmax <= tol).all()):  # every set is exhausted: stop (one sync per 16 steps)
            return j
        xp = xb[ar, piv].unsqueeze(-2)  # (nb, 1, d)
        col = gram(xb, xp, kernel=prof, bandwidth=hb, backend=backend)[..., 0].to(fdt)  # K(x, x_p) (nb, M)
        if j:
            lp = Lt[ar, :j, piv]  # (nb, j): row p of L so far
            col = col - (lp.unsqueeze(-2) @ Lt[:, :j]).squeeze(-2)
        ok = resmax > tol
        col = torch.where(ok[:, None], col / resmax.clamp_min(tol).sqrt()[:, None], torch.zeros_like(col))
        Lt[:, j] = col
        res.sub_(col * col).clamp_(min=0)
        res[ar, piv] = 0.0  # exactly: never picked again
    return r


@torch.no_grad()
def nystrom_factor(x: torch.Tensor, bandwidth, *, rank: int, kernel="rbf", backend: str | None = None,
                   dtype: torch.dtype | None = torch.float64, generator: torch.Generator | None = None):
    """Nystrom factor ``L = K(x, x_S) R^{-1}`` (R upper, ``R^T R = K(x_S, x_S)``) with ``min(rank, M)``
    landmarks S drawn uniformly without replacement (one draw shared by the batch); L (..., M, r)."""
    rank = check_rank(rank)
    _checks.points("x", x, min_rows=1)
    *batch, M, d = x.shape
    r = min(rank, M)
    fdt = x.dtype if dtype is None else dtype
    h = _checks.bandwidth_tensor(bandwidth, tuple(batch), x)
    S = torch.randperm(M, generator=generator)[:r].to(x.device)
    xd = x.detach()
    KxS = gram(xd, xd[..., S, :], kernel=kernel, bandwidth=h, backend=backend).to(fdt)  # (..., M, r)
    KSS = KxS[..., S, :]
    KSS = (KSS + KSS.transpose(-1, -2)) / 2
    # jitter relative to k(0) = 1: landmarks close together make K_SS singular
    Rl = cholesky_jitter(KSS + 1e3 * torch.finfo(x.dtype).eps * torch.eye(r, dtype=fdt, device=x.device))
    L = torch.linalg.solve_triangular(Rl, KxS.transpose(-1, -2), upper=False).transpose(-1, -2)
    return L


def kernel_preconditioner(name: str, x: torch.Tensor, bandwidth, eta, *, rank: int = DEFAULT_RANK, kernel="rbf",
                          backend: str | None = None, dtype: torch.dtype | None = torch.float64,
                          generator: torch.Generator | None = None) -> LowRankPreconditioner:
    """Preconditioner ``(L L^T + eta I)^{-1}`` for ``K(x, x) + eta I``; ``name`` "pivchol" or "nystrom".

    x (..., M, d), bandwidth and eta numbers or tensors (...). ``generator`` draws the Nystrom landmarks
    (default: a fresh generator seeded 0, so that every process building it from the same x agrees).
    Returns a callable ``V (..., M, E) -> (..., M, E)``; ``setup_seconds`` holds the build time (wall).
    """
    name = check_preconditioner(name)
    if name is None:
        raise ValueError("preconditioner must be one of " + str(PRECONDITIONERS) + ", got None")
    rank = check_rank(rank)
    _checks.points("x", x, min_rows=1)
    batch = x.shape[:-2]
    eta_t = _checks.per_batch_positive("eta", eta.detach() if isinstance(eta, torch.Tensor) else eta, batch, x)
    h = bandwidth.detach() if isinstance(bandwidth, torch.Tensor) else bandwidth
    t0 = time.perf_counter()
    if name == "pivchol":
        L, trace = pivoted_cholesky(x, h, rank=rank, kernel=kernel, backend=backend, dtype=dtype)
    else:
        gen = torch.Generator().manual_seed(0) if generator is None else generator
        L, trace = nystrom_factor(x, h, rank=rank, kernel=kernel, backend=backend, dtype=dtype, generator=gen), None
    pre = LowRankPreconditioner(L, eta_t, residual_trace=trace)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    pre.setup_seconds = time.perf_counter() - t0
    return pre

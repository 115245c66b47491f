"""The Stein gradient estimator (SGE; Li & Turner, ICLR 2018) of ``grad log q`` from samples of q.

In-sample, at the samples ``x (..., M, d)``::

    G = -(K + eta I)^{-1} S,   K_ij = k(x_i, x_j),   S_i = sum_j grad_{x_j} k(x_i, x_j)

Out-of-sample, at queries ``z (..., N, d)``: Li & Turner's predictive rule, i.e. the row of the
in-sample estimate one gets by appending z to the samples, in closed form and vectorised over all
queries (``K_q = K(z, x)``, ``A = K_q (K + eta I)^{-1}``, ``W = (1 + A) o K_s(z, x)`` with ``K_s`` the
Stein profile of the kernel, RBF itself or IMQ cubed)::

    g(z) = -[ K_q G - (W x - rowsum(W) z) / h^2 ] / [ k(0) + eta - rowsum(A o K_q) ]

Solvers: a Cholesky factorisation of the dense ``K + eta I`` (jitter escalation with a warning),
or, for large M, matrix-free conjugate gradient on the fused kernel product (never M x M).

Defaults (measured against exact scores; the table is in the docstring of ``stein_score``):
``bandwidth = 2 * median pairwise distance`` and ``eta = 0.3``.
"""
from __future__ import annotations

import torch

from .. import _checks
from ..kernels import stein_profile
from ..ops.gram import gram
from ..ops.stein_term import stein_term
from ..ops.backends import resolve as resolve_backend
from ..solvers import cholesky_solve_jitter, small_cpu_system
from ._kernel_system import kernel_solve
from .base import ScoreEstimator, dense_fits, register

DEFAULT_ETA = 0.3
ETA_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # searched with bandwidth="auto" when eta="auto"
SOLVERS = ("auto", "cholesky", "cg")


def _eta_tensor(eta, batch_shape, like):
    if isinstance(eta, str):
        if eta.lower() != "auto":
            raise ValueError(f"eta must be a positive number, a tensor, or 'auto'; got {eta!r}")
        eta = DEFAULT_ETA
    return _checks.per_batch_positive("eta", eta, batch_shape, like)


def _fused_small_fit(x, h, eta, kernel: str, backend) -> bool:
    """Whether the whole dense fit can run as one compiled op (``steinops_C::sge_small``: Gram, Stein term,
    Cholesky and solve per sample set in one thread): small CPU float sets, nothing needing a gradient, the
    compiled CPU backend (what "auto" resolves to on CPU)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, h, eta))
    return (small_cpu_system(x, x.shape[-2]) and not needs_grad and kernel in ("rbf", "imq")
            and h.dtype == eta.dtype == x.dtype and resolve_backend(backend, x.device) == "cpu")


@register("stein")
class SteinScoreEstimator(ScoreEstimator):
    """Stein gradient estimator with a fit-once / predict-many interface.

    Args:
        kernel: "rbf" or "imq".
        bandwidth: a positive number, a tensor of shape (...) (one per sample set), a rule name
            ("median": 2 x median distance, the default; "svgd": median / sqrt(2 log(M+1))), or "auto"
            (held-out score matching per sample set, see ``steinops.estimators.autotune``).
        eta: ridge regulariser > 0 (number or tensor of shape (...)), or "auto": 0.3, or tuned with the
            bandwidth when ``bandwidth="auto"``.
        solver: "cholesky" (dense, O(M^2) memory), "cg" (matrix-free conjugate gradient, O(M d)
            memory), or "auto" (Cholesky while the batch's Gram matrices hold at most 2^27 entries).
        cg_rtol, cg_max_iter: CG stopping rule (relative residual per column; 1e-5 in float32,
            1e-8 in float64 by default) and iteration cap (a warning is raised when it is hit).
        backend: backend of the fused ops (see ``steinops.ops.backends``).

    After ``fit(x)``: ``scores_`` (..., M, d) in-sample estimates, ``bandwidth_`` and ``eta_`` (...),
    ``solver_`` the solver used.
    """

    def __init__(self, kernel="rbf", *, bandwidth="median", eta="auto", solver="auto",
                 cg_rtol: float | None = None, cg_max_iter: int | None = None, backend: str | None = None):
        super().__init__(kernel, bandwidth=bandwidth, backend=backend)
        if not isinstance(solver, str) or solver.lower() not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if not isinstance(eta, torch.Tensor):
            _eta_tensor(eta, (), torch.zeros(()))  # checks numbers and "auto" now; tensors at fit
        self.eta, self.solver = eta, solver.lower()
        self.cg_rtol, self.cg_max_iter = cg_rtol, cg_max_iter

    knob = "eta"

    def knob_grid(self, M):
        return ETA_GRID

    def knob_default(self):
        return DEFAULT_ETA

    def _fit(self, xc, h):
        batch, M = xc.shape[:-2], xc.shape[-2]
        eta = self.knob_tensor(batch, xc)
        solver = self.solver
        if solver == "auto":
            solver = "cholesky" if dense_fits(xc) else "cg"
        self.solver_, self.eta_ = solver, eta
        if solver == "cholesky" and _fused_small_fit(xc, h, eta, self.kernel.name, self.backend):
            kid = 0 if self.kernel.name == "rbf" else 1
            L, G, info = torch.ops.steinops_C.sge_small(xc.reshape(-1, M, xc.shape[-1]).contiguous(),
                                                       h.reshape(-1).contiguous(), eta.reshape(-1).contiguous(), kid)
            if not bool((info != 0).any()):  # else: the general path below, with jitter escalation
                self._L = L.reshape(*batch, M, M)
                return G.reshape(xc.shape)
        if solver == "cholesky":
            K, S = gram(xc, kernel=self.kernel, bandwidth=h, stein_term=True, backend=self.backend)
            A = K + eta[..., None, None] * torch.eye(M, dtype=K.dtype, device=K.device)
            self._L, X = cholesky_solve_jitter(A, S)
            return -X
        S = stein_term(xc, kernel=self.kernel, bandwidth=h, backend=self.backend)
        return -kernel_solve(xc, S, h, eta, kernel=self.kernel, backend=self.backend,
                             rtol=self.cg_rtol, max_iter=self.cg_max_iter)

    def _solve(self, B):
        if self.solver_ == "cholesky":
            return torch.cholesky_solve(B, self._L)
        return kernel_solve(self._x, B, self.bandwidth_, self.eta_, kernel=self.kernel, backend=self.backend,
                            rtol=self.cg_rtol, max_iter=self.cg_max_iter)

    def _predict_chunk(self, z):
        x, G, h, eta = self._x, self._G, self.bandwidth_, self.eta_
        h2 = (h * h)[..., None, None]
        Kq = gram(z, x, kernel=self.kernel, bandwidth=h, backend=self.backend)  # (..., n, M)
        A = self._solve(Kq.transpose(-1, -2)).transpose(-1, -2)  # K_q (K + eta I)^{-1}
        Ks = Kq if stein_profile(self.kernel).name == self.kernel.name else Kq**3
        W = (1 + A) * Ks
        num = Kq @ G - (W @ x - W.sum(-1, keepdim=True) * z) / h2
        den = 1 + eta[..., None, None] - (A * Kq).sum(-1, keepdim=True)  # k(z, z) = 1 for RBF and IMQ
        return -num / den


def stein_score(x: torch.Tensor, query: torch.Tensor | None = None, *, kernel="rbf", bandwidth="median",
                eta="auto", solver="auto", backend: str | None = None) -> torch.Tensor:
    """Estimate ``grad log q`` from samples ``x (..., M, d)`` of an unknown q (Stein gradient estimator).

    Returns the in-sample estimate ``-(K + eta I)^{-1} <grad, K>`` (..., M, d) when ``query`` is None,
    else Li & Turner's out-of-sample estimate at ``query`` (..., N, d). Leading batch dims (e.g. one
    sample set per noise level) are solved together. Differentiable with respect to x (and query);
    under ``torch.no_grad`` nothing is stored for backward.

    Defaults, chosen by measurement against exact scores (``benchmarks/hyperparameters.py``, results
    in ``benchmarks/results/hyperparameters.json``): in-sample relative Fisher error
    ``E|G - grad log q_sigma|^2 / E|grad log q_sigma|^2`` on Gaussian mixtures convolved with
    N(0, sigma^2 I), float64, RBF and IMQ, d in {2, 10, 50}, sigma in {0.1, 1}, M in {128, 512, 2048}
    (36 cases), compared with the best (bandwidth, eta) on an 8 x 8 grid per case:

    ==========================================================  =================  =====
    rule                                                        geo-mean vs best   worst
    ==========================================================  =================  =====
    bandwidth = 2 x median distance, eta = 0.3 (the default)    1.26x              2.33x
    bandwidth = median distance, eta = 1                        1.66x              3.01x
    bandwidth = median / sqrt(2 log(M+1)), eta = 0.01 (common)  15.6x              697x
    ==========================================================  =================  =====

    The default's worst cases are few samples in high dimension (d = 50, M = 128), where a wider
    bandwidth with a smaller eta is better.

    Args:
        kernel: "rbf" or "imq". bandwidth: number, tensor (...), "median", "svgd" or "auto" (held-out
            score matching per sample set, tuning eta too when eta is "auto").
        eta: number > 0, tensor (...) or "auto". solver: "auto", "cholesky" or "cg".
        backend: backend of the fused ops ("auto", "cpu", "triton", "cuda", "reference").
    """
    est = SteinScoreEstimator(kernel, bandwidth=bandwidth, eta=eta, solver=solver, backend=backend).fit(x)
    return est.scores_ if query is None else est.predict(query)

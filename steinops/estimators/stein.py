"""The Stein gradient estimator (SGE; Li & Turner, ICLR 2018) of ``grad log q`` from samples of q.

In-sample, at the samples ``x (..., M, d)``::

    G = -(K + eta I)^{-1} S,   K_ij = k(x_i, x_j),   S_i = sum_j grad_{x_j} k(x_i, x_j)

Out-of-sample, at queries ``z (..., N, d)``: Li & Turner's predictive rule, i.e. the row of the
in-sample estimate one gets by appending z to the samples, in closed form and vectorised over all
queries (``K_q = K(z, x)``, ``A = K_q (K + eta I)^{-1}``, ``W = (1 + A) o K_s(z, x)`` with ``K_s`` the
Stein profile of the kernel, RBF itself or IMQ cubed)::

    g(z) = -[ K_q G - (W x - rowsum(W) z) / h^2 ] / [ k(0) + eta - rowsum(A o K_q) ]

Solvers: a Cholesky factorisation of the dense ``K + eta I`` (jitter escalation with a warning),
or, for large M, matrix-free conjugate gradient on the fused kernel product (never M x M),
preconditioned by a low-rank-plus-ridge approximation of ``K + eta I`` (``steinops.preconditioners``).

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
from ..preconditioners import DEFAULT_RANK, check_preconditioner, check_rank, kernel_preconditioner
from ..solvers import small_cpu_system, spd_solve, spd_solve_with_factor
from ._kernel_system import kernel_solve
from .stein_loo import sge_loo_terms
from .base import ScoreEstimator, dense_fits, register

DEFAULT_ETA = 0.3
ETA_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # searched with bandwidth="auto" when eta="auto"
# past the grid's small end, tried in turn while auto's choice sits there (autotune.knob_extension)
ETA_EDGE = (0.003, 0.001)
SOLVERS = ("auto", "cholesky", "cg")
# preconditioner="auto": the pivoted Cholesky from this many samples on (per set). Below it plain CG needs few
# (15-40) cheap iterations and the r sequential factor steps cost about what they save. Measured on CPU (estimator
# fit, Gaussian mixtures, float32 and float64, d in {2, 10, 50}, rank 200): PCG took 0.8-1.8x CG's time at
# M = 1024, from 1.5x slower to 2.4x faster at 2048 (faster in 5 of 6 cases), and was 1.7-5.5x faster at 4096.
AUTO_PRECOND_MIN_POINTS = 2048


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
        preconditioner: of the CG solves (fit, predict and the backward solve share one): None (plain CG),
            "pivchol" (partial pivoted Cholesky of K, rank ``precond_rank``), "nystrom" (random landmarks),
            or "auto" (the default: "pivchol" for sets of at least ``AUTO_PRECOND_MIN_POINTS`` samples,
            else none). See ``steinops.preconditioners``.
        precond_rank: rank of the preconditioner's factor (default 200; ``benchmarks/large_m.py`` on CPU, float32,
            rtol 1e-4: 1 instead of 23 iterations at M = 20000, d = 3, and 10 instead of 82 on noisy MNIST at
            M = 8192, d = 784, for a setup costing under one iteration).
        backend: backend of the fused ops (see ``steinops.ops.backends``).

    After ``fit(x)``: ``scores_`` (..., M, d) in-sample estimates, ``bandwidth_`` and ``eta_`` (...),
    ``solver_`` the solver used; with CG also ``cg_iterations_`` (int) and ``cg_residuals_`` (the max
    relative residual before the first and after every iteration; both None with Cholesky) and
    ``preconditioner_`` (the one used, or None).
    """

    def __init__(self, kernel="rbf", *, bandwidth="median", eta="auto", solver="auto",
                 cg_rtol: float | None = None, cg_max_iter: int | None = None, preconditioner="auto",
                 precond_rank: int = DEFAULT_RANK, backend: str | None = None):
        super().__init__(kernel, bandwidth=bandwidth, backend=backend)
        if not isinstance(solver, str) or solver.lower() not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if not isinstance(eta, torch.Tensor):
            _eta_tensor(eta, (), torch.zeros(()))  # checks numbers and "auto" now; tensors at fit
        self.eta, self.solver = eta, solver.lower()
        self.cg_rtol, self.cg_max_iter = cg_rtol, cg_max_iter
        self.preconditioner = check_preconditioner(preconditioner, allow_auto=True)
        self.precond_rank = check_rank(precond_rank, "precond_rank")

    knob = "eta"
    extends_knob_edge = True

    def knob_grid(self, M):
        return ETA_GRID

    def knob_edge_values(self, M):
        return ETA_EDGE

    def knob_default(self, M):
        return DEFAULT_ETA

    def _fit(self, xc, h):
        batch, M = xc.shape[:-2], xc.shape[-2]
        eta = self.knob_tensor(batch, xc)
        solver = self.solver
        if solver == "auto":
            solver = "cholesky" if dense_fits(xc) else "cg"
        self.solver_, self.eta_ = solver, eta
        self.cg_iterations_ = self.cg_residuals_ = self.preconditioner_ = None
        self._A = None  # K + eta I as an autograd handle, kept only by a dense fit that needs a gradient
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
            # With a gradient to compute, spd_solve's backward reuses the factor (O(M^2 d)) instead of
            # differentiating the Cholesky (O(M^3)); without one it is cholesky_solve_jitter. Its L carries no
            # gradient, so predict's solves take theirs through A (spd_solve_with_factor).
            self._L, X = spd_solve(A, S)
            if A.requires_grad:
                self._A = A
            return -X
        S = stein_term(xc, kernel=self.kernel, bandwidth=h, backend=self.backend)
        name = self.preconditioner
        if name == "auto":
            name = "pivchol" if M >= AUTO_PRECOND_MIN_POINTS else None
        if name is not None:
            self.preconditioner_ = kernel_preconditioner(name, xc, h, eta, rank=self.precond_rank,
                                                         kernel=self.kernel, backend=self.backend)
        info = {}
        G = -kernel_solve(xc, S, h, eta, kernel=self.kernel, backend=self.backend, rtol=self.cg_rtol,
                          max_iter=self.cg_max_iter, preconditioner=self.preconditioner_, info=info)
        self.cg_iterations_, self.cg_residuals_ = info["iterations"], info["residuals"]
        return G

    def closed_form_loo_fits(self, x) -> bool:
        """Whether ``closed_form_loo`` applies: dense Gram matrices within budget (``stein_loo.py``)."""
        return dense_fits(x) and isinstance(self.bandwidth, torch.Tensor)

    def closed_form_loo(self, x):
        """Leave-one-out Hyvarinen terms (..., M) of this (unfitted) candidate on x, from one dense fit."""
        eta = _eta_tensor(self.eta, x.shape[:-2], x)  # a candidate's eta is a tensor; "auto" here is the default
        h = _checks.bandwidth_tensor(self.bandwidth, x.shape[:-2], x)
        return sge_loo_terms(x, h, eta, self.kernel.name)

    def _solve(self, B):
        if self.solver_ == "cholesky":
            A = self._A  # set by every fit: None unless the dense fit kept a gradient handle
            return torch.cholesky_solve(B, self._L) if A is None else spd_solve_with_factor(A, self._L, B)
        return kernel_solve(self._x, B, self.bandwidth_, self.eta_, kernel=self.kernel, backend=self.backend,
                            rtol=self.cg_rtol, max_iter=self.cg_max_iter, preconditioner=self.preconditioner_)

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
                eta="auto", solver="auto", preconditioner="auto", backend: str | None = None) -> torch.Tensor:
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
        preconditioner: of the CG solver: "auto", None, "pivchol" or "nystrom" (see ``SteinScoreEstimator``).
        backend: backend of the fused ops ("auto", "cpu", "triton", "cuda", "reference").
    """
    est = SteinScoreEstimator(kernel, bandwidth=bandwidth, eta=eta, solver=solver, preconditioner=preconditioner,
                              backend=backend).fit(x)
    return est.scores_ if query is None else est.predict(query)

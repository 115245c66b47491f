"""The Stein gradient estimator with its rows sharded over ``torch.distributed`` processes (e.g. one per GPU).

Rank p of W holds rows ``x_p (..., m_p, d)`` of the samples (uneven splits allowed, rank order = row order).
The samples are all-gathered ONCE (``x (..., M, d)``, O(M d) per rank: small next to the O(M^2 d) products);
then every CG iteration of ``(K + eta I) X = B`` costs on rank p one all-gather of the search direction
(O(M E)) and the fused product of its row block ``K(x_p, x) @ V`` (O(m_p M (d + E)) work, nothing of size
m_p x M stored); the column inner products of CG are all-reduced, so every rank takes the same steps and
stops at the same iteration. In sample rank p returns its rows of

    G = -(K + eta I)^{-1} S,    S_p = stein_term(x_p, x)

Out of sample (Li & Turner's predictive rule, as ``SteinScoreEstimator.predict``) the queries are sharded
too. They are processed in rounds: each round all-gathers a chunk of every rank's queries ``z (Q, d)``,
solves ``(K + eta I) Y = K(x, z)`` by the same sharded CG (rank p holds rows ``K(x_p, z)``, the Q query
columns are the right-hand sides, so ``A = K_q (K + eta I)^{-1} = Y^T``), and forms every quantity of the
rule as a sum over the samples of rank-local terms, all-reduced once per round:

    K_q G,   W x,   rowsum(W),   rowsum(A o K_q)     with W = (1 + A) o K_s(z, x)

Each rank keeps the rows of its own queries. Memory per rank O(m_p Q) for the round's kernel block
(Q = W x chunk; the chunk follows the single-process ``QUERY_CHUNK_ENTRIES`` budget).

Consistency with one process: the gathered samples are identical on every rank, so the centring (mean of
all samples), the bandwidth rule (``"median"``: 2 x the median distance of an evenly strided subset of at
most 1024 of the gathered samples, ``steinops.bandwidth``; ``"svgd"`` likewise) and the preconditioner
(built redundantly by every rank from the gathered samples, O(M r (d + r)) each, then restricted to its rows;
``L^T V`` is all-reduced) are exactly those of ``SteinScoreEstimator(solver="cg")`` with the same
preconditioner and rank on the concatenated samples; the results agree to the CG tolerance.

No gradients: everything runs under ``torch.no_grad`` (a distributed implicit backward is not implemented).
Outside an initialised process group (or with one process) it is the single-process estimator.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import _checks
from ..bandwidth import select_bandwidth
from ..kernels import get_kernel, stein_profile
from ..ops.gram import gram
from ..ops.kernel_matvec import kernel_matvec
from ..ops.stein_term import stein_term
from ..preconditioners import DEFAULT_RANK, check_preconditioner, check_rank, kernel_preconditioner
from ..solvers import conjugate_gradient
from ._kernel_system import default_rtol
from .base import QUERY_CHUNK_ENTRIES
from .stein import DEFAULT_ETA


class _Comm:
    """The collectives used here, over ``group``; the identity outside torch.distributed or with one process."""

    def __init__(self, group):
        self.on = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.on else 0
        self.world = dist.get_world_size(group) if self.on else 1
        self.on = self.on and self.world > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            t = t.contiguous()
            dist.all_reduce(t, group=self.group)
        return t

    def counts(self, n: int, device) -> list[int]:
        """Every rank's n, in rank order."""
        if not self.on:
            return [n]
        mine = torch.tensor([n], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        return [int(p) for p in parts]

    def gather_rows(self, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """All-gather dim -2 of t (..., counts[rank], C) over the ranks -> (..., sum(counts), C), rank order.
        Uneven counts are padded to the largest for the collective and trimmed after."""
        if not self.on:
            return t
        top = max(counts)
        pad = t.new_zeros(*t.shape[:-2], top, t.shape[-1])
        pad[..., : t.shape[-2], :] = t
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad, group=self.group)
        return torch.cat([p[..., :n, :] for p, n in zip(parts, counts)], -2)


def _cg(comm, xp, xa, counts, h, eta, B, *, kernel, backend, precond, rtol, max_iter, info_list, what):
    """Sharded CG for ``(K(x, x) + eta I) X = B``: this rank's rows B (..., m_p, E) -> X (..., m_p, E)."""
    def matvec(V):
        return kernel_matvec(xp, xa, comm.gather_rows(V, counts), kernel=kernel, bandwidth=h,
                             backend=backend) + eta[..., None, None] * V

    hist = []
    X, it, _ = conjugate_gradient(matvec, B, rtol=rtol, max_iter=max_iter, precond=precond, history=hist,
                                  allreduce=comm.all_reduce, what=what)
    info_list.append({"iterations": it, "residuals": hist})
    return X


@torch.no_grad()
def sharded_stein_score(x_local: torch.Tensor, query_local: torch.Tensor | None = None, *, group=None,
                        kernel="rbf", bandwidth="median", eta="auto", rtol: float | None = None,
                        max_iter: int | None = None, preconditioner="pivchol", precond_rank: int = DEFAULT_RANK,
                        backend: str | None = None, query_chunk: int | None = None,
                        info: dict | None = None) -> torch.Tensor:
    """Row-sharded SGE: this rank's rows of the in-sample estimate, or of the out-of-sample one at its queries.

    Call it on every rank of ``group`` (collective; default: the default process group) with the same
    keyword arguments.

    Args:
        x_local: this rank's samples (..., m_p, d), m_p >= 1 (may differ between ranks; the batch dims, d and
            dtype may not); the global sample set is the concatenation over ranks in rank order. Leading batch
            dims as in ``stein_score``.
        query_local: None (in-sample), or this rank's queries (..., n_p, d) (n_p >= 0, may differ).
        kernel: "rbf" or "imq". bandwidth: a positive number, a tensor (...), "median" or "svgd" (computed on
            the gathered samples, identically on every rank). eta: number > 0, tensor (...) or "auto" (0.3).
        rtol, max_iter: CG stopping rule (default 1e-5 float32 / 1e-8 float64; ``max(100, 2 M)``).
        preconditioner: None, "pivchol" (default) or "nystrom" (landmarks drawn with seed 0, identically on
            every rank and as by the single-process estimator); rank ``precond_rank``.
        backend: backend of the fused ops. query_chunk: queries per rank and round (default: the
            single-process memory budget, ``QUERY_CHUNK_ENTRIES / M`` per set).
        info: a dict that receives ``bandwidth``, ``eta``, ``M``, ``counts`` (rows per rank), ``cg`` (the
            in-sample solve's ``iterations`` and ``residuals`` history) and ``query_cg`` (one per round).

    Returns:
        (..., m_p, d) when ``query_local`` is None, else (..., n_p, d); in x_local's dtype.
    """
    _checks.points("x_local", x_local, min_rows=1)
    prof = get_kernel(kernel)
    if prof.name not in ("rbf", "imq"):
        raise ValueError(f"kernel must be 'rbf' or 'imq', got {kernel!r}")
    name = check_preconditioner(preconditioner)
    precond_rank = check_rank(precond_rank, "precond_rank")
    if query_chunk is not None and (isinstance(query_chunk, bool) or not isinstance(query_chunk, int)
                                    or query_chunk < 1):
        raise ValueError(f"query_chunk must be None or a positive int, got {query_chunk!r}")
    if isinstance(bandwidth, str) and bandwidth.lower() not in ("median", "svgd"):
        raise ValueError(f"bandwidth must be a positive number, a tensor, 'median' or 'svgd'; got {bandwidth!r}")
    if query_local is not None:
        _checks.points("query_local", query_local, min_rows=0)
        _checks.same_device(query_local=query_local, x_local=x_local)
        if query_local.shape[-1] != x_local.shape[-1]:
            raise ValueError(f"query_local has {query_local.shape[-1]} features but the samples have "
                             f"{x_local.shape[-1]}")
    out_dtype = x_local.dtype
    xf = x_local.float() if x_local.dtype in (torch.float16, torch.bfloat16) else x_local
    comm = _Comm(group)
    device = xf.device
    counts = comm.counts(xf.shape[-2], device)
    start = sum(counts[: comm.rank])
    stop = start + counts[comm.rank]
    xa = comm.gather_rows(xf.contiguous(), counts)  # (..., M, d), identical on every rank
    batch, M = xa.shape[:-2], xa.shape[-2]
    if M < 2:
        raise ValueError(f"x_local: the ranks hold {M} sample in all; need at least 2")
    h = _checks.bandwidth_tensor(select_bandwidth(xa, bandwidth), batch, xa)
    if isinstance(eta, str):
        if eta.lower() != "auto":
            raise ValueError(f"eta must be a positive number, a tensor, or 'auto'; got {eta!r}")
        eta = DEFAULT_ETA
    eta = _checks.per_batch_positive("eta", eta, batch, xa)
    rtol = default_rtol(xa.dtype) if rtol is None else _checks.positive_number("rtol", rtol)
    max_iter = max(100, 2 * M) if max_iter is None else max_iter

    centre = xa.mean(-2, keepdim=True)  # as the single-process estimator: translation invariant, less cancellation
    xa = xa - centre
    xp = xa[..., start:stop, :]
    precond = None
    if name is not None:
        precond = kernel_preconditioner(name, xa, h, eta, rank=precond_rank, kernel=prof,
                                        backend=backend).local(start, stop, comm.all_reduce)
    solves: list[dict] = []
    S = stein_term(xp, xa, kernel=prof, bandwidth=h, backend=backend)
    G = -_cg(comm, xp, xa, counts, h, eta, S, kernel=prof, backend=backend, precond=precond, rtol=rtol,
             max_iter=max_iter, info_list=solves, what="sharded CG solve of (K + eta I) G = -S")
    if info is not None:
        info.update(bandwidth=h, eta=eta, M=M, counts=counts, cg=solves[0], query_cg=solves[1:],
                    preconditioner=precond)
    if query_local is None:
        return G.to(out_dtype)

    q = query_local.to(xa.dtype) - centre
    if q.shape[:-2] != batch:
        try:
            q = q.expand(*batch, *q.shape[-2:])
        except RuntimeError:
            raise ValueError(f"query_local of shape {tuple(query_local.shape)} does not broadcast to the samples' "
                             f"batch shape {tuple(batch)}") from None
    qcounts = comm.counts(q.shape[-2], device)
    chunk = query_chunk or max(1, QUERY_CHUNK_ENTRIES // max(1, M * math.prod(batch)))
    rounds = math.ceil(max(qcounts) / chunk)
    h2 = (h * h)[..., None, None]
    cubed = stein_profile(prof).name != prof.name  # IMQ: the Stein profile is IMQ cubed
    out = []
    for r in range(rounds):
        lo = [min(n, r * chunk) for n in qcounts]
        hi = [min(n, (r + 1) * chunk) for n in qcounts]
        sizes = [b - a for a, b in zip(lo, hi)]
        z = comm.gather_rows(q[..., lo[comm.rank]:hi[comm.rank], :].contiguous(), sizes)  # (..., Q, d)
        if z.shape[-2] == 0:
            continue
        Kt = gram(xp, z, kernel=prof, bandwidth=h, backend=backend)  # K(x_p, z) (..., m_p, Q)
        Y = _cg(comm, xp, xa, counts, h, eta, Kt, kernel=prof, backend=backend, precond=precond, rtol=rtol,
                max_iter=max_iter, info_list=solves, what="sharded CG solve of (K + eta I) Y = K(x, z)")
        Kq, A = Kt.transpose(-1, -2), Y.transpose(-1, -2)  # (..., Q, m_p): this rank's columns
        W = (1 + A) * (Kq**3 if cubed else Kq)
        sums = comm.all_reduce(torch.cat([Kq @ G, W @ xp, W.sum(-1, keepdim=True), (A * Kq).sum(-1, keepdim=True)], -1))
        d = xa.shape[-1]
        KqG, Wx, Wsum, AK = sums[..., :d], sums[..., d:2 * d], sums[..., 2 * d:2 * d + 1], sums[..., 2 * d + 1:]
        g = -(KqG - (Wx - Wsum * z) / h2) / (1 + eta[..., None, None] - AK)  # k(z, z) = 1 for RBF and IMQ
        mine = sum(sizes[: comm.rank])
        out.append(g[..., mine:mine + sizes[comm.rank], :])
    if info is not None:
        info["query_cg"] = solves[1:]
    if not out:
        return q.new_zeros(*batch, 0, q.shape[-1]).to(out_dtype)
    return torch.cat(out, -2).to(out_dtype)

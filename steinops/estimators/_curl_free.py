"""The curl-free matrix kernel, applied blockwise: never an (M d) x (M d) matrix, never M x M x d.

For a scalar kernel ``k(z, y) = phi(r)``, ``r = |z - y|^2`` (RBF or IMQ profile), the curl-free
kernel is the d x d matrix kernel (normalised by h^2 so that ``K(z, z) = I``, as for the diagonal
kernel, which keeps the regulariser's scale comparable)::

    K(z, y) = h^2 grad_z grad_y^T k(z, y) = h^2 [ -2 phi'(r) I - 4 phi''(r) u u^T ],    u = z - y

Every function in its RKHS is a gradient: ``sum_m K(z, x^m) c_m = grad_z [h^2 sum_m c_m . grad_y k(z, x^m)]``.
The divergence representer of score matching, ``zeta(z) = (1/M) sum_m sum_j d/dy_j K(z, y) e_j |_{y = x^m}``
(so that ``<s, zeta> = (1/M) sum_m div s(x^m)``), is a gradient too::

    zeta(z) = (h^2 / M) sum_m grad_z Lap_y k(z, x^m),    Lap_y k = g(r) = 2 d phi' + 4 r phi'',
    grad_z g(r) = 2 g'(r) u,                             g'(r) = (2 d + 4) phi'' + 4 r phi'''

So a field ``s(z) = w S_z + K_z c`` (``S_z = M zeta(z)``, weight w (...), coefficients c (..., M, d)) has
the potential (an unnormalised log-density when s estimates a score)::

    f(z) = w h^2 sum_m g(r_zm) + h^2 sum_m c_m . grad_y k(z, x^m) = w h^2 sum_m g - 2 h^2 sum_m phi' (u . c_m)

Per block of queries, with R the (n, M) squared distances, ``W = Z C^T - 1 beta^T`` (``W_im = u_im . c_m``,
``beta_m = x^m . c_m``) and ``T = 2 h^2 w g'(R) - 4 h^2 phi''(R) o W``::

    s(Z) = Z o rowsum(T) - T X + (-2 h^2 phi'(R)) C                 (three matmuls)
    f(Z) = rowsum(w h^2 g(R) - 2 h^2 phi'(R) o W)

Memory is O(block x M); with autograd each block is checkpointed (recomputed in backward), so the
backward is O(block x M) too. This is plain PyTorch (matmuls), not one of the fused backends.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..kernels import KernelProfile

# Entries of one (batch, query block, M) slab; direct differences (small d) use d times as many.
BLOCK_ENTRIES = 1 << 22
DIRECT_DIFF_MAX_D = 8


def radial_derivatives(kernel: KernelProfile, r2: torch.Tensor, h2: torch.Tensor):
    """``(phi', phi'', phi''')`` of the profile at squared distances r2, bandwidth^2 h2 (broadcast)."""
    if kernel.name == "rbf":
        k = torch.exp(-r2 / (2 * h2))
        return -k / (2 * h2), k / (4 * h2**2), -k / (8 * h2**3)
    if kernel.name == "imq":
        s = torch.rsqrt(1 + r2 / h2)
        s2 = s * s
        s3 = s2 * s
        s5 = s3 * s2
        return -s3 / (2 * h2), 3 * s5 / (4 * h2**2), -15 * s5 * s2 / (8 * h2**3)
    raise ValueError(f"the curl-free kernel supports 'rbf' and 'imq', got {kernel.name!r}")


def _sqdist(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, n, M) squared distances of centred points; direct differences for small d (no cancellation)."""
    if z.shape[-1] <= DIRECT_DIFF_MAX_D:
        return ((z.unsqueeze(-2) - x.unsqueeze(-3)) ** 2).sum(-1)
    zz, xx = (z * z).sum(-1), (x * x).sum(-1)
    return (zz.unsqueeze(-1) + xx.unsqueeze(-2) - 2 * z @ x.transpose(-1, -2)).clamp_min(0)


def _rows_per_block(B: int, M: int, d: int) -> int:
    """Query rows per block so that one (B, rows, M) slab (times d for direct differences) fits BLOCK_ENTRIES."""
    return max(1, BLOCK_ENTRIES // max(1, B * M * (d if d <= DIRECT_DIFF_MAX_D else 1)))


def _block(z, x, c, w, h2, kernel, want_field, want_potential):
    d = x.shape[-1]
    r2 = _sqdist(z, x)
    p1, p2, p3 = radial_derivatives(kernel, r2, h2)
    T = None
    field = pot = None
    if w is not None:
        T = (2 * h2 * w) * ((2 * d + 4) * p2 + 4 * r2 * p3)
        if want_potential:
            pot = ((w * h2) * (2 * d * p1 + 4 * r2 * p2)).sum(-1)
    if c is not None:
        beta = (x * c).sum(-1)                                   # (B, M)
        W = z @ c.transpose(-1, -2) - beta.unsqueeze(-2)          # (B, n, M): u_im . c_m
        tc = (-4 * h2) * p2 * W
        T = tc if T is None else T + tc
        if want_potential:
            pc = ((-2 * h2) * p1 * W).sum(-1)
            pot = pc if pot is None else pot + pc
    if want_field:
        field = z * T.sum(-1, keepdim=True) - T @ x
        if c is not None:
            field = field + ((-2 * h2) * p1) @ c
    return field, pot


def curl_free_apply(z, x, h, *, kernel: KernelProfile, coef=None, weight=None, field=True, potential=False):
    """Field ``s(z) = w S_z + K_z coef`` and/or its potential f(z) (see the module docstring).

    z (..., N, d) queries and x (..., M, d) centres (both centred alike), h (...) bandwidths,
    coef (..., M, d) or None, weight (...) or None. Returns ``(field (..., N, d) or None,
    potential (..., N) or None)``. Differentiable in every tensor argument.
    """
    if coef is None and weight is None:
        raise ValueError("give coef, weight or both")
    batch = torch.broadcast_shapes(z.shape[:-2], x.shape[:-2], h.shape,
                                   *(() if coef is None else (coef.shape[:-2],)),
                                   *(() if weight is None else (weight.shape,)))
    B, d = math.prod(batch), x.shape[-1]
    N, M = z.shape[-2], x.shape[-2]
    zf = z.expand(*batch, N, d).reshape(B, N, d)
    xf = x.expand(*batch, M, d).reshape(B, M, d)
    h2 = (h * h).expand(batch).reshape(B, 1, 1)
    cf = None if coef is None else coef.expand(*batch, M, d).reshape(B, M, d)
    wf = None if weight is None else weight.expand(batch).reshape(B, 1, 1)
    rows = _rows_per_block(B, M, d)
    tensors = [t for t in (zf, xf, h2, cf, wf) if t is not None]
    use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    fields, pots = [], []
    for i in range(0, N, rows):
        args = (zf[:, i:i + rows], xf, cf, wf, h2, kernel, field, potential)
        out = checkpoint(_block, *args, use_reentrant=False) if use_ckpt else _block(*args)
        fields.append(out[0])
        pots.append(out[1])
    f_out = torch.cat(fields, -2).reshape(*batch, N, d) if field else None
    p_out = torch.cat(pots, -1).reshape(*batch, N) if potential else None
    return f_out, p_out


def curl_free_matvec(x, c, h, *, kernel):
    """``K(x, x) c`` for the curl-free kernel: x, c (..., M, d), h (...) -> (..., M, d)."""
    return curl_free_apply(x, x, h, kernel=kernel, coef=c)[0]


def curl_free_stein_term(x, h, *, kernel):
    """``S = M zeta(X)`` (..., M, d), the divergence representer at the samples times M."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return curl_free_apply(x, x, h, kernel=kernel, weight=one)[0]


def curl_free_gram(x, h, *, kernel):
    """The dense (..., M d, M d) Gram matrix (row index m * d + i). Only for small M d (tests, dense solves)."""
    *batch, M, d = x.shape
    u = x.unsqueeze(-2) - x.unsqueeze(-3)                      # (..., M, M, d)
    r2 = (u * u).sum(-1)
    h2 = (h * h)[..., None, None]
    p1, p2, _ = radial_derivatives(kernel, r2, h2)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    blocks = h2[..., None, None] * (-2 * p1[..., None, None] * eye - 4 * p2[..., None, None] * u.unsqueeze(-1) * u.unsqueeze(-2))
    return blocks.transpose(-3, -2).reshape(*batch, M * d, M * d)


def curl_free_norm_bound(x, h, *, kernel, n_power: int = 8):
    """A rigorous upper bound on ``lambda_max(K)`` (...) for the curl-free Gram matrix K of x (..., M, d).

    ``||K||_2 <= lambda_max(N)`` with N the M x M matrix of block norms, ``N_im = ||K(x^i, x^m)||_2
    <= h^2 (2 |phi'| + 4 |phi''| r)``, which is entrywise non-negative, so the Collatz-Wielandt bound
    ``max_i (N v)_i / v_i`` at a power iterate v > 0 applies. Computed blockwise, without gradient.
    """
    with torch.no_grad():
        *batch, M, d = x.shape
        B = math.prod(batch)
        xf = x.reshape(B, M, d)
        h2 = (h * h).expand(batch).reshape(B, 1, 1)
        rows = _rows_per_block(B, M, d)

        def nmv(v):
            out = []
            for i in range(0, M, rows):
                r2 = _sqdist(xf[:, i:i + rows], xf)
                p1, p2, _ = radial_derivatives(kernel, r2, h2)
                out.append((h2 * (2 * p1.abs() + 4 * p2.abs() * r2)) @ v)
            return torch.cat(out, -2)

        v = torch.ones(B, M, 1, dtype=x.dtype, device=x.device)
        for _ in range(n_power):
            v = nmv(v)
            v = (v / v.amax(-2, keepdim=True)).clamp_min(1e-6)
        return (nmv(v) / v).amax(-2)[..., 0].reshape(batch)

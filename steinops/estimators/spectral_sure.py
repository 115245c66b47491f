"""Exact in-sample SURE for spectral-filter score estimators (SSGE, Landweber, nu-method; diagonal kernel).

Every estimator of the family with a scalar kernel fits ``G = -F S`` in sample, ``F = f(K)`` a spectral
function of the Gram matrix (``K = U diag(lambda) U^T``, ``F = U diag(f(lambda)) U^T``):

    SSGE        f(lambda) = mask / lambda                      (mask: the kept eigenpairs, held fixed)
    Landweber   f(lambda) = g_T(lambda / M) / M                (g_T the filter of T steps of size 1/b)
    nu-method   f(lambda) = g_T(lambda / M) / M                (a polynomial of degree T - 1)
    SGE / KEF   f(lambda) = 1 / (lambda + eta)                 (closed form in ``stein_loo.py``)

SURE (``autotune``) needs the diagonal blocks ``tr_i = sum_k dG_ik / dx_ik`` of the fit's total Jacobian.
With ``k_ij = phi(r_ij^2)``, ``u_ij = x_i - x_j`` and ``dG = -dF S - F dS``, both parts need only M x M
matrices:

* the Stein term moves (as for the SGE): ``-sum_{m != i} F_im c_im + F_ii sum_j c_ij``,
  ``c_ij = 4 phi''_ij r_ij^2 + 2 d phi'_ij``;
* the filter moves: x_ik changes row and column i of K, ``dK = e_i a^T + a e_i^T`` with
  ``a_j = 2 phi'_ij u_ijk``, and by Daleckii-Krein ``dF = U (Gam o (U^T dK U)) U^T`` with Gam the divided
  differences of f (``Gam_pq = (f_p - f_q) / (lambda_p - lambda_q)``, ``f'`` on the diagonal). Writing
  ``W = U^T S`` (M x d), ``Y = X W^T`` (``Y_jq = x_j . W_q``) and D the matrix of ``phi'_ij``, the sum over k of
  ``[dF S]_ik`` is ``B1_i + B2_i`` with

      B1_i = 2 sum_q R_iq [(D U) o Y - D (U o Y)]_iq,                         R = (U o U) Gam
      B2_i = 2 sum_p U_ip (D U)_ip [(U o Y) Gam]_ip  -  2 sum_k sum_j D_ij x_jk Z^k_ij,
             Z^k = (U o V^k) U^T,   V^k = (U diag(W_:k)) Gam.

Cost. Everything but Gam is shared by the candidates of one bandwidth (``_parts``: one ``eigh`` and (3 + d)
M^3 products, among them ``E^k = D diag(x_:k) U`` so that ``sum_j D_ij x_jk Z^k_ij = sum_q (U o E^k)_iq V^k_iq``
and Z^k is never formed); a candidate then costs (2 + d) products ``X Gam``: M^3 each for a dense Gam, 2 M^2 J for
the SSGE (Gam vanishes between two of the M - J dropped eigenpairs: ``PrefixSupported``), 4 M^2 T for T steps of
nu (Gam has rank <= 2 T + 2: ``LowRankSymmetric``), M^2 T for Landweber plus M^2 T_max shared by the candidates of
a bandwidth (its closed form ``X A_T P_T`` has the same ``X A`` for every T: ``GeometricSeries``, ``memo``).
Before this split every candidate cost
(3 + 2 d) M^3. The exact trace is used for d <= ``EXACT_SURE_MAX_D``: there it cost
about as much as 8 Hutchinson probes or less (M = 512, one thread of a 2-core Intel Xeon, d = 16: SSGE 0.20 s
against 0.19 s, Landweber 0.22 s against 1.01 s, nu 0.19 s against 0.16 s; d = 2: 0.08-0.10 s against 1.18, 0.62
and 0.10 s), and it has no probe noise (on the 2-D gmm at M = 1024 one probe's noise on the gap between the two
best SSGE candidates was 3x the gap itself). The Landweber / nu step 1 / b is chosen from K and held fixed, as the
fit's autograd holds it: its own dependence on x_i is O(1/M) (1% of the trace at M = 9, against finite differences
of refits). Landweber's divided differences are a double geometric sum (``GeometricSeries``); the nu-method's
(and any (mu_k, omega_k) iteration's) come from the filter's own recursion in
divided-difference arithmetic (Leibniz rule ``[lambda c]_pq = c_q + lambda_p [c]_pq``), which is linear in
``[c]``: one forward and one adjoint pass over the eigenvalues and one (M x T)(T x M) product
(``recursion_divided_differences``); exact, no division by eigenvalue gaps.
Computed in float64 whatever the input dtype (the traces cancel large terms, as in ``stein_loo.py``).
"""
from __future__ import annotations

import torch

from .base import dense_fits
from .stein_loo import radial_terms

EXACT_SURE_MAX_D = 16  # above, 8 Hutchinson probes are cheaper than the d M^3 products of the exact trace
EXACT_SURE_CHUNK_ENTRIES = 2**23  # Gram entries per chunk of sample sets (about 12 M x M float64 buffers each)


def spectral_sure_terms(x: torch.Tensor, h: torch.Tensor, filter_fn, kernel="rbf",
                        cache: dict | None = None) -> torch.Tensor:
    """Per-point in-sample SURE terms ``1/2 |G_i|^2 + tr_i`` of ``G = -f(K) S``; returns (..., M) in x's dtype.

    x (..., M, d) samples; h (...) bandwidths. ``filter_fn(lam, K, idx)`` gets the eigenvalues lam (n, M)
    (descending, float64) of the Gram matrices K (n, M, M) of the sets ``idx`` (indices into the flattened
    batch) and returns ``(f, Gam)``: the filter values (n, M) and their divided differences, a tensor
    (n, M, M) or an operator with ``rmatmul(X, memo) = X @ Gam`` (``PrefixSupported``, ``LowRankSymmetric``,
    ``GeometricSeries``).
    ``cache``: a dict kept by the caller across candidates; when the whole batch is one chunk it holds the
    eigendecomposition and the filter-independent products of the last (x, h), so candidates that differ only
    in the knob share them (``autotune.tune`` orders its grid by bandwidth).
    """
    batch, M, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    xf, hf = x.detach().reshape(-1, M, d), h.detach().reshape(-1)
    chunk = max(1, EXACT_SURE_CHUNK_ENTRIES * 12 // (M * M * (12 + d)))  # the cache holds 10 + d M x M buffers
    if cache is not None and len(xf) <= chunk:
        key = (xf.data_ptr(), xf._version, tuple(xf.shape), str(xf.dtype), tuple(hf.tolist()), str(kernel))
        if cache.get("key") != key:
            cache.clear()
            cache.update(key=key, parts=_parts(xf, hf, kernel))
        out = [_terms(cache["parts"], filter_fn, torch.arange(len(xf)))]
    else:
        out = [_terms(_parts(xf[i:i + chunk], hf[i:i + chunk], kernel), filter_fn,
                      torch.arange(i, min(i + chunk, len(xf)))) for i in range(0, len(xf), chunk)]
    return torch.cat(out).reshape(*batch, M).to(x.dtype)


def _parts(x, h, kernel):
    """Everything of the trace that does not depend on the filter (float64, centred): the eigendecomposition and
    the (M x M) x (M x M) products, so that a candidate's own terms need only products with Gam (``_terms``)."""
    p = radial_terms(x, h, kernel)
    D, c = p["D"], p["c"]
    lam, U = torch.linalg.eigh(p["K"])
    lam, U = lam.flip(-1), U.flip(-1)  # descending
    W = U.mT @ p["S"]  # (n, M, d)
    Y = p["x"] @ W.mT  # (n, M, M): Y_jq = x_j . W_q
    DU = D @ U
    UY = U * Y
    B = DU * Y - D @ UY
    del Y
    # the Stein term's trace sum_m F_im c_im = sum_q U_iq f_q (c U)_iq and F_ii = sum_q U_iq^2 f_q
    UcU = U * (c @ U)
    # the filter's second part, per coordinate k: sum_j D_ij x_jk Z^k_ij = sum_q (U o E^k)_iq V^k_iq with
    # E^k = D diag(x_:k) U (so Z^k = (U o V^k) U^T is never formed)
    UE = torch.stack([U * (D @ (p["x"][..., :, k, None] * U)) for k in range(x.shape[-1])])  # (d, n, M, M)
    return dict(K=p["K"], csum=c.sum(-1), lam=lam, U=U, UU=U * U, W=W, UY=UY, UDU=U * DU, B=B, UcU=UcU, UE=UE)


def _rmatmul(X, Gam, memo: dict):
    """``X @ Gam`` for a dense Gam or a structured one (``rmatmul``); ``memo`` (one dict per X) keeps what an
    operator can share between the candidates of one bandwidth (``GeometricSeries``; the others ignore it)."""
    return X @ Gam if isinstance(Gam, torch.Tensor) else Gam.rmatmul(X, memo)


def _terms(p, filter_fn, idx):
    U, W = p["U"], p["W"]
    f, Gam = filter_fn(p["lam"], p["K"], idx.to(U.device))
    memo = p.setdefault("memo", {})  # per X; lives as long as the parts: one (x, h), one chunk
    G = -U @ (f[..., None] * W)
    fcol = f[..., None]
    tr = -((p["UcU"] @ fcol)[..., 0] - (p["UU"] @ fcol)[..., 0] * p["csum"])  # the Stein term moves
    # the filter moves: row sums of (X Gam) o A for (X, A) = (U o U, B), (U o Y, U o DU), (U diag(W_:k), U o E^k)
    b1 = 2 * (_rmatmul(p["UU"], Gam, memo.setdefault("UU", {})) * p["B"]).sum(-1)
    b2 = 2 * (p["UDU"] * _rmatmul(p["UY"], Gam, memo.setdefault("UY", {}))).sum(-1)
    for k in range(W.shape[-1]):
        b2 = b2 - 2 * (p["UE"][k] * _rmatmul(U * W[..., None, :, k], Gam, memo.setdefault(("UW", k), {}))).sum(-1)
    tr = tr - (b1 + b2)
    return 0.5 * (G * G).sum(-1) + tr


class PrefixSupported:
    """Divided differences Gam (n, M, M) that vanish outside the first J rows and columns' cross
    (``Gam[:, J:, J:] = 0``; the SSGE's mask keeps a prefix of the descending eigenvalues, and two dropped
    ones have no divided difference): ``X @ Gam`` in 2 M^2 J operations instead of M^3."""

    def __init__(self, Gam: torch.Tensor, J: int):
        self.Gam, self.J = Gam, J

    def rmatmul(self, X, memo: dict | None = None):
        J = self.J
        if 2 * J >= X.shape[-1]:
            return X @ self.Gam
        return torch.cat([X @ self.Gam[..., :J], X[..., :J] @ self.Gam[..., :J, J:]], -1)


class LowRankSymmetric:
    """``Gam = s (1 c^T + c 1^T + L R + R^T L^T)`` (n, M, M), with c (n, M), L (n, M, T), R (n, T, M) and the
    scalar s: ``X @ Gam`` in about 4 M^2 T operations (the iterative filters' divided differences have rank
    at most 2 T + 2). ``dense()`` forms it."""

    def __init__(self, c, L, R, scale):
        self.c, self.L, self.R, self.scale = c, L, R, scale

    def dense(self):
        dv = self.c[:, None, :] + self.L @ self.R
        return self.scale * (dv + dv.mT)

    def rmatmul(self, X, memo: dict | None = None):
        ones_part = X.sum(-1, keepdim=True) * self.c[:, None, :] + (X @ self.c[..., None])  # (X 1) c^T + (X c) 1^T
        return self.scale * (ones_part + (X @ self.L) @ self.R + (X @ self.R.mT) @ self.L.mT)


class GeometricSeries:
    """Landweber's divided differences ``Gam_pq = -(step/M)^2 sum_{i=0}^{T-2} r_p^i P_{T-2-i}(r_q)`` (n, M, M),
    ``r = 1 - step lambda / M`` and ``P_m(r) = sum_{l<=m} r^l``, from the filter
    ``f(lambda) = (step/M) sum_{t<T} r^t`` and ``[r^t]_pq = -(step/M) sum_{i+l=t-1} r_p^i r_q^l`` (no division
    by eigenvalue gaps). ``X @ Gam = -(step/M)^2 (X A_T) P_T`` with ``A[p, i] = r_p^i``: the columns of ``X A`` are
    the same for every T, so the candidates of one bandwidth (the same r, the same X, T = 10 ... 1000) share one
    product of the largest T (``memo``), and each pays only ``(X A)_T P_T``: about M^2 (T_max + T) per X in all,
    where the nu-method's general operator (``LowRankSymmetric``) costs 4 M^2 T per candidate.

    r (n, M), T (n) int >= 1 (per set), step (n)."""

    def __init__(self, r, T, step, M: int):
        T, s = T.to(r.device), step.to(r) / M
        self.r, self.Tmax = r, int(T.max())
        powers = torch.cumprod(torch.cat([torch.ones_like(r[:, None]), r[:, None].expand(-1, self.Tmax - 1, -1)],
                                         1), 1)  # (n, Tmax, M): r^i, i < Tmax
        self.A = powers[:, :-1].mT  # (n, M, Tmax - 1)
        partial = powers.cumsum(1)  # (n, Tmax, M): P_m(r), m < Tmax
        self.f = s[:, None] * partial.gather(1, (T - 1)[:, None, None].expand(-1, 1, r.shape[-1]))[:, 0]
        # P_T (n, Tmax - 1, M): row i holds P_{T-2-i} for i <= T - 2, zero beyond (sets with fewer steps)
        m = T[:, None] - 2 - torch.arange(self.Tmax - 1, device=r.device)  # (n, Tmax - 1)
        rows = partial.gather(1, m.clamp_min(0)[:, :, None].expand(-1, -1, r.shape[-1]))
        self.P = torch.where((m >= 0)[:, :, None], rows, torch.zeros_like(rows))
        self.scale = -s[:, None, None] ** 2

    def dense(self):
        return self.scale * (self.A @ self.P)

    def rmatmul(self, X, memo: dict | None = None):
        """``X @ Gam`` for X (n, M, M). ``memo``: a dict kept with X across candidates of the same r; it holds
        ``X A`` for the largest T so far and is extended, not recomputed, when a larger T comes."""
        need = self.Tmax - 1
        if memo is None:
            XA = X @ self.A
        else:
            if "r" not in memo or not torch.equal(memo["r"], self.r):  # another bandwidth's K: start over
                memo.clear()
                memo.update(r=self.r, XA=X.new_empty(*X.shape[:-1], 0))
            have = memo["XA"].shape[-1]
            if have < need:
                memo["XA"] = torch.cat([memo["XA"], X @ self.A[..., have:need]], -1)
            XA = memo["XA"][..., :need]
        return self.scale * (XA @ self.P)


def landweber_divided_differences(lam: torch.Tensor, step, T: torch.Tensor, M: int, factored: bool = False):
    """Filter values f (n, M) and divided differences of Landweber's in-sample fit, as
    ``recursion_divided_differences`` with ``landweber_coefficients`` gives them, in closed form
    (``GeometricSeries``). lam (n, M), step (n), T (n) int. ``factored``: return the operator where it is cheaper
    than the dense (n, M, M) tensor (T_max <= M)."""
    gam = GeometricSeries(1 - step.to(lam)[:, None] * lam / M, T, step, M)
    return gam.f, (gam if factored and gam.Tmax <= M else gam.dense())


def recursion_values(lam: torch.Tensor, step, T: torch.Tensor, M: int, coefficients, forcing=None):
    """The iterative kscore fit (Landweber, nu) in the eigenbasis of K: ``(a_T (n, 1), c_T (n, M), v_T (n, M))``.

    The fit runs ``c_k = c_{k-1} + mu_k (c_{k-1} - c_{k-2}) - (omega_k step / M) v_{k-1}``, ``a_k`` likewise with
    ``- omega_k step``, ``v_k = a_k Z + K c_k`` (``Z = S / M``); with ``K = U diag(lam) U^T`` each eigen-direction
    runs it on scalars (K is lam, Z is 1), so the fit's coefficients are ``U diag(c_T) U^T S / M``, its in-sample
    scores ``U diag(v_T) U^T S / M`` and its prediction ``a_T S_z / M + K_z U diag(c_T) U^T S / M``. lam (n, M),
    step (n), T (n) int (sets with fewer steps stop early, as in the fit), ``coefficients(k) -> (mu_k, omega_k)``.
    ``forcing`` (n, max T, M): if given, receives ``-(omega_k step / M) c_{k-1}`` for k = 1..T (the divided
    differences' recursion, below)."""
    T = T.to(lam.device)
    st = step.to(lam)[:, None]  # (n, 1)
    a = a_prev = torch.zeros_like(lam[:, :1])
    c = c_prev = v = torch.zeros_like(lam)
    for k in range(1, int(T.max()) + 1):
        mu, om = coefficients(k)
        if forcing is not None:
            forcing[:, k - 1] = -(om / M) * st * c
        live = (T >= k)[:, None]
        a_new = a + mu * (a - a_prev) - om * st
        c_new = c + mu * (c - c_prev) - (om / M) * st * v
        a_prev, c_prev = torch.where(live, a, a_prev), torch.where(live, c, c_prev)
        a, c = torch.where(live, a_new, a), torch.where(live, c_new, c)
        v = a + lam * c
    return a, c, v


def recursion_divided_differences(lam: torch.Tensor, step, T: torch.Tensor, M: int, coefficients,
                                  factored: bool = False):
    """Filter values f (n, M) and divided differences (n, M, M) of an iterative kscore fit (Landweber, nu).

    The fit's recursion in the eigenbasis (``recursion_values``) gives the in-sample fit
    ``G = U diag(v_T(lambda)) U^T S / M``, so ``f = -v_T / M``. The
    same recursion on the divided differences (``[a] = 0``, ``[v]_pq = c_q + lambda_p [c]_pq``) is, for each p,
    linear in ``y_k = [c_k]_p.``::

        y_k = alpha_k(p) y_{k-1} + beta_k y_{k-2} + g_k,   alpha_k(p) = 1 + mu_k - omega_k step lambda_p / M,
        beta_k = -mu_k,   g_k = -(omega_k step / M) c_{k-1}(lambda),   y_0 = y_{-1} = 0,

    so ``y_T = sum_k w_k(p) g_k`` with the adjoint weights ``w_T = 1``, ``w_k = alpha_{k+1} w_{k+1} + beta_{k+2}
    w_{k+2}``: two scalar passes of T steps over the M eigenvalues and one (M x T)(T x M) product, instead of T
    passes over M x M matrices. Exact (no division by eigenvalue gaps). ``coefficients(k) -> (mu_k, omega_k)``;
    lam (n, M) with M the number of samples, step (n), T (n) int (sets with fewer steps stop early, as in the fit).
    ``factored``: return Gam as a ``LowRankSymmetric`` operator where that is cheaper (4 T < M), else dense.
    """
    n = lam.shape[0]
    T = T.to(lam.device)
    Tmax = int(T.max())
    st = step.to(lam)[:, None]  # (n, 1)
    coef = [coefficients(k) for k in range(1, Tmax + 1)]
    forcing = torch.empty(n, Tmax, M, dtype=lam.dtype, device=lam.device)
    _, c, v = recursion_values(lam, step, T, M, coefficients, forcing=forcing)
    # backward: adjoint weights w_k(p) of y_T, zero beyond each set's T
    weights = torch.zeros(n, M, Tmax, dtype=lam.dtype, device=lam.device)
    w1 = w2 = torch.zeros_like(lam)  # w_{k+1}, w_{k+2}
    for k in range(Tmax, 0, -1):
        if k < Tmax:
            mu1, om1 = coef[k]  # step k + 1
            mu2 = coef[k + 1][0] if k + 1 < Tmax else 0.0  # step k + 2
            w = (1 + mu1 - om1 * st * lam / M) * w1 - mu2 * w2
        else:
            w = torch.zeros_like(lam)
        w = torch.where((T == k)[:, None], torch.ones_like(w), torch.where((T < k)[:, None], torch.zeros_like(w), w))
        weights[:, :, k - 1] = w
        w1, w2 = w, w1
    # [v_T]_pq = c_q + lambda_p [c_T]_pq with [c_T] = weights @ forcing (rank <= T); Gam = -sym([v_T]) / M
    gam = LowRankSymmetric(c, lam[:, :, None] * weights, forcing, -0.5 / M)
    return -v / M, (gam if factored and 4 * Tmax < M else gam.dense())


def exact_sure_applies(bandwidth, x: torch.Tensor) -> bool:
    """Whether a candidate (tensor ``bandwidth``) gets the exact trace on x (..., M, d): dense Gram matrices within
    budget and d <= ``EXACT_SURE_MAX_D`` (above, the d M^3 products cost more than Hutchinson probes)."""
    return isinstance(bandwidth, torch.Tensor) and dense_fits(x) and x.shape[-1] <= EXACT_SURE_MAX_D

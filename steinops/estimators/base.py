"""The interface every score estimator implements, and the registry behind ``score_estimator``.

    est = steinops.score_estimator("stein", kernel="rbf", bandwidth="median").fit(x)   # x (..., M, d)
    est.scores_            # (..., M, d) in-sample estimates of grad log q
    est.predict(query)     # (..., N, d) out-of-sample estimates
    est.bandwidth_         # (...) bandwidth used per sample set

Subclasses implement ``_fit(xc, h)`` on centred samples (float32/float64, batch dims kept) and
``_predict_chunk(zc)`` on a chunk of centred queries; the base class does validation, half-precision upcasting,
bandwidth selection, centring and output casting, so every estimator treats its arguments alike.
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from ..bandwidth import RULES as BANDWIDTH_RULES, select_bandwidth
from ..kernels import get_kernel
from .autotune import tune

ESTIMATORS: dict[str, type] = {}
# Out-of-sample queries are processed in chunks holding at most this many (query, sample) pairs.
QUERY_CHUNK_ENTRIES = 2**24
# Dense solves / eigendecompositions up to this many Gram entries over the whole batch (0.5 GB in float32).
DENSE_MAX_ENTRIES = 2**27


def dense_fits(x: torch.Tensor) -> bool:
    """Whether the Gram matrices of the sample sets x (..., M, d) fit the dense-solve budget."""
    return math.prod(x.shape[:-2]) * x.shape[-2] ** 2 <= DENSE_MAX_ENTRIES


def register(name: str):
    """Class decorator adding an estimator to the registry under ``name``."""
    def deco(cls):
        ESTIMATORS[name] = cls
        cls.name = name
        return cls
    return deco


def score_estimator(name: str, *args, **kwargs):
    """An unfitted estimator by name (see ``ESTIMATORS``), e.g. ``score_estimator("stein", eta=0.3)``."""
    if not isinstance(name, str) or name.lower() not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {name!r}")
    return ESTIMATORS[name.lower()](*args, **kwargs)


class ScoreEstimator:
    """Base class: kernel, bandwidth and backend handling shared by all estimators.

    Args:
        kernel: "rbf" or "imq".
        bandwidth: a positive number, a tensor of shape (...) (one per sample set), a rule name
            (see ``steinops.bandwidth``: "median" = 2 x median distance, "svgd"), or "auto": chosen per
            sample set by held-out score matching (``steinops.estimators.autotune``), together with the
            estimator's own knob where that is "auto" too; the choice is kept in ``tuned_``.
        backend: backend of the fused ops (see ``steinops.ops.backends``).
    """

    name = "base"

    def __init__(self, kernel="rbf", *, bandwidth="median", backend: str | None = None):
        self.kernel = get_kernel(kernel)
        if self.kernel.name not in ("rbf", "imq"):
            raise ValueError(f"kernel must be 'rbf' or 'imq', got {kernel!r}")
        if isinstance(bandwidth, str):
            if bandwidth.lower() not in BANDWIDTH_RULES + ("auto",):
                raise ValueError(f"bandwidth must be a positive number, a tensor, 'auto', or one of {BANDWIDTH_RULES}; "
                                 f"got {bandwidth!r}")
        elif not isinstance(bandwidth, torch.Tensor):
            _checks.positive_number("bandwidth", bandwidth)
        self.bandwidth, self.backend = bandwidth, backend

    def fit(self, x: torch.Tensor):
        """Estimate the scores at the samples x (..., M, d); returns self."""
        _checks.points("x", x, min_rows=2)
        self._out_dtype = x.dtype
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        self.tuned_ = None
        if isinstance(self.bandwidth, str) and self.bandwidth.lower() == "auto":
            self.tuned_ = tune(self.name, xf, kernel=self.kernel, backend=self.backend, **self._tune_kwargs())
            h = self.tuned_["bandwidth"]
        else:
            h = _checks.bandwidth_tensor(select_bandwidth(xf, self.bandwidth), xf.shape[:-2], xf)
        # centre once: every quantity is translation invariant and centring avoids cancellation
        self._centre = xf.detach().mean(-2, keepdim=True)
        self._x = xf - self._centre
        self.bandwidth_ = h
        G = self._fit(self._x, h)
        self._G = G
        self.scores_ = G.to(self._out_dtype)
        return self

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        """Out-of-sample estimates at ``query`` (..., N, d) (batch dims broadcast with the fit's)."""
        q = self._centred_query(query, "predict(query)")
        N, M = q.shape[-2], self._x.shape[-2]
        chunk = max(1, QUERY_CHUNK_ENTRIES // max(1, M * math.prod(self._x.shape[:-2])))  # memory O(chunk x M)
        out = [self._predict_chunk(q[..., i:i + chunk, :]) for i in range(0, N, chunk)]
        return torch.cat(out, -2).to(self._out_dtype)

    def _centred_query(self, query: torch.Tensor, what: str) -> torch.Tensor:
        """Validated queries (..., N, d), in the fit's dtype, centred like the samples."""
        if not hasattr(self, "_G"):
            raise RuntimeError(f"call fit(x) before {what}")
        _checks.points("query", query, check_finite=False)
        _checks.same_device(query=query, x=self._x)
        _checks.finite("query", query)
        if query.shape[-1] != self._x.shape[-1]:
            raise ValueError(f"query has {query.shape[-1]} features but the samples have {self._x.shape[-1]}")
        return query.to(self._x.dtype) - self._centre

    def _tune_kwargs(self) -> dict:
        """Arguments for ``autotune.tune`` beyond the bandwidth grid (e.g. a fixed knob value)."""
        return {}

    # -- to implement -------------------------------------------------------------------------
    def _fit(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Centred samples (..., M, d) and bandwidth (...) -> in-sample scores (..., M, d)."""
        raise NotImplementedError

    def _predict_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """Centred queries (..., n, d), one chunk -> scores (..., n, d)."""
        raise NotImplementedError

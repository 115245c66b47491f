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
from ..bandwidth import RULES as BANDWIDTH_RULES, median_distance, select_bandwidth
from ..kernels import get_kernel
from .autotune import AutoTune, candidate, tune

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
            estimator's regularisation knob (``knob``) where that is "auto" too; the choice is kept in
            ``tuned_``. An ``AutoTune(warm_start=..., tune_every=...)`` instance is "auto" with other
            settings (cheap refits in training loops).
        backend: backend of the fused ops (see ``steinops.ops.backends``).

    Subclasses with a regulariser name it in ``knob`` (e.g. "eta"), keep the user's value (number,
    tensor (...) or "auto") in that attribute, and give ``knob_grid(M)`` / ``knob_default(M)``; at fit
    ``knob_tensor(batch, like)`` is the value to use (the tuned one when "auto" was tuned).
    """

    name = "base"
    knob: str | None = None
    # bandwidth="auto" with the default criterion: a fresh search with M <= autotune.LOO_MAX scores candidates by
    # leave-one-out by refits, unless this is True and the estimator has the exact in-sample SURE on the samples
    # (measured per estimator on benchmarks/accuracy.py; see autotune's module docstring)
    small_search_uses_exact_sure: bool = False
    # bandwidth="auto": a fresh search whose choice sits at the grid's smallest bandwidth goes on below it
    # (``autotune.edge_extension``) unless the AutoTune settings say otherwise; every estimator here extends (measured
    # per estimator on benchmarks/accuracy.py; see autotune's module docstring)
    extends_edge: bool = True
    # bandwidth="auto": a fresh search whose choice has the knob grid's least-regularised value goes on past it
    # through ``knob_edge_values(M)`` (``autotune.knob_extension``) unless the AutoTune settings say otherwise
    extends_knob_edge: bool = False

    def __init__(self, kernel="rbf", *, bandwidth="median", backend: str | None = None):
        self.kernel = get_kernel(kernel)
        if self.kernel.name not in ("rbf", "imq"):
            raise ValueError(f"kernel must be 'rbf' or 'imq', got {kernel!r}")
        if isinstance(bandwidth, str):
            if bandwidth.lower() not in BANDWIDTH_RULES + ("auto",):
                raise ValueError(f"bandwidth must be a positive number, a tensor, 'auto', or one of {BANDWIDTH_RULES}; "
                                 f"got {bandwidth!r}")
        elif not isinstance(bandwidth, (torch.Tensor, AutoTune)):
            _checks.positive_number("bandwidth", bandwidth)
        self.bandwidth, self.backend = bandwidth, backend
        self._last_tuned, self._n_fits = None, 0

    def fit(self, x: torch.Tensor):
        """Estimate the scores at the samples x (..., M, d); returns self."""
        _checks.points("x", x, min_rows=2)
        self._out_dtype = x.dtype
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        self.tuned_ = None
        auto = self._autotune_settings()
        if auto is not None:
            prev = self._last_tuned
            if prev is not None and prev["bandwidth_mult"].shape != xf.shape[:-2]:
                prev = None
            if prev is not None and self._n_fits % auto.tune_every != 0:  # reuse the last choice
                self.tuned_ = dict(prev, bandwidth=prev["bandwidth_mult"] * median_distance(xf))
            else:
                gen = None if auto.seed is None else torch.Generator().manual_seed(auto.seed + self._n_fits)
                self.tuned_ = tune(self, xf, holdout=auto.holdout, folds=auto.folds, repeats=auto.repeats, se_rule=auto.se_rule,
                                   probes=auto.probes, criterion=auto.criterion, extend_edge=auto.extend_edge,
                                   extend_knob=auto.extend_knob,
                                   previous=prev if auto.warm_start else None, generator=gen)
            self._last_tuned = self.tuned_
            self._n_fits += 1
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

    def _autotune_settings(self) -> AutoTune | None:
        if isinstance(self.bandwidth, AutoTune):
            return self.bandwidth
        if isinstance(self.bandwidth, str) and self.bandwidth.lower() == "auto":
            return AutoTune()
        return None

    # -- the regularisation knob ----------------------------------------------------------------
    def knob_is_auto(self) -> bool:
        """Whether the knob is "auto" (tuned with ``bandwidth="auto"``, else its default)."""
        return self.knob is not None and isinstance(getattr(self, self.knob), str)

    def knob_grid(self, M: int) -> tuple:
        """Candidate knob values for M samples."""
        return ()

    def knob_default(self, M: int) -> float:
        """The knob's value for M samples when it is "auto" and not tuned."""
        raise NotImplementedError

    def knob_edge_values(self, M: int) -> tuple:
        """Knob values past the grid's least-regularised end, in the order the knob extension tries them."""
        return ()

    def knob_least_regularised(self, M: int) -> float:
        """The least-regularised candidate of ``knob_grid(M)`` (smallest ridge / lam; SSGE: largest eig_mass).

        For estimates that are averaged afterwards (regression targets of ``--method stein``) the bias of
        one fit matters and its variance does not; this value has the least shrinkage bias of the grid
        (``benchmarks/target_bias.py``)."""
        return min(self.knob_grid(M))

    def knob_tensor(self, batch_shape, like: torch.Tensor) -> torch.Tensor:
        """The knob to use in ``_fit``: tuned (...), given (number / tensor), or the default."""
        value = getattr(self, self.knob)
        if isinstance(value, str):
            tuned = self.tuned_.get(self.knob) if self.tuned_ is not None else None
            value = self.knob_default(like.shape[-2]) if tuned is None else tuned
        return self._check_knob(value, batch_shape, like)

    def _check_knob(self, value, batch_shape, like) -> torch.Tensor:
        return _checks.per_batch_positive(self.knob, value, batch_shape, like)

    def candidate(self, bandwidth, knob_value):
        """A fresh, unfitted copy with another bandwidth (...) and knob (...) (None: unchanged)."""
        return candidate(self, bandwidth, knob_value)

    def loo_model(self, x: torch.Tensor) -> "ScoreEstimator":
        """The model whose leave-one-out refits score this candidate on x (..., M, d) (``autotune.loo_terms``):
        itself, unless a setting chosen from the data must be held at the full fit's value (the SSGE's J)."""
        return self

    def spread_sets(self, spread) -> None:
        """Expand settings held per sample set (...) other than bandwidth and knob with ``spread`` ((...) ->
        (..., n)) for n batched refits per set (``autotune.loo_terms``)."""

    # -- to implement -------------------------------------------------------------------------
    def _fit(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Centred samples (..., M, d) and bandwidth (...) -> in-sample scores (..., M, d)."""
        raise NotImplementedError

    def _predict_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """Centred queries (..., n, d), one chunk -> scores (..., n, d)."""
        raise NotImplementedError

"""steinops: fused kernel ops and Stein score estimators for score-based generative models.

    import steinops
    scores = steinops.stein_score(x)            # grad log q at the samples x (..., M, d)
    scores = steinops.stein_score(x, query)     # ... at new points
    Kv = steinops.kernel_matvec(x, y, v, kernel="rbf", bandwidth=1.0)   # K(x, y) @ v, never N x M
"""
from ._checks import set_value_checks
from .estimators import (
    ESTIMATORS, AutoTune, KEFScoreEstimator, LandweberScoreEstimator, NuMethodScoreEstimator, ScoreEstimator,
    SpectralScoreEstimator, SteinScoreEstimator, score_estimator, sharded_stein_score, stein_score, window_score,
)
from .kernels import IMQ, RBF, KernelProfile, get_kernel
from .ops import gram, kernel_matvec, ksd, stein_term
from .ops.backends import BACKENDS, resolve as resolve_backend

__version__ = "0.1.0"

__all__ = [
    "AutoTune", "ESTIMATORS", "KEFScoreEstimator", "LandweberScoreEstimator", "NuMethodScoreEstimator", "SpectralScoreEstimator",
    "BACKENDS", "IMQ", "RBF", "KernelProfile", "SteinScoreEstimator", "gram", "get_kernel", "kernel_matvec", "ksd",
    "ScoreEstimator", "resolve_backend", "score_estimator", "set_value_checks", "sharded_stein_score", "stein_score",
    "stein_term", "window_score",
]

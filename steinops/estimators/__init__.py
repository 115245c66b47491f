"""Score estimators built on the fused ops: fit / predict classes, a registry, and thin functions."""
from .autotune import AutoTune
from .base import ESTIMATORS, ScoreEstimator, register, score_estimator
from .spectral import SpectralScoreEstimator
from .kef import KEFScoreEstimator, LandweberScoreEstimator, NuMethodScoreEstimator
from .stein import SteinScoreEstimator, stein_score
from .sharded import sharded_stein_score
from .window import window_score

__all__ = ["AutoTune", "ESTIMATORS", "KEFScoreEstimator", "LandweberScoreEstimator", "NuMethodScoreEstimator", "ScoreEstimator", "SpectralScoreEstimator", "SteinScoreEstimator", "register", "score_estimator", "sharded_stein_score", "stein_score", "window_score"]

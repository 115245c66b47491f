"""Score estimators built on the fused ops: fit / predict classes, a registry, and thin functions."""
from .base import ESTIMATORS, ScoreEstimator, register, score_estimator
from .stein import SteinScoreEstimator, stein_score

__all__ = ["ESTIMATORS", "ScoreEstimator", "SteinScoreEstimator", "register", "score_estimator", "stein_score"]

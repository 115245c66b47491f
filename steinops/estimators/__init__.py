"""Score estimators built on the fused ops (fit / predict classes and thin functions)."""
from .stein import SteinScoreEstimator, stein_score

__all__ = ["SteinScoreEstimator", "stein_score"]

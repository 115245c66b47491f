"""Distributions with exact scores of their noise-convolved versions (for tests, benchmarks, training)."""
from .gaussian_mixture import GaussianMixture, two_mode_mixture

__all__ = ["GaussianMixture", "two_mode_mixture"]

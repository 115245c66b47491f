"""Distributions with exact scores of their noise-convolved versions (for tests, benchmarks, training).

Every distribution ``p`` has ``p.dim``, ``p.sample(n, sigma=0.0, *, generator=None) -> (n, d)``,
``p.score(x, sigma) -> (..., d)`` (the score of q_sigma = q * N(0, sigma^2 I)) and
``p.log_prob(x, sigma) -> (...)``; all float64 by default. Singular / discontinuous clean laws
(``p.singular``: rings, checkerboard, curves, subspace mixtures, spheres) need sigma > 0 and raise
ValueError naming ``sigma`` at sigma = 0. ``get_distribution(name, **kw)`` builds one by name.
"""
from __future__ import annotations

from .anisotropic import FullCovGaussianMixture, SubspaceGaussianMixture, random_gmm, random_subspace_gmm
from .base import ScoreDistribution
from .gaussian_mixture import GaussianMixture, eight_gaussians, two_mode_mixture
from .planar import Checkerboard, CurveDistribution, spiral, two_moons
from .sphere import MixtureOf, UniformSphere, concentric_rings

REGISTRY = {
    "two_mode": two_mode_mixture,  # (d=2, separation=5.0, weights=(0.8, 0.2))
    "eight_gaussians": eight_gaussians,  # (radius=4.0, std=0.5)
    "rings": concentric_rings,  # (radii=(1, 2, 3), weights=None)
    "checkerboard": Checkerboard,  # (n_cells=4, cell_size=2.0)
    "moons": two_moons,  # (scale=1.0)
    "spiral": spiral,  # (turns=1.5, scale=1.0)
    "gmm": random_gmm,  # (d=2, n_components=4, mean_scale=3.0, eig_range=(0.25, 2.0), seed=0)
    "subspace_gmm": random_subspace_gmm,  # (D=10, k=2, n_components=3, ..., seed=0)
    "sphere": UniformSphere,  # (D=3, k=2, radius=1.0, basis=None, center=None, seed=0)
}


def get_distribution(name: str, **kw) -> ScoreDistribution:
    """Build a registered distribution: one of ``REGISTRY`` (keyword arguments go to its factory)."""
    try:
        factory = REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"name must be one of {sorted(REGISTRY)}, got {name!r}") from None
    return factory(**kw)


__all__ = [
    "Checkerboard",
    "CurveDistribution",
    "FullCovGaussianMixture",
    "GaussianMixture",
    "MixtureOf",
    "REGISTRY",
    "ScoreDistribution",
    "SubspaceGaussianMixture",
    "UniformSphere",
    "concentric_rings",
    "eight_gaussians",
    "get_distribution",
    "random_gmm",
    "random_subspace_gmm",
    "spiral",
    "two_mode_mixture",
    "two_moons",
]

"""Fused primitives: one file per op (custom op + autograd + dispatch); backends in ``backends.py``."""
from .gram import gram
from .kernel_matvec import kernel_matvec
from .ksd import ksd
from .stein_term import stein_term

__all__ = ["gram", "kernel_matvec", "ksd", "stein_term"]

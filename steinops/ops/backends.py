"""Backend registry and selection.

A backend implements the contract of ``csrc/README.md`` (``kmv_forward``, ``kmv_xgrad``,
``gram_forward`` on flattened, contiguous ``(B, ., .)`` tensors with an integer kernel id):

    reference  plain PyTorch (``ops/reference.py``); any device, float64-capable, materialises N x M
    cpu        the C++ kernels of ``steinops._C`` (OpenMP, tiled); CPU tensors, float32/float64
    triton     the Triton kernels of ``ops/_triton``; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    cuda       the CUDA kernels of ``steinops._C`` (forward kernel product); the other ops use Triton

Selection: the ``backend=`` argument of an op, else the environment variable ``STEINOPS_BACKEND``,
else by device: CPU -> cpu (reference if the extension is not built), CUDA -> triton (cuda if Triton
is missing, reference if both are).
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ..kernels import kernel_by_id
from . import reference

BACKENDS = ("reference", "cpu", "triton", "cuda")


def _load_extension():
    try:
        return importlib.import_module("steinops._C")
    except ImportError:
        return None


# Looked up once at import (cheaply: triton itself is imported only when first used), so that
# backend selection is plain attribute reads that torch.compile can trace.
_EXTENSION = _load_extension()
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def compiled_extension():
    """``steinops._C`` or None when it is not built."""
    return _EXTENSION


def triton_available() -> bool:
    return _HAS_TRITON


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_extension_available() -> bool:
    ext = compiled_extension()
    return ext is not None and bool(getattr(ext, "has_cuda", lambda: False)())


def available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on tensors on ``device``."""
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu" and compiled_extension() is not None
    if name == "triton":
        return triton_available() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreting()))
    if name == "cuda":
        return device.type == "cuda" and cuda_extension_available()
    return False


def resolve(backend: str | None, device: torch.device) -> str:
    """The concrete backend name for an op on ``device`` (see the module docstring)."""
    name = backend if backend is not None else os.environ.get("STEINOPS_BACKEND") or "auto"
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    name = name.lower()
    if name == "auto":
        order = ("cpu", "reference") if device.type == "cpu" else ("triton", "cuda", "reference")
        return next(n for n in order if available(n, device))
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if not available(name, device):
        raise ValueError(f"backend {name!r} is not available for {device.type} tensors in this installation")
    return name


# ---- the per-backend implementations, called by the custom ops with a resolved name -------------

def _ref_call(fn, *args, kid):
    return fn(*args, kernel_by_id(kid).name)


# kernel ids the CUDA kernel product supports (RBF, IMQ, IMQ cubed, IMQ^5); any other goes to Triton
_CUDA_KERNEL_IDS = (0, 1, 2, 3)


def _beyond_cuda(name):
    """The CUDA extension has only the forward kernel product: other ops run on Triton (or PyTorch)."""
    if name != "cuda":
        return name
    return "triton" if triton_available() else "reference"


def kmv_forward(name, x, y, v, h, kid):
    if name == "cpu" or (name == "cuda" and kid in _CUDA_KERNEL_IDS):
        return torch.ops.steinops_C.kmv_forward(x, y, v, h, kid)
    name = _beyond_cuda(name)
    if name == "triton":
        from ._triton import kernel_matvec as tk
        return tk.kmv_forward(x, y, v, h, kid)
    return _ref_call(reference.kmv_forward, x, y, v, h, kid=kid)


def kmv_xgrad(name, x, y, v, g, h, kid):
    if name == "cpu":
        return torch.ops.steinops_C.kmv_xgrad(x, y, v, g, h, kid)
    name = _beyond_cuda(name)
    if name == "triton":
        from ._triton import kernel_matvec as tk
        return tk.kmv_xgrad(x, y, v, g, h, kid)
    return _ref_call(reference.kmv_xgrad, x, y, v, g, h, kid=kid)


def gram_forward(name, x, y, h, kid, stein):
    if name == "cpu":
        return torch.ops.steinops_C.gram_forward(x, y, h, kid, stein)
    name = _beyond_cuda(name)
    if name == "triton":
        from ._triton import gram as tg
        return tg.gram_forward(x, y, h, kid, stein)
    return reference.gram_forward(x, y, h, kernel_by_id(kid).name, stein)

"""Argument checks shared by the ops and the estimators.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong value) with the
argument's name. Checks that read tensor VALUES (finiteness, positivity) force a device sync, so they
are skipped while ``torch.compile`` traces and can be switched off with ``set_value_checks(False)``.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch

_VALUE_CHECKS = True


def set_value_checks(enabled: bool) -> None:
    """Turn the value checks (finite inputs, positive bandwidth) on or off globally."""
    global _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)


@contextlib.contextmanager
def value_checks_suspended():
    """Skip the value checks inside the block: for inner loops over inputs checked once already
    (each check reads the whole tensor and, on a GPU, synchronises)."""
    global _VALUE_CHECKS
    prev, _VALUE_CHECKS = _VALUE_CHECKS, False
    try:
        yield
    finally:
        _VALUE_CHECKS = prev


def value_checks_enabled() -> bool:
    return _VALUE_CHECKS and not torch.compiler.is_compiling()


def points(name: str, t, min_rows: int = 1, *, check_finite: bool = True) -> torch.Tensor:
    """A floating tensor of shape (..., rows, features) (and finite values unless told otherwise)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (..., rows, features), got shape {tuple(t.shape)}")
    if t.shape[-2] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (points), got shape {tuple(t.shape)}")
    if t.shape[-1] < 1:
        raise ValueError(f"{name} has no features: shape {tuple(t.shape)}")
    if check_finite:
        finite(name, t)
    return t


def finite(name: str, t: torch.Tensor) -> None:
    if value_checks_enabled() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def same_device(**tensors) -> torch.device:
    devices = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    first = next(iter(devices.values()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"all tensors must be on one device: {n} is on {d}, others on {first}")
    return first


def same_dtype(**tensors) -> torch.dtype:
    dtypes = {n: t.dtype for n, t in tensors.items()}
    first_name, first = next(iter(dtypes.items()))
    for n, dt in dtypes.items():
        if dt != first:
            raise TypeError(f"{n} has dtype {dt} but {first_name} has {first}; cast them to one dtype")
    return first


def flag(name: str, value) -> bool:
    """A True / False option (not 0 / 1 or a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def per_batch_positive(name: str, value, batch_shape, like: torch.Tensor) -> torch.Tensor:
    """A positive, finite parameter as a tensor of shape ``batch_shape`` (dtype/device of ``like``):
    a number, or a floating tensor broadcastable to the batch shape (kept differentiable)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the points are on {like.device}")
        try:
            t = value.to(like.dtype).expand(batch_shape)
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to the batch shape {tuple(batch_shape)}"
            ) from None
        if value_checks_enabled() and not bool(((t > 0) & torch.isfinite(t)).all()):
            raise ValueError(f"{name} must be positive and finite")
        return t
    return torch.full(batch_shape, positive_number(name, value), dtype=like.dtype, device=like.device)


def bandwidth_tensor(bandwidth, batch_shape, like: torch.Tensor) -> torch.Tensor:
    """The bandwidth as a tensor of shape ``batch_shape`` (a number, or a tensor broadcastable to it)."""
    if isinstance(bandwidth, str):
        raise ValueError(f"the ops take a numeric bandwidth; got {bandwidth!r} (named heuristics belong to the estimators)")
    return per_batch_positive("bandwidth", bandwidth, batch_shape, like)

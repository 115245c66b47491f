"""Turn user-facing tensors into the flattened, contiguous form every backend takes."""
from __future__ import annotations

import torch

from .. import _checks
from . import backends

# The C++ and reference backends compute in float32/float64 only; half inputs are upcast there.
_CPU_DTYPES = (torch.float32, torch.float64)


def flatten_batch(t: torch.Tensor, batch_shape) -> torch.Tensor:
    """(..., R, C) broadcast to ``batch_shape + (R, C)`` then viewed as (B, R, C), contiguous."""
    return t.expand(*batch_shape, *t.shape[-2:]).reshape(-1, *t.shape[-2:]).contiguous()


def compute_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    if backend in ("cpu", "reference") and dtype not in _CPU_DTYPES:
        return torch.float32
    return dtype


def prepare_pair(x, y, bandwidth, backend, *, x_name="x", y_name="y", extra=()):
    """Check and prepare points ``x (..., N, d)``, ``y (..., M, d)`` and the bandwidth.

    Returns ``(xc, yc, h, batch_shape, backend_name, dtype)``: the points centred on the mean of y
    (stationary kernels are translation invariant; centring keeps dot-form distances accurate),
    broadcast over the common batch shape and flattened to (B, ., d); h of shape (B,).
    ``extra`` is a sequence of ``(name, tensor)`` with shape (..., rows, E) that share the batch.
    """
    _checks.points(x_name, x, check_finite=False)
    _checks.points(y_name, y, check_finite=False)
    named = {x_name: x, y_name: y, **dict(extra)}
    device = _checks.same_device(**named)
    dtype = _checks.same_dtype(**named)
    for n, t in named.items():
        _checks.finite(n, t)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"{x_name} and {y_name} must have the same number of features: {x.shape[-1]} vs {y.shape[-1]}"
        )
    shapes = [t.shape[:-2] for t in named.values()]
    if isinstance(bandwidth, torch.Tensor):
        shapes.append(bandwidth.shape)
    try:
        batch_shape = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(
            "batch dimensions do not broadcast: " + ", ".join(f"{n} {tuple(t.shape)}" for n, t in named.items())
        ) from None
    name = backends.resolve(backend, device)
    cdtype = compute_dtype(dtype, name)
    h = _checks.bandwidth_tensor(bandwidth, batch_shape, x.new_empty(0, dtype=cdtype)).reshape(-1)
    centre = y.detach().mean(-2, keepdim=True)
    xc = flatten_batch((x - centre).to(cdtype), batch_shape)
    yc = flatten_batch((y - centre).to(cdtype), batch_shape)
    return xc, yc, h, batch_shape, name, dtype

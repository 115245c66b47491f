"""Shared test set-up. TRITON_INTERPRET must be set before anything imports triton, so the Triton
kernels run on CPU tensors here (CI has no GPU)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from steinops.ops import backends  # noqa: E402


def cpu_backends():
    """Backends that can run on CPU tensors in this installation (Triton through its interpreter)."""
    names = ["reference"]
    if backends.available("cpu", torch.device("cpu")):
        names.append("cpu")
    if backends.available("triton", torch.device("cpu")):
        names.append("triton")
    return names


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def poison_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def relative_fisher_error(est: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((est - exact) ** 2).sum() / (exact**2).sum())

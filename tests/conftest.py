"""Shared test set-up. Without a GPU, TRITON_INTERPRET=1 is set before anything imports triton, so
the Triton kernels run on CPU tensors (CI has no GPU). With a GPU they compile for it; set
TRITON_INTERPRET=1 yourself to test the interpreter path there too."""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

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


@pytest.fixture
def poison_uninitialized_memory():
    """Every uninitialised allocation (torch.empty in Python, at::empty in C++) is filled with NaN
    (torch's deterministic mode fills uninitialised memory), so an output element a kernel forgets to
    write, or a scratch buffer it reads before writing, shows up as NaN."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all()
    yield
    torch.use_deterministic_algorithms(prev)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def relative_fisher_error(est: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((est - exact) ** 2).sum() / (exact**2).sum())

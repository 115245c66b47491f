"""Process-group setup for ``torchrun --nproc_per_node N -m train ...`` (DistributedDataParallel).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; with WORLD_SIZE > 1 the driver joins the default process
group (NCCL on CUDA devices, gloo on CPU). How the work is split:

- every rank draws the same global batch, noise levels and noise from the shared seed (cheap next to the
  network) and keeps its slice of every noise-level group (``NoisyBatch.shard``), so the ranks together
  train on exactly the single-process batch;
- DDP averages the gradients, so each step equals a single-process step with the same global batch
  (dsm, sm, and stein / ksd with ``--gather``; ssm draws its projections per rank);
- rank 0 alone writes metrics, checkpoints, samples and plots.

The objectives that differentiate the model in forward mode (ssm, ssm-vr, sm: ``torch.func.jvp``) cannot
run through DDP's forward (its reducer does not accept functorch's dual tensors); for them the driver calls
the bare module and averages the gradients itself (``average_gradients``): the same arithmetic as DDP,
without its overlap of communication and backward.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from steinops.sgm.distributed import rank_and_world


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_option: str) -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device.

    device_option: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda" or "cuda:N".
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_option == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    elif device_option == "cuda" and launched_by_torchrun():
        device = torch.device(f"cuda:{local}")
    else:
        device = torch.device(device_option)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device_option!r}: CUDA is not available on this machine")
        torch.cuda.set_device(device)
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The average of each float over the ranks (one all-reduce); the identity in one process."""
    world = rank_and_world()[1]
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= world
    return dict(zip(keys, t.tolist()))


def average_gradients(model: torch.nn.Module):
    """All-reduce-average every parameter's gradient over the ranks (in one flat buffer)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    world = rank_and_world()[1]
    if not grads or world == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()

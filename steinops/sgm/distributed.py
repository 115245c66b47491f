"""Noise-level groups split across ``torch.distributed`` ranks.

With data parallelism every rank holds a slice of each noise-level group: rank r of W holds rows
[r m/W, (r+1) m/W) of a group of m samples (``NoisyBatch.shard``). Stein and KSD objectives can estimate
on that local slice (no communication, m/W samples per estimate) or on the whole group gathered from all
ranks (one all-gather of the noisy samples per step, the same estimate as one process with the global
batch). Outside an initialised process group (or with one process) everything here is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_groups(t: Tensor, *, differentiable: bool = False) -> Tensor:
    """All-gather the group slices of every rank: (G, m_local, ...) per rank -> (G, W m_local, ...), rank r's
    rows at [r m_local, (r+1) m_local). ``differentiable=True`` uses ``torch.distributed.nn``'s all-gather,
    whose backward sums the gradients that every rank's loss sends to each slice (so a loss computed
    identically on all ranks, averaged by DDP, gets the single-process gradient)."""
    rank, world = rank_and_world()
    if world == 1:
        return t
    if differentiable:
        from torch.distributed.nn.functional import all_gather as all_gather_autograd
        parts = all_gather_autograd(t.contiguous())
    else:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
    return torch.cat(list(parts), 1)


def local_rows(t: Tensor, m_local: int) -> Tensor:
    """This rank's slice [r m_local, (r+1) m_local) of dimension 1 of a gathered (G, W m_local, ...) tensor."""
    rank, world = rank_and_world()
    if world == 1:
        return t
    return t[:, rank * m_local:(rank + 1) * m_local]

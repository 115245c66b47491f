"""Noise-conditional score networks s(x, sigma) ~ grad log q_sigma(x) and their weight EMA.

Every network takes ``x`` (N, *shape) and ``sigma`` (N,) (or a scalar, broadcast) and returns (N, *shape).
Following NCSNv2, the raw output is divided by sigma, so an untrained network already has the right
1/sigma scale and the sigma^2-weighted objectives see targets of order one at every level.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def _sigma_column(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as an (N,) tensor on x's device/dtype; ValueError unless positive and finite."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


class FourierNoiseEmbedding(nn.Module):
    """log(sigma) -> [sin(2 pi w log sigma), cos(2 pi w log sigma)] with fixed random frequencies w ~ N(0, scale^2)."""

    def __init__(self, dim: int = 64, scale: float = 1.0, seed: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embed_dim must be even, got {dim}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freq", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        a = 2 * math.pi * torch.log(sigma).unsqueeze(-1) * self.freq.to(sigma.dtype)
        return torch.cat([torch.sin(a), torch.cos(a)], -1)


ACTIVATIONS = {"softplus": nn.Softplus, "silu": nn.SiLU, "elu": nn.ELU, "tanh": nn.Tanh}


class ScoreMLP(nn.Module):
    """sigma-conditioned MLP for vector data: s(x, sigma) = MLP([x, emb(log sigma)]) / sigma.

    Args:
        dim: data dimension d.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        embed_dim: size of the Fourier embedding of log sigma (concatenated to the input and added to
            every hidden layer through a linear map, so the field can change shape across levels).
        activation: one of ``ACTIVATIONS`` (softplus as in the NCSN toy; smooth, so SM/SSM Jacobians exist).
    Shapes: x (N, d), sigma (N,) or scalar -> (N, d).
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, embed_dim: int = 32, activation: str = "softplus"):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth), ("embed_dim", embed_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.dim = dim
        self.embed = FourierNoiseEmbedding(embed_dim)
        self.inp = nn.Linear(dim + embed_dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.cond = nn.ModuleList(nn.Linear(embed_dim, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        sigma = _sigma_column(sigma, x)
        e = self.embed(sigma)
        h = self.act(self.inp(torch.cat([x, e], -1)))
        for lin, cond in zip(self.hidden, self.cond):
            h = self.act(lin(h) + cond(e))
        return self.out(h) / sigma.unsqueeze(-1)


def ema_model(model: nn.Module, decay: float = 0.999) -> AveragedModel:
    """Exponential moving average of ``model``'s weights (``torch.optim.swa_utils.AveragedModel``);
    call ``.update_parameters(model)`` after every optimiser step; the EMA network is ``.module``."""
    if not (0.0 <= decay < 1.0):
        raise ValueError(f"ema_decay must be in [0, 1), got {decay!r}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

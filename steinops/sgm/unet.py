"""A sigma-conditioned U-Net score network for images, s(x, sigma) ~ grad log q_sigma(x).

Layout (DDPM / NCSN++ style): conv_in -> encoder (``len(channel_mult)`` resolutions of ``n_res_blocks``
residual blocks, a stride-2 conv between resolutions) -> middle (res block, self-attention, res block)
-> decoder (mirror of the encoder, ``n_res_blocks + 1`` blocks per resolution, each fed the concatenation
of the running features and one saved encoder activation; nearest-neighbour upsampling + conv3x3)
-> GroupNorm -> SiLU -> conv3x3 -> divided by sigma (NCSNv2 convention, as ``ScoreMLP``).

Every residual block hears the noise level through a per-channel scale and shift computed from an
embedding of log sigma. The last conv of every residual block, the attention output projection and the
output conv start at zero, so every block starts as its skip path and the untrained network outputs
exactly 0; training grows the residual branches from there (stable at any depth).

Only smooth, out-of-place ops are used (GroupNorm, SiLU, conv, softmax attention written with einsum),
so the network supports double backward, ``torch.func.jvp`` (forward mode, used by
``objectives.score_and_vjv``) and reverse-over-forward.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .networks import FourierNoiseEmbedding, _sigma_column

# Frequency scale of the Fourier features of log sigma: with scale 16, levels 1% apart in sigma already
# differ by about one radian of phase in a typical feature (NCSN++ uses the same value).
FOURIER_SCALE = 16.0


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with gcd(groups, channels) groups, so any channel count is accepted. Per-sample
    statistics: no coupling between the samples of a batch (unlike BatchNorm)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """h -> skip(h) + conv2(dropout(SiLU(GN(conv1(SiLU(GN(h)))) * (1 + a) + b))), [a, b] = W_e emb.

    The noise embedding enters as a per-channel scale and shift applied after the second GroupNorm
    (FiLM, as in improved DDPM): a bias added before a GroupNorm loses its group mean, and all of it
    when a group holds one channel, whereas a shift after the norm always reaches the output.
    ``skip`` is a 1x1 conv when the channel count changes, the identity otherwise; ``conv2`` starts at
    zero, so the block starts as ``skip``.
    Shapes: h (N, c_in, H, W), emb (N, embed_dim) -> (N, c_out, H, W).
    """

    def __init__(self, c_in: int, c_out: int, embed_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(embed_dim, 2 * c_out)
        self.norm2 = _norm(c_out, groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        r = self.conv1(F.silu(self.norm1(h)))
        r = self.norm2(r) * (1 + scale) + shift
        r = self.conv2(self.drop(F.silu(r)))
        return self.skip(h) + r


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, residual:
    h + proj(V softmax(Q^T K / sqrt(c))^T) with [Q, K, V] = qkv(GN(h)) (1x1 convs; ``proj`` starts at zero).
    Shapes: h (N, c, H, W) -> (N, c, H, W). Written with einsum + softmax (not the fused SDPA kernels),
    which have forward-mode and double-backward derivatives everywhere.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = h.shape
        q, k, v = self.qkv(self.norm(h)).reshape(n, 3, c, hh * ww).unbind(1)
        attn = torch.softmax(torch.einsum("ncp,ncq->npq", q, k) / math.sqrt(c), dim=-1)  # (N, P, P)
        out = torch.einsum("npq,ncq->ncp", attn, v).reshape(n, c, hh, ww)
        return h + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 conv3x3: (N, c, H, W) -> (N, c, H/2, W/2) (H, W even)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(h)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3: (N, c, H, W) -> (N, c, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class ScoreUNet(nn.Module):
    """sigma-conditioned U-Net for images: s(x, sigma) = UNet(x, emb(log sigma)) / sigma.

    Args:
        image_shape: (C, H, W); H and W must be divisible by 2**(len(channel_mult) - 1)
            (e.g. 28 -> 14 -> 7 or 8 -> 4 -> 2 with three resolutions).
        width: channels at the first resolution; resolution i has ``width * channel_mult[i]``.
        channel_mult: channel multiplier per resolution (one entry per resolution).
        n_res_blocks: residual blocks per resolution in the encoder (the decoder has one more).
        attention: add single-head self-attention in the middle (lowest resolution) block.
        embed_dim: size of the noise embedding fed to every residual block (default ``4 * width``):
            Fourier features of log sigma (frequency scale ``FOURIER_SCALE``) -> Linear -> SiLU -> Linear
            -> SiLU; each residual block maps it linearly to a per-channel scale and shift.
        dropout: dropout rate inside the residual blocks (between their two convs).
        groups: GroupNorm groups; a layer with c channels uses gcd(groups, c).
    Shapes: x (N, C, H, W), sigma (N,) or scalar (positive) -> (N, C, H, W).

    The residual branches and the output conv start at zero, so the untrained network returns 0.
    """

    def __init__(self, image_shape: Sequence[int], width: int = 32, channel_mult: Sequence[int] = (1, 2, 2),
                 n_res_blocks: int = 2, attention: bool = True, embed_dim: int | None = None,
                 dropout: float = 0.0, groups: int = 8):
        super().__init__()
        image_shape = tuple(image_shape) if isinstance(image_shape, Sequence) else image_shape
        if (not isinstance(image_shape, tuple) or len(image_shape) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in image_shape)):
            raise ValueError(f"image_shape must be three positive integers (C, H, W), got {image_shape!r}")
        _positive_int("width", width)
        if (not isinstance(channel_mult, Sequence) or len(channel_mult) == 0
                or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in channel_mult)):
            raise ValueError(f"channel_mult must be a non-empty sequence of positive integers, got {channel_mult!r}")
        _positive_int("n_res_blocks", n_res_blocks)
        embed_dim = 4 * width if embed_dim is None else _positive_int("embed_dim", embed_dim)
        if not isinstance(attention, bool):
            raise ValueError(f"attention must be a bool, got {attention!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        _positive_int("groups", groups)
        c_img, height, wid = image_shape
        factor = 2 ** (len(channel_mult) - 1)
        if height % factor or wid % factor:
            raise ValueError(f"image_shape {image_shape}: H and W must be divisible by 2**(len(channel_mult) - 1)"
                             f" = {factor} for {len(channel_mult)} resolutions")
        self.image_shape = image_shape

        fourier_dim = 2 * ((width + 1) // 2)  # FourierNoiseEmbedding needs an even size
        self.noise_embed = FourierNoiseEmbedding(fourier_dim, scale=FOURIER_SCALE)
        self.embed_mlp = nn.Sequential(nn.Linear(fourier_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

        def res(c_in, c_out):
            return ResBlock(c_in, c_out, embed_dim, dropout, groups)

        self.conv_in = nn.Conv2d(c_img, width, 3, padding=1)
        # Encoder: every block's output (and conv_in's, and each downsample's) is saved for the decoder.
        self.down = nn.ModuleList()
        skip_channels, ch = [width], width
        for i, mult in enumerate(channel_mult):
            for _ in range(n_res_blocks):
                self.down.append(res(ch, width * mult))
                ch = width * mult
                skip_channels.append(ch)
            if i < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
        self.mid1 = res(ch, ch)
        self.mid_attn = SelfAttention(ch, groups) if attention else nn.Identity()
        self.mid2 = res(ch, ch)
        # Decoder: n_res_blocks + 1 blocks per resolution, each consuming one saved activation (LIFO).
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(n_res_blocks + 1):
                self.up.append(res(ch + skip_channels.pop(), width * mult))
                ch = width * mult
            if i > 0:
                self.up.append(Upsample(ch))
        assert not skip_channels
        self.norm_out = _norm(ch, groups)
        self.conv_out = _zero(nn.Conv2d(ch, c_img, 3, padding=1))

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        sigma = _sigma_column(sigma, x)
        # Value check needs a host sync (a graph break under torch.compile), so it is skipped when compiling.
        if not torch.compiler.is_compiling() and not bool(((sigma > 0) & torch.isfinite(sigma)).all()):
            raise ValueError("sigma must be positive and finite")
        emb = F.silu(self.embed_mlp(self.noise_embed(sigma)))

        h = self.conv_in(x)
        saved = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            saved.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            h = layer(torch.cat([h, saved.pop()], 1), emb) if isinstance(layer, ResBlock) else layer(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out / sigma[:, None, None, None]

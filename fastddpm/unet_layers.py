"""The U-Net's layers (Ho et al. 2020, improved DDPM): timestep embedding, residual and attention
blocks, resampling and the stages that group them. Every shape decision is static Python."""
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["sinusoidal_embedding", "TimestepEmbedding", "ResBlock", "SelfAttention", "Downsample", "Upsample",
           "DownStage", "UpStage", "MidBlock", "zero_init"]


def sinusoidal_embedding(t, dim, *, flip_sin_to_cos=False, freq_shift=1, max_period=10000.0):
    """Transformer sinusoids of a (B,) timestep tensor, float32 (B, dim), on t's device.

    Frequencies are `max_period ** (-i / (dim / 2 - freq_shift))`; halves are [sin, cos], or
    [cos, sin] with `flip_sin_to_cos`. Ho et al.: flip False, shift 1; improved-diffusion:
    flip True, shift 0 (diffusers' `Timesteps` uses the same two options).
    """
    half = dim // 2
    # Same operation order as diffusers and improved-diffusion, so the float32 rounding agrees.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    # float32 holds every integer timestep below 2**24 exactly.
    args = t.to(torch.float32)[:, None] * exponent.exp()[None, :]
    halves = (args.cos(), args.sin()) if flip_sin_to_cos else (args.sin(), args.cos())
    return torch.cat(halves, dim=1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of t followed by Linear, SiLU, Linear."""

    def __init__(self, channels, embed_dim, *, flip_sin_to_cos, freq_shift):
        super().__init__()
        self.channels = channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t):
        emb = sinusoidal_embedding(t, self.channels, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; add the timestep projection (or scale-shift the second norm);
    GroupNorm, SiLU, dropout, conv; plus a 1x1 conv skip when the width changes."""

    def __init__(self, in_channels, out_channels, embed_dim, *, dropout, use_scale_shift_norm, norm_groups, norm_eps):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(embed_dim, out_channels * (2 if use_scale_shift_norm else 1))
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, emb):
        """`emb` is the SiLU of the conditioning embedding, shared by every block."""
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.emb_proj(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all positions, with a residual connection."""

    def __init__(self, channels, num_heads, *, norm_groups, norm_eps):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_groups, channels, eps=norm_eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three heads d) h w -> three b heads (h w) d",
                            three=3, heads=self.num_heads)
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b heads (h w) d -> b (heads d) h w", h=x.shape[2])
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. `bottom_right` pads one row and column after the image, as
    TensorFlow's SAME padding did in Ho et al. (diffusers' `downsample_padding=0`)."""

    def __init__(self, channels, pad):
        super().__init__()
        self.pad_bottom_right = pad == "bottom_right"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.pad_bottom_right else 1)

    def forward(self, x):
        if self.pad_bottom_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownStage(nn.Module):
    """One resolution of the encoder; pushes every output onto `skips`."""

    def __init__(self, resnets, attentions, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.downsample = downsample

    def forward(self, h, emb, skips):
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions:
                h = self.attentions[i](h)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h


class UpStage(nn.Module):
    """One resolution of the decoder; each block concatenates a skip popped from `skips`."""

    def __init__(self, resnets, attentions, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.upsample = upsample

    def forward(self, h, emb, skips):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if self.attentions:
                h = self.attentions[i](h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution."""

    def __init__(self, resnets, attention):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attention = attention

    def forward(self, h, emb):
        return self.resnets[1](self.attention(self.resnets[0](h, emb)), emb)


def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module

"""Tiny models for the interoperability tests: random, built here, nothing downloaded.

A random U-Net is no denoiser: its DDIM flow multiplies a perturbation by sqrt(ab_prev / ab) each
step (about 160 over a trajectory) where a trained model's x0_hat cancels it, so float32 rounding
of 1e-7 grows to 1e-2 whoever computes the steps. `Denoiser` and `TinyDenoiser` add the exact
eps of Gaussian data N(0, 0.5²) to a random network's output, so that two samplers' outputs are
as far apart as their arithmetic, not as the model's chaos.
"""
import types

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

UNET_CONFIG = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=4)
DATA_STD = 0.5
ALPHAS_CUMPROD = DDPMScheduler().alphas_cumprod  # of the default (linear) schedule the tests sample with


def gaussian_eps(x, ab):
    """E[eps | x_t] for x0 ~ N(0, DATA_STD²): x_t sqrt(1 - ab) / (ab DATA_STD² + 1 - ab)."""
    ab = ab.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return x * (1 - ab).sqrt() / (ab * DATA_STD ** 2 + 1 - ab)


def tiny_unet(seed=0, **overrides):
    """A random diffusers UNet2DModel of 8x8 RGB images (about 40k parameters)."""
    torch.manual_seed(seed)
    return UNet2DModel(**{**UNET_CONFIG, **overrides})


class Denoiser(UNet2DModel):
    """A UNet2DModel whose output is Gaussian data's eps plus a tenth of the random network's."""

    def forward(self, sample, timestep, **kwargs):
        ab = ALPHAS_CUMPROD.to(sample.device)[torch.as_tensor(timestep, device=sample.device).long()]
        out = super().forward(sample, timestep, **kwargs).sample
        return UNet2DOutput(sample=gaussian_eps(sample, ab) + 0.1 * out)


def denoiser(seed=0):
    torch.manual_seed(seed)
    return Denoiser(**UNET_CONFIG)


class TinyDenoiser(torch.nn.Module):
    """Gaussian data's eps plus 0.02 tanh(conv(x)): cheap enough for 1000-step pipelines. It has
    what DDPMPipeline and DDIMPipeline read of a UNet2DModel: config.sample_size, config.in_channels,
    dtype, device, and an output with `.sample`."""

    def __init__(self, channels=3, size=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.register_buffer("alphas_cumprod", ALPHAS_CUMPROD.clone())
        self.config = types.SimpleNamespace(sample_size=size, in_channels=channels)

    dtype = property(lambda self: self.conv.weight.dtype)
    device = property(lambda self: self.conv.weight.device)

    def forward(self, x, t):
        ab = self.alphas_cumprod[torch.as_tensor(t, device=x.device).long()]
        return UNet2DOutput(sample=gaussian_eps(x, ab) + 0.02 * torch.tanh(self.conv(x)))

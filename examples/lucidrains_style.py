"""A denoising-diffusion-pytorch (lucidrains) training and sampling loop on fastddpm.

Its GaussianDiffusion(model, image_size=8, timesteps=1000, sampling_timesteps=25, objective="pred_v",
beta_schedule="sigmoid", min_snr_loss_weight=True) with a self-conditioned Unet becomes
NoiseSchedule.from_lucidrains + DiffusionLoss.from_lucidrains + fastddpm.sample, and the model
keeps its calling convention, model(x, time, x_self_cond=None).

    python examples/lucidrains_style.py

denoising-diffusion-pytorch itself is not used: it imports torchvision, which does not load beside
this machine's torch. `SelfConditionedNet` is a tiny stand-in with its Unet's interface (channels,
self_condition, out_dim, forward(x, time, x_self_cond=None) concatenating the condition, zeros when
None). Runs in seconds on a CPU.
"""
import math

import torch
from torch import nn

import fastddpm


class SelfConditionedNet(nn.Module):
    def __init__(self, channels=3, width=32, self_condition=True):
        super().__init__()
        self.channels, self.self_condition, self.out_dim = channels, self_condition, channels
        self.time_mlp = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width))
        self.conv_in = nn.Conv2d(channels * (2 if self_condition else 1), width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, time, x_self_cond=None):
        if self.self_condition:
            x = torch.cat([torch.zeros_like(x) if x_self_cond is None else x_self_cond, x], dim=1)
        freqs = torch.exp(-math.log(10000) * torch.arange(8, device=x.device) / 8)
        angles = time.float()[:, None] * freqs
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=1))[:, :, None, None]
        h = nn.functional.silu(self.conv_in(x) + emb)
        return self.conv_out(nn.functional.silu(self.conv_mid(h)))


def main(steps=60, batch_size=16):
    torch.manual_seed(0)
    model = SelfConditionedNet()
    # GaussianDiffusion(..., timesteps=1000, beta_schedule="sigmoid", objective="pred_v", min_snr_loss_weight=True)
    schedule = fastddpm.NoiseSchedule.from_lucidrains(1000, "sigmoid")
    loss_fn = fastddpm.DiffusionLoss.from_lucidrains(schedule, objective="pred_v", min_snr_loss_weight=True,
                                                     min_snr_gamma=5, self_condition=model.self_condition)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))  # its Trainer's defaults, lr aside
    data = torch.rand(256, 3, 1, 1) * torch.ones(1, 1, 8, 8)  # flat colours in [0, 1], as its Dataset gives
    losses = []
    for step in range(steps):
        images = data[(step * batch_size) % len(data):][:batch_size]
        loss = loss_fn(model, images * 2 - 1)  # its auto_normalize: [0, 1] -> [-1, 1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # its sample(): DDIM on sampling_timesteps=25 (its times are the trailing spacing when 25 divides T),
    # eps rederived from the clipped x_start, self-conditioned on the previous x_start
    with torch.no_grad():
        samples = fastddpm.sample(model, (4, 3, 8, 8), schedule, method="ddim", steps=25, spacing="trailing",
                                  prediction="pred_v", self_condition=True, progress=False)
    samples = (samples + 1) / 2  # its unnormalize
    print(f"loss: first 10 steps {sum(losses[:10]) / 10:.3f}, last 10 {sum(losses[-10:]) / 10:.3f}; "
          f"sampled {tuple(samples.shape)} in [{samples.min():.2f}, {samples.max():.2f}]")
    return losses, samples


if __name__ == "__main__":
    main()

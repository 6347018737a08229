"""improved-diffusion's image_train.py / image_sample.py flags on fastddpm, with improved DDPM's
hybrid loss and importance-sampled timesteps, respaced sampling and the bound in bits/dim:

    --learn_sigma True --noise_schedule cosine --diffusion_steps 1000 --use_kl False
    --rescale_learned_sigmas True --rescale_timesteps True --schedule_sampler loss-second-moment
    --timestep_respacing 25   (and ddim25 with --use_ddim True)

    python examples/improved_diffusion_style.py

improved-diffusion is not on PyPI; the model is fastddpm's UNet with learn_sigma (its
"improved-cifar10" preset is improved-diffusion's CIFAR-10 network; "tiny" here, for seconds on a
CPU), called as improved-diffusion's GaussianDiffusion calls it: model(x, _scale_timesteps(t),
**model_kwargs), t scaled to 1000 / T with rescale_timesteps.
"""
import torch

import fastddpm


def main(steps=40, batch_size=16):
    torch.manual_seed(0)
    T = 1000
    schedule = fastddpm.NoiseSchedule.cosine(T)  # --noise_schedule cosine --diffusion_steps 1000
    unet = fastddpm.UNet.from_preset("tiny", in_channels=3, learn_sigma=True)  # 2C channels: [eps, v]

    def model(x, t, **model_kwargs):  # --rescale_timesteps True
        return unet(x, t.float() * (1000.0 / T), **model_kwargs)

    # --learn_sigma True (variance "learned_range"), --use_kl False --rescale_learned_sigmas True: the hybrid
    # L_simple + vb_t · T / 1000; --schedule_sampler loss-second-moment: importance-sampled t
    loss_fn = fastddpm.DiffusionLoss(schedule, variance="learned_range", timestep_sampler="loss-second-moment")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    data = (torch.rand(256, 3, 1, 1) * 2 - 1) * torch.ones(1, 1, 8, 8)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, data[(step * batch_size) % len(data):][:batch_size])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    state = loss_fn.state_dict()  # the sampler's loss history, saved with the model to resume
    unet.eval()
    shape = (4, 3, 8, 8)
    respaced = fastddpm.sample(model, shape, schedule, steps="25", variance="learned_range", progress=False)
    ddim = fastddpm.sample(model, shape, schedule, method="ddim", steps="ddim25", progress=False)
    bpd = fastddpm.elbo_bpd(model, data[:8], schedule, variance="learned_range", timesteps=8, progress=False)
    print(f"loss: first 10 steps {sum(losses[:10]) / 10:.3f}, last 10 {sum(losses[-10:]) / 10:.3f}; "
          f"25-step samples in [{respaced.min():.2f}, {respaced.max():.2f}], ddim25 in "
          f"[{ddim.min():.2f}, {ddim.max():.2f}]; bound {bpd['total_bpd'].mean():.2f} ± "
          f"{bpd['total_bpd_stderr'].mean():.2f} bits/dim")
    return losses, respaced, ddim, bpd, state


if __name__ == "__main__":
    main()

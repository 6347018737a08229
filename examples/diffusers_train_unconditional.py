"""diffusers' train_unconditional.py loop, with fastddpm's DiffusionLoss in place of its noise,
timestep, add_noise, model-call and loss lines; sampling stays diffusers' DDPMPipeline.

    python examples/diffusers_train_unconditional.py

Runs in seconds on a CPU: a tiny random UNet2DModel, 8x8 colour gradients made up here, nothing
downloaded. Swap in your UNet2DModel, DDPMScheduler and DataLoader and it is the real loop.
"""
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import fastddpm


def gradients(n, generator):
    """n images of 3x8x8 in [-1, 1]: each channel a random linear ramp."""
    slopes = torch.rand(n, 3, 2, 1, 1, generator=generator) - 0.5
    ramp = torch.linspace(-1, 1, 8)
    return (slopes[:, :, 0] * ramp[:, None] + slopes[:, :, 1] * ramp[None, :]).clamp(-1, 1)


def main(steps=60, batch_size=16):
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # train_unconditional.py's
    #     noise = torch.randn(...); timesteps = torch.randint(...)
    #     noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    #     model_output = model(noisy_images, timesteps).sample
    #     loss = F.mse_loss(model_output.float(), noise.float())   (or its min-SNR weighting)
    # as one module, which takes prediction_type and the schedule from the scheduler:
    loss_fn = fastddpm.DiffusionLoss(fastddpm.NoiseSchedule.from_diffusers(noise_scheduler), weighting="min_snr")
    data = gradients(256, torch.Generator().manual_seed(0))
    losses = []
    model.train()
    for step in range(steps):
        clean_images = data[(step * batch_size) % len(data):][:batch_size]
        loss = loss_fn(model, clean_images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    pipeline = DDPMPipeline(unet=model, scheduler=noise_scheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=4, num_inference_steps=20, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    print(f"loss: first 10 steps {sum(losses[:10]) / 10:.3f}, last 10 {sum(losses[-10:]) / 10:.3f}; "
          f"sampled {images.shape} in [{images.min():.2f}, {images.max():.2f}]")
    return losses, images


if __name__ == "__main__":
    main()

"""DDPMPipeline and DDIMPipeline three ways, on the same tiny random model and the same starting
noise: with diffusers' own scheduler, with fastddpm's drop-in scheduler, and as fastddpm.sample with
the schedule and noise taken from the pipeline. They agree to 1e-5 in float32.

    python examples/diffusers_pipeline.py

The model is a random UNet2DModel plus the exact eps of Gaussian data N(0, 0.5²): a random U-Net
alone is no denoiser, and its DDIM trajectory multiplies float32 rounding (1e-7 a step, whoever
computes it) tenfold every few steps; a trained model's, like this one's, does not.
"""
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

import fastddpm
import fastddpm.diffusers

ALPHAS_CUMPROD = DDPMScheduler().alphas_cumprod


class GaussianPlusUNet(UNet2DModel):
    def forward(self, sample, timestep, **kwargs):
        ab = ALPHAS_CUMPROD[torch.as_tensor(timestep).long()].reshape(-1, 1, 1, 1)
        eps = sample * (1 - ab).sqrt() / (0.25 * ab + 1 - ab)
        return UNet2DOutput(sample=eps + 0.1 * super().forward(sample, timestep, **kwargs).sample)


def main(steps=50, batch_size=2):
    torch.manual_seed(0)
    unet = GaussianPlusUNet(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                            layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    shape = (batch_size, 3, 8, 8)
    differences = {}
    for method, pipeline_cls, scheduler in [
            ("ddpm", DDPMPipeline, DDPMScheduler(timestep_spacing="trailing")),
            ("ddim", DDIMPipeline, DDIMScheduler(timestep_spacing="leading", steps_offset=1))]:
        pipe = pipeline_cls(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)

        def run():
            return pipe(batch_size=batch_size, generator=torch.Generator().manual_seed(1), num_inference_steps=steps,
                        output_type="pt").images

        theirs = run()
        # fastddpm's scheduler in the pipeline (after it is built: DDIMPipeline converts its argument)
        ours_class = getattr(fastddpm.diffusers, type(scheduler).__name__)
        pipe.scheduler = ours_class.from_config(pipe.scheduler.config)
        in_pipeline = run()
        # fastddpm.sample: the schedule and its options from the scheduler, the noise as the pipeline draws it
        schedule = fastddpm.NoiseSchedule.from_diffusers(scheduler)
        x_T, noise_fn = fastddpm.diffusers.pipeline_noise(shape, torch.Generator().manual_seed(1))
        x = fastddpm.sample(unet, shape, schedule, method=method, steps=steps, x_T=x_T, noise_fn=noise_fn,
                            progress=False)
        sampled = (x / 2 + 0.5).clamp(0, 1)
        differences[method] = {"scheduler": float((in_pipeline - theirs).abs().max()),
                               "sample": float((sampled - theirs).abs().max())}
        print(f"{method}: fastddpm's scheduler in {pipeline_cls.__name__} differs by "
              f"{differences[method]['scheduler']:.1e}, fastddpm.sample by {differences[method]['sample']:.1e}")
        assert max(differences[method].values()) < 1e-5
    return differences


if __name__ == "__main__":
    main()

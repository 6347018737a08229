"""Training-step throughput (images/s): fastddpm against diffusers, eager and compiled.

Providers, all on the same architecture and batch:
  fastddpm          compile_unet(UNet) + DiffusionLoss + TrainStep (bf16 autocast on CUDA, fused
                    AdamW, global-norm clipping and EMA included, no host sync).
  diffusers         UNet2DModel + DDPMScheduler, eager: randn_like, add_noise, F.mse_loss,
                    backward, AdamW step (torch defaults), bf16 autocast on CUDA.
  diffusers-compile the same step with the UNet2DModel under torch.compile.
On CUDA each row also gives the model FLOP utilisation: 3x the forward FLOPs (counted by
torch's FlopCounterMode; 12.44 GFLOP per 32x32 image for ddpm-cifar10) per second, against a
measured bf16 matmul rate. Learned-sigma presets are timed with an eps-only output head.

    python benchmarks/bench_train_step.py --device cpu --preset tiny --batch 8 --steps 10
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastddpm.loss import DiffusionLoss
from fastddpm.schedule import NoiseSchedule
from fastddpm.train_step import TrainStep
from fastddpm.unet import UNet, compile_unet

PROVIDERS = ("fastddpm", "diffusers", "diffusers-compile")
NUM_TIMESTEPS = 1000
TIMING_WINDOWS = 3


def run(preset="tiny", batch=8, device="cpu", steps=10):
    """One result dict per provider: images/s (median of timing windows), ms per step, and
    on CUDA the model FLOP utilisation."""
    device = torch.device(device)
    config = UNet.from_preset(preset, learn_sigma=False).config
    size = config["image_size"]
    fwd_flops = forward_flops_per_image(config)
    matmul_flops = measure_bf16_matmul_flops(device) if device.type == "cuda" else None
    results = []
    for provider in PROVIDERS:
        torch.manual_seed(0)
        step = make_step(provider, config, device)
        x0 = torch.rand(batch, config["in_channels"], size, size, device=device) * 2 - 1
        warmup_s, window_s = time_steps(step, x0, steps, device)
        images_per_s = statistics.median(batch * steps / s for s in window_s)
        results.append(dict(
            bench="train_step", provider=provider, preset=preset, image_size=size, batch=batch,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            autocast="bfloat16" if device.type == "cuda" else "none", steps=steps,
            images_per_s=images_per_s, ms_per_step=1e3 * batch / images_per_s,
            images_per_s_windows=[batch * steps / s for s in window_s], warmup_s=warmup_s,
            forward_gflop_per_image=fwd_flops / 1e9,
            mfu=None if matmul_flops is None else 3 * fwd_flops * images_per_s / matmul_flops,
            bf16_matmul_tflops=None if matmul_flops is None else matmul_flops / 1e12,
            torch=torch.__version__))
    return results


def make_step(provider, config, device):
    """A callable training step on a batch x0, returning the loss tensor."""
    if provider == "fastddpm":
        model = UNet(**config).to(device)
        loss_fn = DiffusionLoss(NoiseSchedule.linear(NUM_TIMESTEPS))
        return TrainStep(compile_unet(model), loss_fn).step
    from diffusers import DDPMScheduler, UNet2DModel

    model = UNet2DModel(**diffusers_config(config)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    scheduler = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS)
    forward = torch.compile(model) if provider == "diffusers-compile" else model
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    def diffusers_step(x0):
        noise = torch.randn_like(x0)
        t = torch.randint(0, NUM_TIMESTEPS, (x0.shape[0],), device=x0.device)
        x_t = scheduler.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = forward(x_t, t).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return diffusers_step


def diffusers_config(config):
    """UNet2DModel arguments for the same architecture as a fastddpm UNet config (exact for
    the Ho et al. layout; scale-shift presets differ only in diffusers' mid-block attention norm)."""
    levels = len(config["channel_mult"])
    widths = [config["model_channels"] * m for m in config["channel_mult"]]
    attention = [config["image_size"] // 2 ** level in config["attention_resolutions"] for level in range(levels)]
    attention_widths = [w for w, attn in zip(widths, attention) if attn] or widths[-1:]
    head_dim = config["num_head_channels"] or min(attention_widths) // config["num_heads"]
    return dict(
        sample_size=config["image_size"], in_channels=config["in_channels"],
        out_channels=config["out_channels"] or config["in_channels"], layers_per_block=config["num_res_blocks"],
        block_out_channels=tuple(widths),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=None if head_dim == min(attention_widths) else head_dim,
        downsample_padding=0 if config["downsample_pad"] == "bottom_right" else 1,
        flip_sin_to_cos=config["flip_sin_to_cos"], freq_shift=config["freq_shift"],
        norm_eps=config["norm_eps"], norm_num_groups=config["norm_groups"], dropout=config["dropout"],
        resnet_time_scale_shift="scale_shift" if config["use_scale_shift_norm"] else "default")


def time_steps(step, x0, steps, device):
    """(seconds of the first, compiling steps; seconds of each timing window of `steps` steps)."""
    start = time.perf_counter()
    for _ in range(3):  # compile, then settle autotuning and allocator
        step(x0)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    windows = []
    for _ in range(TIMING_WINDOWS):
        start = time.perf_counter()
        for _ in range(steps):
            step(x0)
        synchronize(device)
        windows.append(time.perf_counter() - start)
    return warmup_s, windows


def forward_flops_per_image(config):
    """Forward FLOPs of one image (convolutions, matmuls, attention), counted on the meta device."""
    with torch.device("meta"):
        model = UNet(**config)
        x = torch.empty(1, config["in_channels"], config["image_size"], config["image_size"])
        with FlopCounterMode(display=False) as counter:
            model(x, torch.empty(1, dtype=torch.long))
    return counter.get_total_flops()


def measure_bf16_matmul_flops(device, n=8192, repeats=20):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="UNet preset (default: ddpm-cifar10 on CUDA, tiny on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per timing window (default: 20 on CUDA, 5 on CPU)")
    parser.add_argument("--json", default=None, help="write the result rows to this file")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (on a shared machine, 1 keeps OpenMP threads from spinning against others)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = torch.device(args.device).type == "cuda"
    preset = args.preset or ("ddpm-cifar10" if on_cuda else "tiny")
    batch = args.batch or (128 if on_cuda else 8)
    steps = args.steps or (20 if on_cuda else 5)
    results = run(preset, batch, args.device, steps)
    for row in results:
        mfu = "" if row["mfu"] is None else f"  MFU {100 * row['mfu']:.1f}%"
        print(f"{row['provider']:>18}  {row['images_per_s']:9.1f} images/s  {row['ms_per_step']:8.2f} ms/step"
              f"  (warm-up {row['warmup_s']:.1f} s){mfu}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

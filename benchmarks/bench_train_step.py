"""Training-step throughput (images/s): fastddpm against diffusers, eager and compiled.

Providers, all on the same architecture and batch:
  fastddpm          compile_unet(UNet) + DiffusionLoss + TrainStep (bf16 autocast on CUDA, fused
                    AdamW, global-norm clipping and EMA included, no host sync).
  diffusers         UNet2DModel + DDPMScheduler, eager: randn_like, add_noise, F.mse_loss,
                    backward, AdamW step (torch defaults), bf16 autocast on CUDA.
  diffusers-compile the same step with the UNet2DModel under torch.compile.
Rows (harness.FIELDS, op "train_step_<preset>"): throughput in images/s (median and 20th / 80th
percentiles over timing windows of `steps` steps), the compiling warm-up in s, the forward
GFLOP per image, and on CUDA the model FLOP utilisation: 3x the forward FLOPs (counted by
torch's FlopCounterMode; 12.44 GFLOP per 32x32 image for ddpm-cifar10) per second, against a
measured bf16 matmul rate. Learned-sigma presets are timed with an eps-only output head.

    python -m fastddpm.benchmarks.bench_train_step --device cpu --preset tiny --batch 8 --steps 10
    python -m fastddpm.benchmarks.bench_train_step --full     # ddpm-cifar10, batch 128 (GPU)
"""
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastddpm import DiffusionLoss, NoiseSchedule, TrainStep, UNet, compile_unet
from fastddpm.testing import random_images

from . import harness

PROVIDERS = ("fastddpm", "diffusers", "diffusers-compile")
NUM_TIMESTEPS = 1000
TIMING_WINDOWS = 3
FULL = dict(preset="ddpm-cifar10", batch=128, steps=20)
CPU = dict(preset="tiny", batch=8, steps=5)


def run(preset="tiny", batch=8, device=None, steps=10, reps=TIMING_WINDOWS, providers=PROVIDERS):
    """Rows (harness.FIELDS) per provider: throughput over `reps` windows of `steps` steps, warm-up,
    forward GFLOP per image and, on CUDA, the model FLOP utilisation."""
    device = harness.resolve_device(device)
    config = UNet.from_preset(preset, learn_sigma=False).config
    size = config["image_size"]
    fwd_flops = forward_flops_per_image(config)
    matmul_flops = measure_bf16_matmul_flops(device) if device.type == "cuda" else None
    where = dict(harness.environment(device), op=f"train_step_{preset}", mode="full",
                 shape=f"{batch}x{config['in_channels']}x{size}x{size}",
                 dtype="autocast bfloat16" if device.type == "cuda" else "float32")
    rows = []
    for provider in providers:
        torch.manual_seed(0)
        step = make_step(provider, config, device)
        x0 = random_images((batch, config["in_channels"], size, size), device=device)
        warmup_s, window_s = time_steps(step, x0, steps, device, reps)
        rates = [batch * steps / s for s in window_s]
        row = dict(where, provider=provider)
        rows += [dict(row, metric="throughput", unit="images/s", **harness.quantile_fields(harness.quantiles(rates))),
                 dict(row, metric="warmup", unit="s", p50=warmup_s, p20=warmup_s, p80=warmup_s),
                 dict(row, metric="forward_flops", unit="GFLOP/image", **harness.quantile_fields([fwd_flops / 1e9] * 3))]
        if matmul_flops is not None:
            mfu = [100 * 3 * fwd_flops * rate / matmul_flops for rate in harness.quantiles(rates)]
            rows.append(dict(row, metric="mfu", unit="%", **harness.quantile_fields(mfu)))
    return rows


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


def time_steps(step, x0, steps, device, windows=TIMING_WINDOWS):
    """(seconds of the first, compiling steps; seconds of each of `windows` windows of `steps` steps)."""
    start = time.perf_counter()
    for _ in range(3):  # compile, then settle autotuning and allocator
        step(x0)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    seconds = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            step(x0)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return warmup_s, seconds


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
    parser = harness.parser(__doc__.split("\n")[0], "ddpm-cifar10, batch 128", dtypes=None)
    parser.add_argument("--preset", default=None, help="UNet preset (default: ddpm-cifar10 with --full, else tiny)")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 with --full, else 8")
    parser.add_argument("--steps", type=int, default=None, help="steps per timing window (default: 20 with --full, "
                        "else 5)")
    args = parser.parse_args(argv)
    harness.setup(args)
    sizes = FULL if args.full or harness.resolve_device(args.device).type == "cuda" else CPU
    rows = run(args.preset or sizes["preset"], args.batch or sizes["batch"], args.device, args.steps or sizes["steps"],
               reps=args.reps or TIMING_WINDOWS)
    harness.report(rows, args.out)
    return rows


if __name__ == "__main__":
    main()

"""The loss path of one training step: draw t and noise, q-sample, loss forward and backward.

The model is left out: `pred` is a fresh tensor requiring grad, standing in for its output
(and x_t is returned, so that torch.compile cannot drop the q-sample). Providers, in one run:

- fastddpm: `DiffusionLoss.noise` + `DiffusionLoss.loss`, as users call them. On CUDA the
  fused kernels (noise drawn in q-sample and regenerated in the loss, gradient written in the
  forward pass); on CPU, under backend "auto", the PyTorch path users get there
  (`functional.q_sample`'s reference and `loss.eager_diffusion_loss`), not the kernels.
- eager: diffusers' training scripts: `randn_like`, `DDPMScheduler.add_noise`'s formula (in the
  input dtype), `F.mse_loss(pred.float(), noise.float())`; for min_snr the per-sample form of
  diffusers' train_text_to_image.py (`compute_snr`, `min(snr, gamma) / snr`).
- compile: `torch.compile` (Inductor, static shapes) of that same eager code. On CPU, Inductor
  lowers `randn_like` to its own per-element Philox in C++, several times slower than ATen's
  (`torch._inductor.config.fallback_random = True` avoids it); this is the default users get.

Metrics: time (ms; CUDA: triton.testing.do_bench; CPU: the process's CPU time over repeats
with the providers interleaved, so that other load on the machine does not distort the
comparison; `main` runs one thread on CPU unless told otherwise), bytes of the traffic model's floor (math.md section 7: read x0, write x_t, read pred,
write grad: 4N for the eps target) and the bandwidth that floor implies at the measured time
(the same bytes for every provider, so GB/s ranks them as time does), peak memory on CUDA.

    python -m fastddpm.benchmarks.bench_loss            # CPU: small sizes, under a minute
    python -m fastddpm.benchmarks.bench_loss --full     # the sizes below (GPU)
"""
import argparse
import csv
import datetime
import random
import statistics
import time

import torch
import torch.nn.functional as F

from fastddpm import NoiseSchedule
from fastddpm.loss import DiffusionLoss

FULL_SIZES = ((128, 3, 32, 32), (32, 3, 256, 256), (64, 4, 64, 64))
CPU_SIZES = ((32, 3, 32, 32), (8, 4, 64, 64))
DTYPES = (torch.float32, torch.bfloat16)
WEIGHTINGS = ("simple", "min_snr")
PROVIDERS = ("fastddpm", "eager", "compile")
MIN_SNR_GAMMA = 5.0
FIELDS = ("op", "provider", "mode", "metric", "unit", "shape", "dtype", "p50", "p20", "p80", "device", "torch",
          "triton", "time")


def add_noise(x0, noise, t, alphas_cumprod):
    """diffusers' DDPMScheduler.add_noise: the table cast to the input dtype first."""
    alphas_cumprod = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    sqrt_alpha_prod = (alphas_cumprod[t] ** 0.5).flatten().reshape(shape)
    sqrt_one_minus_alpha_prod = ((1 - alphas_cumprod[t]) ** 0.5).flatten().reshape(shape)
    return sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * noise


def compute_snr(alphas_cumprod, t):
    """diffusers.training_utils.compute_snr, in float32 as there."""
    alpha = (alphas_cumprod ** 0.5).to(t.device)[t].float()
    sigma = ((1.0 - alphas_cumprod) ** 0.5).to(t.device)[t].float()
    return (alpha / sigma) ** 2


def eager_loss_path(x0, pred, alphas_cumprod, weighting):
    """The loss path of diffusers' example training scripts (eps prediction)."""
    noise = torch.randn_like(x0)
    t = torch.randint(0, alphas_cumprod.numel(), (x0.shape[0],), device=x0.device)
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    if weighting == "simple":
        return F.mse_loss(pred.float(), noise.float(), reduction="mean"), x_t
    snr = compute_snr(alphas_cumprod, t)
    weights = torch.stack([snr, MIN_SNR_GAMMA * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
    loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean(), x_t


def loss_paths(schedule, weighting):
    """{provider: fn(x0, pred) -> (loss, x_t)}."""
    loss_fn = DiffusionLoss(schedule, prediction="eps", weighting=weighting, gamma=MIN_SNR_GAMMA)
    alphas_cumprod = schedule.alphas_cumprod.float()

    def fastddpm(x0, pred):
        x_t, _, state = loss_fn.noise(x0)
        return loss_fn.loss(pred, x0, state), x_t

    def eager(x0, pred):
        return eager_loss_path(x0, pred, alphas_cumprod, weighting)

    # a fresh compile for every shape and dtype (static shapes, no recompile limit reached)
    torch.compiler.reset()
    return {"fastddpm": fastddpm, "eager": eager, "compile": torch.compile(eager, dynamic=False)}


def floor_bytes(x0):
    """math.md section 7, eps target: read x0, write x_t, read pred, write grad."""
    return 4 * x0.numel() * x0.element_size()


def time_cpu(steps, reps, warmup=3):
    """{provider: [p50, p20, p80] in ms} of process CPU time, the providers interleaved in a
    new order every repeat (whoever runs after another finds the caches in its wake)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples = {name: [] for name in steps}
    order, shuffle = list(steps), random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for name in order:
            start = time.process_time()
            steps[name]()
            samples[name].append(time.process_time() - start)
    return {name: [1e3 * q for q in quantiles(values)] for name, values in samples.items()}


def quantiles(values):
    """(p50, p20, p80)."""
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), deciles[1], deciles[7]


def run(sizes=None, dtypes=DTYPES, device=None, weightings=WEIGHTINGS, providers=PROVIDERS, reps=None):
    """Long-format rows (see FIELDS) for every size, dtype, weighting and provider."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    sizes = sizes or (FULL_SIZES if on_cuda else CPU_SIZES)
    reps = reps or (100 if on_cuda else 30)
    schedule = NoiseSchedule.linear(1000)
    base = dict(mode="full", device=torch.cuda.get_device_name(device) if on_cuda else "cpu",
                torch=torch.__version__, triton=_triton_version(),
                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    rows = []
    for weighting in weightings:
        for dtype in dtypes:
            for size in sizes:
                x0 = torch.randn(size, device=device, dtype=dtype)
                pred = torch.randn(size, device=device, dtype=dtype, requires_grad=True)
                paths = loss_paths(schedule, weighting)
                steps = {name: make_step(paths[name], x0, pred) for name in providers}
                if on_cuda:
                    import triton.testing
                    times = {name: triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=[pred])
                             for name, step in steps.items()}
                else:
                    times = time_cpu(steps, reps)
                where = dict(base, op=f"loss_step_{weighting}", shape="x".join(map(str, size)),
                             dtype=str(dtype).removeprefix("torch."))
                moved = floor_bytes(x0)
                for name, step in steps.items():
                    ms = times[name]
                    rows.append(dict(where, provider=name, metric="time", unit="ms", **_quantile_fields(ms)))
                    rows.append(dict(where, provider=name, metric="bytes", unit="B", p50=moved, p20=moved, p80=moved))
                    # slower time, lower bandwidth: p20 of time gives p80 of bandwidth
                    gbs = [moved / (1e6 * value) for value in (ms[0], ms[2], ms[1])]
                    rows.append(dict(where, provider=name, metric="bandwidth", unit="GB/s", **_quantile_fields(gbs)))
                    if on_cuda:
                        rows.append(dict(where, provider=name, metric="peak_memory", unit="MB",
                                         **_quantile_fields([_peak_mb(step, device)] * 3)))
    return rows


def make_step(path, x0, pred):
    """One loss path with its backward, on fresh gradients."""
    def step():
        pred.grad = None
        loss, _ = path(x0, pred)
        loss.backward()
    return step


def _quantile_fields(values):
    return dict(zip(("p50", "p20", "p80"), values))


def _peak_mb(step, device):
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return ""


def summary(rows):
    """One line per case: p50 times and each provider's speed-up over eager."""
    times = {}
    for row in rows:
        if row["metric"] == "time":
            times.setdefault((row["op"], row["shape"], row["dtype"]), {})[row["provider"]] = row["p50"]
    lines = []
    for (op, shape, dtype), by_provider in times.items():
        eager = by_provider.get("eager")
        cells = [f"{name} {ms:.3f} ms" + (f" ({eager / ms:.2f}x)" if eager else "") for name, ms in by_provider.items()]
        lines.append(f"{op:18} {shape:14} {dtype:9} " + ", ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--full", action="store_true", help=f"the full sizes {FULL_SIZES} (default on CUDA)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--out", default=None, help="CSV file for the long-format rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(sizes=FULL_SIZES if args.full else None, dtypes=[getattr(torch, d) for d in args.dtypes.split(",")],
               device=args.device, reps=args.reps)
    if rows[0]["device"] == "cpu":
        print(f"CPU ({torch.get_num_threads()} threads): fastddpm runs its PyTorch path (backend 'auto'), "
              "not the Triton kernels")
    print(summary(rows))
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()

"""One reverse step of the DDPM sampler: x_{t-1} from x_t and the model output (eps prediction,
fixed_small variance, x0_hat clipped to [-1, 1], fresh noise). The model is left out.
Providers, in one run:

- fastddpm: `functional.p_sample_step`, as the sampler calls it. On CUDA the fused kernel (read
  x_t and eps, write x_{t-1}, noise drawn in the kernel); on CPU, under backend "auto", the
  PyTorch path users get there (`sampling.eager_p_sample_step`), not the kernels.
- eager: improved-diffusion's `GaussianDiffusion.p_sample` written out op by op (about 15 full
  passes: every coefficient broadcast to the full shape as its `_extract_into_tensor` does, the
  log variance exponentiated at full size, `randn_like`). Its tables live on the device here
  (improved-diffusion copies a numpy array to the device at every gather), and the result is
  cast back to the input dtype.
- compile: `torch.compile` (Inductor, static shapes) of that same eager code.

Metrics: time (ms; CUDA: triton.testing.do_bench, CPU: time.perf_counter over interleaved
repeats), the bytes of the traffic floor (math.md section 7: read x_t and eps, write x_{t-1}:
3N), the bandwidth that floor implies at the measured time, and peak memory on CUDA.

    python -m fastddpm.benchmarks.bench_sampling            # CPU: small sizes, under a minute
    python -m fastddpm.benchmarks.bench_sampling --full     # 256x3x32x32 and 16x3x256x256 (GPU)
"""
import argparse
import csv
import datetime
import statistics
import time

import torch

from fastddpm import NoiseSchedule
from fastddpm import functional as F

FULL_SIZES = ((256, 3, 32, 32), (16, 3, 256, 256))
CPU_SIZES = ((32, 3, 32, 32), (2, 3, 128, 128))
DTYPES = (torch.float32, torch.bfloat16)
PROVIDERS = ("fastddpm", "eager", "compile")
FIELDS = ("op", "provider", "mode", "metric", "unit", "shape", "dtype", "p50", "p20", "p80", "device", "torch",
          "triton", "time")
TABLES = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
          "posterior_mean_coef2", "posterior_variance", "posterior_log_variance_clipped")


def improved_diffusion_p_sample(model_output, x, t, tables, clip_denoised=True):
    """improved-diffusion's p_sample (eps prediction, fixed_small), op by op, with the helpers it
    calls (their unused outputs included: they cost gathers, which matter where launches dominate)."""
    def extract(name):  # _extract_into_tensor: gather, float32, broadcast to the full shape
        values = tables[name][t].float()
        while values.ndim < x.ndim:
            values = values[..., None]
        return values.expand(x.shape)

    def q_posterior_mean_variance(x_start, x_t):
        mean = extract("posterior_mean_coef1") * x_start + extract("posterior_mean_coef2") * x_t
        return mean, extract("posterior_variance"), extract("posterior_log_variance_clipped")

    def p_mean_variance():
        variance, log_variance = extract("posterior_variance"), extract("posterior_log_variance_clipped")
        pred_xstart = extract("sqrt_recip_alphas_cumprod") * x - extract("sqrt_recipm1_alphas_cumprod") * model_output
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = q_posterior_mean_variance(pred_xstart, x)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    out = p_mean_variance()
    noise = torch.randn_like(x)
    nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
    sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
    return sample.to(x.dtype)


def step_providers(schedule, device, providers=PROVIDERS):
    """{provider: fn(model_output, x_t, t) -> x_{t-1}}."""
    tables = {name: getattr(schedule, name).to(device) for name in TABLES}

    def fastddpm(model_output, x, t):
        return F.p_sample_step(model_output, x, t, schedule, prediction="eps", variance="fixed_small",
                               clip_denoised=True)

    def eager(model_output, x, t):
        return improved_diffusion_p_sample(model_output, x, t, tables)

    fns = {"fastddpm": fastddpm, "eager": eager}
    if "compile" in providers:
        torch.compiler.reset()  # a fresh compile for every shape and dtype (static shapes)
        fns["compile"] = torch.compile(eager, dynamic=False)
    return {name: fns[name] for name in providers}


def floor_bytes(x):
    """math.md section 7: read x_t and the model output, write x_{t-1}."""
    return 3 * x.numel() * x.element_size()


def time_cpu(steps, reps, warmup=3):
    """{provider: [p50, p20, p80] ms}, the providers interleaved so that machine noise hits them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    return {name: [1e3 * q for q in _quantiles(values)] for name, values in samples.items()}


def run(sizes=None, dtypes=DTYPES, device=None, providers=PROVIDERS, reps=None):
    """Long-format rows (see FIELDS) for every size, dtype and provider."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    sizes = sizes or (FULL_SIZES if on_cuda else CPU_SIZES)
    reps = reps or (100 if on_cuda else 30)
    schedule = NoiseSchedule.linear(1000)
    base = dict(op="p_sample_step", mode="forward", device=torch.cuda.get_device_name(device) if on_cuda else "cpu",
                torch=torch.__version__, triton=_triton_version(),
                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    rows = []
    for dtype in dtypes:
        for size in sizes:
            x = torch.randn(size, device=device, dtype=dtype)
            model_output = torch.randn(size, device=device, dtype=dtype)
            t = torch.randint(1, 1000, (size[0],), device=device)
            fns = step_providers(schedule, device, providers)
            steps = {name: _bind(fn, model_output, x, t) for name, fn in fns.items()}
            if on_cuda:
                import triton.testing
                times = {name: triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8]) for name, step in steps.items()}
            else:
                times = time_cpu(steps, reps)
            where = dict(base, shape="x".join(map(str, size)), dtype=str(dtype).removeprefix("torch."))
            moved = floor_bytes(x)
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


def _bind(fn, model_output, x, t):
    def step():
        return fn(model_output, x, t)
    return step


def _quantiles(values):
    """(p50, p20, p80)."""
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), deciles[1], deciles[7]


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
        lines.append(f"{op:14} {shape:14} {dtype:9} " + ", ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--full", action="store_true", help=f"the full sizes {FULL_SIZES} (default on CUDA)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="CSV file for the long-format rows")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(sizes=FULL_SIZES if args.full else None, dtypes=[getattr(torch, d) for d in args.dtypes.split(",")],
               device=args.device, providers=tuple(args.providers.split(",")), reps=args.reps)
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

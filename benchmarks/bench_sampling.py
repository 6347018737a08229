"""One reverse step of the DDPM sampler: x_{t-1} from x_t and the model output (eps prediction,
fixed_small variance, x0_hat clipped to [-1, 1], fresh noise). The model is left out.
Providers, in one run:

- fastddpm: `functional.p_sample_step`, as the sampler calls it. On CUDA the fused kernel (read
  x_t and eps, write x_{t-1}, noise drawn in the kernel); on CPU, under backend "auto", the
  PyTorch path users get there (`torch_ops.p_sample_step`), not the kernels.
- eager: improved-diffusion's `GaussianDiffusion.p_sample` written out op by op (about 15 full
  passes: every coefficient broadcast to the full shape as its `_extract_into_tensor` does, the
  log variance exponentiated at full size, `randn_like`). Its tables live on the device here
  (improved-diffusion copies a numpy array to the device at every gather), and the result is
  cast back to the input dtype.
- compile: `torch.compile` (Inductor, static shapes) of that same eager code.

Metrics: time (ms; CUDA: triton.testing.do_bench, CPU: time.perf_counter over interleaved
repeats), the bytes of the traffic floor (docs/math.md section 7: read x_t and eps, write x_{t-1}:
3N), the bandwidth that floor implies at the measured time, and peak memory on CUDA.

    python -m fastddpm.benchmarks.bench_sampling            # CPU: small sizes, under a minute
    python -m fastddpm.benchmarks.bench_sampling --full     # 256x3x32x32 and 16x3x256x256 (GPU)
"""
import torch

from fastddpm import NoiseSchedule
from fastddpm import functional as F

from . import harness
from .improved_diffusion import TABLES, GaussianDiffusion

FULL_SIZES = ((256, 3, 32, 32), (16, 3, 256, 256))
CPU_SIZES = ((32, 3, 32, 32), (2, 3, 128, 128))
DTYPES = (torch.float32, torch.bfloat16)
PROVIDERS = ("fastddpm", "eager", "compile")
def step_providers(schedule, device, providers=PROVIDERS):
    """{provider: fn(model_output, x_t, t) -> x_{t-1}}."""
    peer = GaussianDiffusion({name: getattr(schedule, name).to(device) for name in TABLES})

    def fastddpm(model_output, x, t):
        return F.p_sample_step(model_output, x, t, schedule, prediction="eps", variance="fixed_small",
                               clip_denoised=True)

    def eager(model_output, x, t):
        return peer.p_sample(model_output, x, t)

    fns = {"fastddpm": fastddpm, "eager": eager}
    if "compile" in providers:
        torch.compiler.reset()  # a fresh compile for every shape and dtype (static shapes)
        fns["compile"] = torch.compile(eager, dynamic=False)
    return {name: fns[name] for name in providers}


def floor_bytes(x):
    """docs/math.md section 7: read x_t and the model output, write x_{t-1}."""
    return 3 * x.numel() * x.element_size()


def run(sizes=None, dtypes=DTYPES, device=None, providers=PROVIDERS, reps=None):
    """Long-format rows (see harness.FIELDS) for every size, dtype and provider."""
    device = harness.resolve_device(device)
    on_cuda = device.type == "cuda"
    sizes = sizes or (FULL_SIZES if on_cuda else CPU_SIZES)
    reps = reps or (100 if on_cuda else 30)
    schedule = NoiseSchedule.linear(1000)
    base = dict(op="p_sample_step", mode="forward", **harness.environment(device))
    rows = []
    for dtype in dtypes:
        for size in sizes:
            x = torch.randn(size, device=device, dtype=dtype)
            model_output = torch.randn(size, device=device, dtype=dtype)
            t = torch.randint(1, 1000, (size[0],), device=device)
            fns = step_providers(schedule, device, providers)
            steps = {name: _bind(fn, model_output, x, t) for name, fn in fns.items()}
            times = harness.time_cuda(steps) if on_cuda else harness.time_cpu(steps, reps)
            where = dict(base, **harness.case_fields(size, dtype))
            for name, step in steps.items():
                rows += harness.case_rows(where, name, times[name], floor_bytes(x),
                                          harness.peak_mb(step, device) if on_cuda else None)
    return rows


def _bind(fn, model_output, x, t):
    def step():
        return fn(model_output, x, t)
    return step


def main(argv=None):
    parser = harness.parser(__doc__.split("\n")[0], FULL_SIZES)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    args = parser.parse_args(argv)
    dtypes = harness.setup(args)
    rows = run(sizes=FULL_SIZES if args.full else None, dtypes=dtypes, device=args.device,
               providers=tuple(args.providers.split(",")), reps=args.reps)
    harness.report(rows, args.out)
    return rows


if __name__ == "__main__":
    main()

"""Bits/dim evaluation: the vb term of one step of the bound, and a full `elbo_bpd` loop.

Ops, providers in one run:

- `vb_terms_step`: what `elbo_bpd` computes after each model call: the vb term in bits/dim
  (learned_range output, eps prediction) and the MSEs of x0_hat and eps_hat, per sample.
  fastddpm: `elbo._vb_and_mse` as the loop calls it (on CUDA the fused kernel, one pass over
  the output, x0, x_t and the noise; on CPU, under backend "auto", the reference);
  eager: `fastddpm.reference` (the formulas of docs/math.md section 6 as improved-diffusion
  writes them, op by op); compile: `torch.compile` (Inductor, static shapes) of that eager code.
- `elbo_full_loop`: `elbo_bpd` over every t of a batch with a tiny U-Net
  (`UNet.from_preset("tiny")`, learned range): fastddpm (backend "auto") against the same
  loop on backend "reference" (eager). T = 1000 on CUDA; fewer steps on CPU, where the
  U-Net dominates. Also reported per step (`elbo_per_step`).

Metrics: time (ms; CUDA: triton.testing.do_bench, CPU: time.perf_counter over interleaved
repeats); for the step, the bytes of the fused floor (read the 2C-channel output, x0, x_t and
the noise: 5N) and the bandwidth they imply.

    python -m fastddpm.benchmarks.bench_elbo            # CPU: small sizes, under a minute
    python -m fastddpm.benchmarks.bench_elbo --full     # the sizes below (GPU)
"""
import time

import torch

import fastddpm
from fastddpm import NoiseSchedule
from fastddpm.testing import plausible_output, random_images

from . import harness

FULL_SIZES = ((128, 3, 32, 32), (32, 3, 256, 256), (64, 4, 64, 64))
CPU_SIZES = ((16, 3, 32, 32),)
DTYPES = (torch.float32, torch.bfloat16)
PROVIDERS = ("fastddpm", "eager", "compile")


def step_inputs(size, dtype, device, schedule, generator):
    """(model_output with 2C channels, x0, x_t, noise, t): a plausible model at random t."""
    x0 = random_images(size, device=device, generator=generator)
    noise = torch.randn(size, device=device, generator=generator)
    t = torch.randint(0, schedule.num_timesteps, (size[0],), device=device, generator=generator)
    x_t = fastddpm.reference.q_sample(x0, t, noise, schedule)
    output = plausible_output(x0, noise, t, schedule, variance="learned_range", generator=generator)
    return tuple(x.to(dtype) for x in (output, x0, x_t, noise)) + (t,)


def step_paths(schedule):
    """{provider: fn(output, x0, x_t, noise, t) -> (vb, x0_mse, eps_mse)}."""
    options = dict(prediction="eps", variance="learned_range", clip_denoised=False, tanh_cdf=False)

    def fastddpm_path(output, x0, x_t, noise, t):
        return fastddpm.functional.vb_terms_with_mse(output, x0, x_t, noise, t, schedule, **options)

    def eager(output, x0, x_t, noise, t):
        return fastddpm.reference.vb_terms_with_mse(output, x0, x_t, noise, t, schedule, **options)

    torch.compiler.reset()
    return {"fastddpm": fastddpm_path, "eager": eager, "compile": torch.compile(eager, dynamic=False)}


def floor_bytes(x0):
    """Read the 2C-channel output, x0, x_t and the noise (the per-sample results are negligible)."""
    return 5 * x0.numel() * x0.element_size()


def full_loop(model, x0, schedule, backend):
    """One `elbo_bpd` over every t on `backend`."""
    def loop():
        previous = fastddpm.get_backend()
        fastddpm.set_backend(backend)
        try:
            with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.dtype == torch.bfloat16):
                return fastddpm.elbo_bpd(model, x0, schedule, variance="learned_range", progress=False,
                                            generator=torch.Generator(x0.device).manual_seed(0))
        finally:
            fastddpm.set_backend(previous)
    return loop


def run(sizes=None, dtypes=DTYPES, device=None, providers=PROVIDERS, reps=None, loop_steps=None, loop_batch=None,
        loop=True):
    """Long-format rows (see harness.FIELDS): the vb step for every size, dtype and provider, and (with
    `loop`) the full loop of the first size, `loop_batch` images, a `loop_steps`-step schedule."""
    device = harness.resolve_device(device)
    on_cuda = device.type == "cuda"
    sizes = sizes or (FULL_SIZES if on_cuda else CPU_SIZES)
    reps = reps or (100 if on_cuda else 10)
    loop_steps = loop_steps or (1000 if on_cuda else 20)
    loop_batch = loop_batch or (sizes[0][0] if on_cuda else min(4, sizes[0][0]))
    schedule = NoiseSchedule.linear(1000)
    generator = torch.Generator(device).manual_seed(0)
    base = harness.environment(device)
    rows = []
    for dtype in dtypes:
        for size in sizes:
            output, x0, x_t, noise, t = step_inputs(size, dtype, device, schedule, generator)
            paths = step_paths(schedule)
            steps = {name: (lambda path=paths[name]: path(output, x0, x_t, noise, t)) for name in providers}
            with torch.no_grad():
                times = harness.time_cuda(steps) if on_cuda else harness.time_cpu(steps, reps, warmup=2)
            where = dict(base, op="vb_terms_step", mode="forward", **harness.case_fields(size, dtype))
            for name in steps:
                rows += harness.case_rows(where, name, times[name], floor_bytes(x0))
    if loop:
        rows += run_full_loop(sizes[0], dtypes[0], device, loop_steps, loop_batch, base, on_cuda)
    return rows


def run_full_loop(size, dtype, device, steps, batch, base, on_cuda):
    """`elbo_bpd` over every t of a `steps`-step schedule: fastddpm against the reference backend."""
    from fastddpm.unet import UNet

    channels, height = size[1], size[2]
    model = UNet.from_preset("tiny", in_channels=channels, image_size=height, attention_resolutions=(height // 2,),
                             learn_sigma=True).to(device).eval()
    schedule = NoiseSchedule.linear(steps, rescale_with_T=True) if steps >= 50 else NoiseSchedule.cosine(steps)
    x0 = random_images((batch, *size[1:]), device=device).to(dtype)
    loops = {"fastddpm": full_loop(model, x0, schedule, "auto"), "eager": full_loop(model, x0, schedule, "reference")}
    times = {}
    with torch.no_grad():
        for name, loop in loops.items():
            loop()  # warm-up
            samples = []
            for _ in range(3 if on_cuda else 1):
                if on_cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                loop()
                if on_cuda:
                    torch.cuda.synchronize(device)
                samples.append(1e3 * (time.perf_counter() - start))
            times[name] = harness.quantiles(samples)
    rows = []
    where = dict(base, mode="forward", shape=f"{batch}x{'x'.join(map(str, size[1:]))}xT{steps}",
                 dtype=str(dtype).removeprefix("torch."))
    for name, ms in times.items():
        rows.append(dict(where, op="elbo_full_loop", provider=name, metric="time", unit="ms",
                         **harness.quantile_fields(ms)))
        rows.append(dict(where, op="elbo_per_step", provider=name, metric="time", unit="ms",
                         **harness.quantile_fields([value / steps for value in ms])))
    return rows


def main(argv=None):
    parser = harness.parser(__doc__.split("\n")[0], FULL_SIZES)
    parser.add_argument("--loop-steps", type=int, default=None, help="T of the full loop (default: 1000, CPU 20)")
    parser.add_argument("--no-loop", action="store_true", help="time only the vb step")
    args = parser.parse_args(argv)
    dtypes = harness.setup(args)
    rows = run(sizes=FULL_SIZES if args.full else None, dtypes=dtypes, device=args.device, reps=args.reps,
               loop_steps=args.loop_steps, loop=not args.no_loop)
    harness.report(rows, args.out)
    return rows


if __name__ == "__main__":
    main()

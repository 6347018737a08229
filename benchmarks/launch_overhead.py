"""Host µs of one launch of each of our Triton kernels: `kernel[grid](...)`, Triton's
`JITFunction.run`, against kernels/_launch.launch once the kernel is compiled.

Run without the interpreter, as on a GPU: the kernels are JITFunctions launched with the GPU's
launch options (CHECKED), their global values recorded as a compile records them; the driver and
the compiled kernel are benchmarks/host_overhead's fakes (device 0, stream 0, an sm_90 target; a
`run` that does nothing). Each kernel gets the arguments of one call of its op
(fastddpm.functional on backend "triton" at host_overhead.SIZE, its launches recorded, not run).
Left out on both sides: the C launcher (argument packing and cuLaunchKernel) and torch.cuda's
device and stream queries. Process CPU time, `INNER` launches a sample, medians of interleaved
rounds (harness.time_cpu).

    python -m fastddpm.benchmarks.launch_overhead [--reps 30]
"""
import contextlib
import time
import warnings

import torch

from . import harness
from .host_overhead import SIZE, faked_gpu
from .traffic import _swapped

INNER = 200


def _ops():
    from fastddpm import NoiseSchedule
    from fastddpm import functional as F

    schedule = NoiseSchedule.linear(1000)
    generator = torch.Generator().manual_seed(0)
    x0, output, noise = (torch.randn(SIZE, generator=generator) for _ in range(3))
    t = torch.randint(3, 1000, SIZE[:1], generator=generator)
    return (lambda: F.q_sample(x0, t, None, schedule, seed=torch.tensor([5])),
            lambda: F.diffusion_loss(output, x0, noise, t, schedule),
            lambda: F.p_sample_step(output, x0, t, schedule, clip_denoised=True),
            lambda: F.ddim_step(output, x0, t, t - 3, schedule, eta=1.0),
            lambda: F.vb_terms_bpd(output, x0, x0, t, schedule, clip_denoised=True),
            lambda: F.hybrid_loss(torch.cat([output, output], 1), x0, noise, t, schedule))


def recorded_launches():
    """{kernel name: (kernel, grid, args, kwargs)} of the first launch of each kernel by the ops."""
    from fastddpm import backend
    from fastddpm.kernels import hybrid, loss, posterior, q_sample, vlb

    launches = {}

    def record(kernel, grid, *args, **kwargs):
        launches.setdefault(kernel.fn.__name__, (kernel, grid, args, kwargs))

    with contextlib.ExitStack() as stack:
        for module in (q_sample, loss, posterior, vlb, hybrid):
            stack.enter_context(_swapped(module, "launch", record))
        stack.enter_context(_swapped(backend, "_INTERPRETER", True))  # backend "triton" takes CPU tensors (none run)
        stack.enter_context(backend.use_backend("triton"))
        for op in _ops():
            op()
    return launches


def measure(reps=30):
    """{kernel name: {"JITFunction.run" | "launch": [p50, p20, p80] µs a launch}}."""
    from fastddpm.kernels._launch import launch

    results = {}
    with faked_gpu(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton's one-time notices about its defaults
        for name, (kernel, grid, args, kwargs) in recorded_launches().items():
            kernel.cache_key  # the hash a compile computes, which records the kernel's global values

            def jit_run():
                for _ in range(INNER):
                    kernel[grid](*args, **kwargs)

            def direct():
                for _ in range(INNER):
                    launch(kernel, grid, *args, **kwargs)

            timed = harness.time_cpu({"JITFunction.run": jit_run, "launch": direct}, reps, clock=time.process_time)
            results[name] = {path: [1e3 * ms / INNER for ms in values] for path, values in timed.items()}
    return results


def main(argv=None):
    import argparse
    import triton

    parser = argparse.ArgumentParser(description="host µs of one launch of each kernel, Triton's path and ours")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    harness.rerun_with_interpreter(__spec__.name, argv, interpret=False)  # the kernels must be JITFunctions
    torch.set_num_threads(1)
    results = measure(args.reps)
    print(f"Host µs a launch (triton {triton.__version__}, CPU time, faked driver and kernel): p50 [p20, p80]")
    print(f"{'kernel':24} {'JITFunction.run':>24} {'launch':>24} {'ratio':>6}")
    for name, times in results.items():
        (jit50, jit20, jit80), (ours50, ours20, ours80) = times["JITFunction.run"], times["launch"]
        print(f"{name:24} {jit50:8.2f} [{jit20:5.2f}, {jit80:5.2f}] {ours50:8.2f} [{ours20:5.2f}, {ours80:5.2f}] "
              f"{jit50 / ours50:6.2f}")
    return results


if __name__ == "__main__":
    main()

"""Host time per call of every hot path (benchmarks/paths.py): fastddpm's Triton path against the
eager peers, measured on the CPU.

At DDPM's usual sizes a GPU finishes these kernels faster than the host issues them, so a path
costs its host time. Measured here with tiny tensors (2x3x4x4), one thread, the process's CPU
time per call (`INNER` calls per sample), medians over repeats of the interleaved providers
(harness.cpu_samples), the Triton kernels' execution stubbed. Providers:

- fastddpm: the kernels' path with every launch a no-op (the `launch` each kernels module calls
  swapped): Python, argument checks, the dispatcher, autograd and each op's launcher are timed;
  kernels/_launch.launch and Triton's launch path are not.
- fastddpm+launch: the same code with the kernels modules' real `launch` (kernels/_launch.launch)
  and their kernels made JITFunctions, each launch made as on a GPU: the first one of each
  specialization through Triton's real `JITFunction.run` (argument binding and specialization,
  cache key, compile), later ones calling the compiled kernel directly; with a faked driver
  (device 0, stream 0, an sm_90 target) and faked compiles that return a kernel whose `run` does
  nothing. Still excluded: the C launcher (argument packing and cuLaunchKernel,
  a few µs a launch on a GPU) and torch.cuda's device and stream queries.
- reference: fastddpm's PyTorch path (backend "reference"), what runs on CPU tensors.
- diffusers, improved-diffusion: the eager peers.

ATen ops, in every provider, run their CPU kernels on 96 elements, which costs about what their
dispatch does. The ratios, peer / fastddpm and peer / fastddpm+launch, are medians of each repeat's
ratio (paired samples): above 1, fastddpm spends less host time per call.

    python -m fastddpm.benchmarks.host_overhead [--json rows.json]
"""
import contextlib
import importlib
import inspect
import statistics
import time
import types
import warnings

import torch
from triton.compiler import CompiledKernel
from triton.runtime.interpreter import InterpretedFunction

from . import harness, paths
from .traffic import _swapped

SIZE = (2, 3, 4, 4)
INNER = 10
KERNEL_MODULES = ("q_sample", "loss", "posterior", "vlb", "hybrid", "solvers")  # each imports `launch`
PROVIDERS = ("fastddpm", "fastddpm+launch", "reference", "diffusers", "improved-diffusion")
OURS = ("fastddpm", "fastddpm+launch")  # the two the ratios compare with


class _Launches:
    """Launches counted by the stubbed `launch` (the fastddpm provider)."""
    calls = 0


class _FakeDriver:
    def __init__(self, device=0, stream=0):
        self.device, self.stream = device, stream

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return self.stream

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


class _FakeKernel(CompiledKernel):
    """A compiled kernel whose launch does nothing (and which holds no module to unload)."""
    function = packed_metadata = module = None

    def __init__(self):
        pass

    def _init_handles(self):
        pass

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        return None


@contextlib.contextmanager
def faked_gpu(driver=None, kernel=_FakeKernel):
    """Triton's launch path with no GPU: `driver` (a `_FakeDriver()` by default), and compiles
    that return `kernel()`. They do not hash the source, which under the interpreter cannot be
    done (the kernel's callees are no JITFunctions): the global values that a launch checks stay
    unrecorded (3 to 5 of them for our kernels on a GPU)."""
    import triton.compiler
    import triton.runtime.jit as jit

    def compile(src, target=None, options=None, **kwargs):
        return kernel()

    with _swapped(jit, "driver", types.SimpleNamespace(active=driver or _FakeDriver())), \
            _swapped(triton.compiler, "compile", compile):
        yield


def jit_function(kernel, **options):
    """A new JITFunction of a kernel's Python function (a JITFunction's or the interpreter's)."""
    from triton.runtime.jit import JITFunction

    accepted = inspect.signature(JITFunction.__init__).parameters
    given = getattr(kernel, "kwargs", {})  # the interpreter's @triton.jit options
    return JITFunction(kernel.fn, **{k: v for k, v in {**given, **options}.items() if k in accepted})


def _counted(kernel, grid, *args, **kwargs):
    """The fastddpm provider's `launch`: counted, nothing launched."""
    _Launches.calls += 1


class LaunchModes:
    """Switches the kernels modules between the two fastddpm providers with a few setattrs (cheap
    enough to make at the start of every timed step): `stub()`, each module's `launch` is
    `_counted`; `gpu()`, the real kernels/_launch.launch of each module's kernels made JITFunctions
    (see `faked_gpu`), so that the provider times exactly the code a GPU's launch runs;
    `restore()`, the modules as they were."""

    def __init__(self):
        self.original, self.stubbed, self.jit = [], [], []
        for name in KERNEL_MODULES:
            module = importlib.import_module(f"fastddpm.kernels.{name}")
            for attr, value in vars(module).items():
                if attr == "launch" or isinstance(value, InterpretedFunction):
                    self.original.append((module, attr, value))
                    self.stubbed.append((module, attr, _counted if attr == "launch" else value))
                    self.jit.append((module, attr, value if attr == "launch" else jit_function(value)))

    @staticmethod
    def _set(values):
        for module, attr, value in values:
            setattr(module, attr, value)

    def stub(self):
        self._set(self.stubbed)

    def gpu(self):
        self._set(self.jit)

    def restore(self):
        self._set(self.original)


@contextlib.contextmanager
def stubbed_launches():
    """A LaunchModes in stub mode, Triton's launch path faked (`faked_gpu`) for its gpu mode, the
    kernels modules restored after."""
    modes = LaunchModes()
    with warnings.catch_warnings(), faked_gpu():
        warnings.simplefilter("ignore")  # Triton's one-time notices about its defaults
        modes.stub()
        try:
            yield modes
        finally:
            modes.restore()


def _timed(step, switch):
    """`INNER` calls of a paths.Step, its backend and the launch mode set once before them."""
    def timed():
        switch()
        with step.on_backend():
            for _ in range(INNER):
                step.fn()
    return timed


def measure(cases=None, reps=20):
    """({(case, provider): [p50, p20, p80] in µs per call}, {(case, peer, ours): median over the
    repeats of peer µs / ours µs in the same repeat}, {case: Triton launches per call}, the median
    µs of one launch once compiled: (fastddpm+launch - fastddpm) / launches over every case, None
    if left out). Ratios of one repeat's samples are paired: a slow spell of the machine that
    spans a repeat cancels out of them."""
    times, ratios, launches, per_launch = {}, {}, {}, []
    with stubbed_launches() as modes:
        for case in cases or paths.CASES:
            _, steps = case.steps(SIZE)
            timed = {name: _timed(steps[name], modes.stub) for name in PROVIDERS if name in steps}
            timed["fastddpm+launch"] = _timed(steps["fastddpm"], modes.gpu)
            try:
                timed["fastddpm+launch"]()  # the first launch of each kernel "compiles"
            except Exception as error:  # a Triton whose launch path these fakes do not fit
                warnings.warn(f"fastddpm+launch left out: Triton's launch path could not be faked ({error!r})")
                del timed["fastddpm+launch"]
            modes.stub()
            _Launches.calls = 0
            steps["fastddpm"].run()
            launches[case] = _Launches.calls
            order = [name for name in PROVIDERS if name in timed]
            samples = harness.cpu_samples({name: timed[name] for name in order}, reps, clock=time.process_time)
            for name in order:
                times[case, name] = [1e6 * s / INNER for s in harness.quantiles(samples[name])]
            for ours in OURS:
                for peer in order:
                    if ours in samples and peer not in OURS:
                        ratios[case, peer, ours] = statistics.median(
                            theirs / own for theirs, own in zip(samples[peer], samples[ours]))
            if "fastddpm+launch" in timed and launches[case]:
                per_launch.append((times[case, "fastddpm+launch"][0] - times[case, "fastddpm"][0]) / launches[case])
    return times, ratios, launches, statistics.median(per_launch) if per_launch else None


def rows(times, ratios):
    """Long-format rows (harness.FIELDS): metric host_us per case and provider, and metric
    host_ratio (peer / ours, paired; ours named by `mode`) per case and peer."""
    base = harness.environment(torch.device("cpu"))
    return ([dict(base, op=case.op, provider=provider, mode="host", metric="host_us", unit="us",
                  **harness.case_fields(SIZE, case.dtype), **harness.quantile_fields(values))
             for (case, provider), values in times.items()]
            + [dict(base, op=case.op, provider=peer, mode=f"vs {ours}", metric="host_ratio", unit="x",
                    **harness.case_fields(SIZE, case.dtype), **harness.quantile_fields([ratio] * 3))
               for (case, peer, ours), ratio in ratios.items()])


def format_table(times, ratios, launches, per_launch):
    lines = [f"Host time per call (µs; CPU, {torch.get_num_threads()} thread, {'x'.join(map(str, SIZE))}, "
             "Triton grid execution stubbed); ratio = this / ours, the median of each repeat's ratio",
             f"{'op':16} {'dtype':9} {'provider':19} {'p50':>8} {'p20':>8} {'p80':>8} "
             f"{'vs stub':>8} {'vs +launch':>10}"]
    for case in dict.fromkeys(case for case, _ in times):
        for (c, provider), (p50, p20, p80) in times.items():
            if c is case:
                stub, full = ("" if ratio is None else f"{ratio:.2f}"
                              for ratio in (ratios.get((case, provider, ours)) for ours in OURS))
                lines.append(f"{case.op:16} {str(case.dtype)[6:]:9} {provider:19} {p50:8.1f} {p20:8.1f} {p80:8.1f} "
                             f"{stub:>8} {full:>10}")
        lines.append(f"{'':27}{launches[case]} Triton launches a call")
    if per_launch is not None:
        lines.append(f"Launch path (kernels/_launch.launch once compiled, faked driver and kernel): "
                     f"{per_launch:.1f} µs a launch (median over the paths)")
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import json

    parser = argparse.ArgumentParser(description="host µs per call of every hot path, fastddpm against its peers")
    parser.add_argument("--only", nargs="+", default=None, metavar="OP", help="only these ops")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", default=None, help="write the long-format rows to this file")
    args = parser.parse_args(argv)
    harness.rerun_with_interpreter(__spec__.name, argv)
    torch.set_num_threads(1)
    cases = [case for case in paths.CASES if args.only is None or case.op in args.only]
    times, ratios, launches, per_launch = measure(cases, args.reps)
    print(format_table(times, ratios, launches, per_launch))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows(times, ratios), handle, indent=2, default=str)
    return times, ratios


if __name__ == "__main__":
    main()

"""Launches, bytes and host syncs of one call of a hot path, counted on the CPU as a GPU runs it.

`count(fn, numel)` calls `fn()` once to warm up (cached tables, first-call work), then counts
a second call. Needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported) for
the kernels; the paths themselves pick the backend ("triton" for fastddpm's kernels).
`python -m fastddpm.benchmarks.traffic` prints the table of every hot path (benchmarks/paths.py).

- Triton: every grid launch (`GridExecutor.__call__`) is one launch, whatever the grid; every
  load and store moves (elements whose mask is true) x element size bytes
  (`InterpreterBuilder.create_masked_load/store`; unmasked and scalar `tl.load`s come through
  `create_load`/`create_store`, counted once, once per program), an atomic a read and a write;
  block-pointer and tensor-descriptor accesses are not modelled and raise.
- ATen: a TorchDispatchMode sees every op, autograd's backward included (its `ones_like` seed,
  the zeros it materialises for outputs without gradient). An op launches a kernel if it writes
  a tensor that is not empty (views, `empty*`, `set_`, `resize_` do not), or is `_assert_async`.
  Its bytes: what it reads and writes, each tensor at its distinct addresses (an expanded
  (B, 1, 1, 1) coefficient reads B elements); an in-place op reads and writes its target, fills,
  RNG and copies only write it, `*_like` factories do not read their input, a gather reads only
  the elements it gathers. ATen ops that launch two kernels on CUDA are modelled from ATen's
  source (`CUDA_EXTRA`). Ops outside the aten namespace are custom ops (fastddpm::*): not a
  launch themselves, the ops of their implementation are counted. `_local_scalar_dense`
  (`.item()`) and `nonzero` of a device tensor count as host syncs.
- Host tensors: on a GPU, diffusers' scheduler keeps its tables on the CPU and its per-step
  scalar math runs there, launching nothing. Tensors given as `host=`, data made from Python
  numbers (`torch.tensor`) and what is computed from host tensors only are host tensors: their
  ops are not counted; a 0-d one in a device op is a kernel argument; a larger one must have
  been copied to the device (a `.to(device)` that is a no-op on the CPU, as improved-diffusion's
  gathers do): one "host-to-device copy" launch of its bytes.
- t's range check (`fastddpm._checks.check_timesteps`) is exact on the host for CPU tensors,
  and an asynchronous device assert (ge, lt, and, all, _assert_async) on GPUs and under
  torch.compile. While counting, `fastddpm._checks` sees `torch.compiler.is_compiling()` as
  True (its module-level name `torch` is swapped for a view of torch that differs only there),
  so the check takes the GPU's branch; nothing else changes.
"""
import contextlib
import dataclasses
import types
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ATen ops that write a tensor but launch no kernel.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted", "set_",
             "resize_", "resize_as_", "_resize_output_", "as_strided_", "squeeze_", "unsqueeze_", "transpose_", "t_",
             "detach_", "lift", "lift_fresh", "_local_scalar_dense"}
# In-place ops that overwrite their target without reading it (`*_like` and `new_*` factories
# do not read their first argument either).
WRITE_ONLY = {"fill_", "zero_", "copy_", "normal_", "uniform_", "random_", "exponential_", "bernoulli_", "geometric_",
              "log_normal_", "cauchy_"}
# Ops that read only the elements they gather from their first argument.
GATHERS = {"index", "index_select", "gather", "take", "embedding"}
ALWAYS_LAUNCH = {"_assert_async", "_functional_assert_async"}
SYNCS = {"_local_scalar_dense", "nonzero", "masked_select"}


def _mse_loss(args, kwargs):
    """mse_loss_out with a reduction writes the elementwise loss, then mean_out / sum_out reads it."""
    reduction = args[2] if len(args) > 2 else kwargs.get("reduction", 1)
    return (1, 2 * args[0].numel() * args[0].element_size()) if reduction else (0, 0)


def _mse_loss_backward(args, kwargs):
    """mse_loss_backward zero-fills grad_input (at::zeros_like(input)) before its kernel."""
    return 1, args[1].numel() * args[1].element_size()


# (extra launches, extra bytes) of ATen ops that launch more than one kernel on CUDA.
CUDA_EXTRA = {"mse_loss": _mse_loss, "mse_loss_backward": _mse_loss_backward}


@dataclasses.dataclass
class Traffic:
    """One call's count. `kernels`: (name, bytes) per launch, in order."""
    launches: int = 0
    bytes: int = 0
    syncs: int = 0
    numel: int | None = None
    kernels: list = dataclasses.field(default_factory=list)

    @property
    def bytes_per_element(self):
        return self.bytes / self.numel if self.numel else None

    def add(self, name, moved, launches=1):
        self.launches += launches
        self.bytes += moved
        self.kernels.append((name, moved))

    def __str__(self):
        per_element = f"{self.bytes_per_element:.2f} B/element, " if self.numel else ""
        return f"{self.launches} launches, {per_element}{self.bytes} B, {self.syncs} syncs"


def footprint(tensor):
    """Bytes at distinct addresses: stride-0 (expanded) dimensions count once."""
    if tensor.numel() == 0:
        return 0
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        elements *= size if stride != 0 else 1
    return elements * tensor.element_size()


def count(fn, numel=None, *, host=(), warmup=1):
    """Traffic of one call of `fn()` after `warmup` calls; bytes per element over `numel`."""
    with _as_on_gpu():
        for _ in range(warmup):
            fn()
        traffic = Traffic(numel=numel)
        counter = _AtenCounter(traffic, host)
        with _TritonCounter(traffic, counter), counter:
            fn()
    return traffic


# -- ATen ---------------------------------------------------------------------------------


class _AtenCounter(TorchDispatchMode):
    def __init__(self, traffic, host=()):
        super().__init__()
        self.traffic = traffic
        self.paused = 0
        self.host = {}  # id -> weakref of host tensors
        for tensor in host:
            self._mark_host(tensor)

    def _mark_host(self, tensor):
        self.host[id(tensor)] = weakref.ref(tensor)

    def _is_host(self, tensor):
        ref = self.host.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten":
            # A custom op: not a launch itself; count what its implementation runs (the mode is
            # popped while an op runs, so push it again around the backend kernel).
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        if not self.paused:
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out):
        name = func.overloadpacket.__name__
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        outputs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        to_device = name == "_to_copy" and kwargs.get("device") is not None  # host -> device copy
        if name in ("lift", "lift_fresh") or (inputs and all(map(self._is_host, inputs)) and not to_device):
            for tensor in outputs:  # data made from Python numbers, or host math: stays on the host
                self._mark_host(tensor)
            return
        if name in SYNCS:
            self.traffic.syncs += 1
        if func.is_view or name in NO_KERNEL:
            return
        for tensor in inputs:
            if self._is_host(tensor) and tensor.ndim > 0 and not to_device:
                # On a GPU only 0-d host tensors enter a kernel (as arguments): a larger one was
                # copied first, by a `.to(device)` that is a no-op on the CPU.
                self.traffic.add("host-to-device copy", footprint(tensor))
        written, read = [], 0
        for index, argument in enumerate(func._schema.arguments):
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            tensors = [x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor) and not self._is_host(x)]
            mutated = argument.alias_info is not None and argument.alias_info.is_write
            if mutated:
                written += tensors
            if index == 0 and name in GATHERS:
                read += sum(map(footprint, outputs))  # only the gathered elements
            elif not (index == 0 and (name in WRITE_ONLY or name.endswith("_like") or name.startswith("new_"))
                      or mutated and argument.is_out):
                read += sum(map(footprint, tensors))
        aliased = {x.data_ptr() for x in written}
        written += [x for x in outputs if x.data_ptr() not in aliased or x.numel() == 0]
        if not any(x.numel() for x in written) and name not in ALWAYS_LAUNCH:
            return  # metadata only, or an empty result: no kernel
        extra_launches, extra_bytes = CUDA_EXTRA[name](args, kwargs) if name in CUDA_EXTRA else (0, 0)
        self.traffic.add(f"aten.{name}", read + sum(map(footprint, written)) + extra_bytes, 1 + extra_launches)


# -- Triton ---------------------------------------------------------------------------------


class _TritonCounter:
    """Counts grid launches and memory accesses of the interpreter while active."""

    UNMODELLED = ("create_tensor_pointer_load", "create_tensor_pointer_store", "create_descriptor_load",
                  "create_descriptor_store", "create_descriptor_gather", "create_descriptor_scatter")

    def __init__(self, traffic, aten):
        self.traffic, self.aten = traffic, aten
        self.moved = 0  # bytes of the launch in progress
        self.depth = 0  # create_load calls create_masked_load: count the outer one
        self.stack = contextlib.ExitStack()

    def __enter__(self):
        from triton.runtime import interpreter
        builder = interpreter.interpreter_builder
        patch = self._patch
        patch(interpreter.GridExecutor, "__call__", self._launch)
        patch(builder, "create_masked_load", self._access(lambda ptr, mask, *_: (ptr, mask, 1)))
        patch(builder, "create_masked_store", self._access(lambda ptr, value, mask, *_: (ptr, mask, 1)))
        patch(builder, "create_load", self._access(lambda ptr, *_: (ptr, None, 1)))
        patch(builder, "create_store", self._access(lambda ptr, *_: (ptr, None, 1)))
        patch(builder, "create_atomic_rmw", self._access(lambda op, ptr, value, mask, *_: (ptr, mask, 2)))
        patch(builder, "create_atomic_cas", self._access(lambda ptr, *_: (ptr, None, 2)))
        for name in self.UNMODELLED:
            patch(builder, name, self._unmodelled(name))
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def _patch(self, owner, name, make):
        original = getattr(owner, name, None)
        if original is None:
            return
        self.stack.enter_context(_swapped(owner, name, make(original)))

    def _launch(self, original):
        counter = self

        def call(executor, *args, **kwargs):
            counter.moved = 0
            counter.aten.paused += 1  # the interpreter's own host copies of the arguments
            try:
                return original(executor, *args, **kwargs)
            finally:
                counter.aten.paused -= 1
                counter.traffic.add(f"triton.{executor.fn.__name__}", counter.moved)
        return call

    def _access(self, operands):
        """Wraps a memory op; `operands(*args)` gives (pointers, mask or None, accesses per element)."""
        def make(original):
            def access(*args, **kwargs):
                self.depth += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self.depth -= 1
                    if self.depth == 0:
                        self.moved += _moved(*operands(*args))
            return access
        return make

    @staticmethod
    def _unmodelled(name):
        def make(original):
            def refuse(*args, **kwargs):
                raise NotImplementedError(f"traffic.count does not model {name}")
            return refuse
        return make


def _moved(pointers, mask, accesses):
    element_type = pointers.get_element_ty() if hasattr(pointers, "get_element_ty") else pointers.dtype.element_ty
    size = max(1, element_type.primitive_bitwidth // 8)
    data = np.asarray(pointers.data)
    elements = data.size if mask is None else int(np.count_nonzero(np.broadcast_to(mask.data, data.shape)))
    return accesses * elements * size


@contextlib.contextmanager
def _swapped(owner, name, value):
    """owner.name = value for the block; an instance attribute is removed again, a class one restored."""
    had_own = name in vars(owner)
    original = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


@contextlib.contextmanager
def _as_on_gpu():
    """`fastddpm._checks` sees torch.compiler.is_compiling() as True: check_timesteps takes the
    device-assert branch that CUDA tensors take."""
    from fastddpm import _checks

    class TorchAsOnGpu(types.ModuleType):
        compiler = types.SimpleNamespace(is_compiling=lambda: True)

        def __getattr__(self, name):
            return getattr(torch, name)

    with _swapped(_checks, "torch", TorchAsOnGpu("torch")):
        yield


# -- the table of every hot path -------------------------------------------------------------

PROVIDERS = ("fastddpm", "diffusers", "improved-diffusion")  # the reference path is not what runs on GPUs


def measure(cases=None, size=None):
    """{(case, provider): Traffic} of fastddpm and each peer, at `size` (default paths.SIZE)."""
    from . import paths

    result = {}
    for case in cases or paths.CASES:
        main, steps = case.steps(size or paths.SIZE)
        for provider in PROVIDERS:
            if provider in steps:
                step = steps[provider]
                result[case, provider] = count(step.run, main.numel(), host=step.host)
    return result


def rows(counts, size):
    """Long-format rows (benchmarks/harness.py FIELDS): launches and bytes_per_element per
    case and provider, and the floor's."""
    from . import harness

    base = harness.environment(torch.device("cpu"))
    result = []
    for case in dict.fromkeys(case for case, _ in counts):
        where = dict(base, op=case.op, mode=case.mode, **harness.case_fields(size, case.dtype))
        values = {provider: (traffic.launches, traffic.bytes_per_element)
                  for (c, provider), traffic in counts.items() if c is case}
        values["floor"] = (case.floor_launches, float(case.floor))
        for provider, (launches, per_element) in values.items():
            for metric, unit, value in (("launches", "launches", launches),
                                        ("bytes_per_element", "B/element", per_element)):
                result.append(dict(where, provider=provider, metric=metric, unit=unit, p50=value, p20=value,
                                   p80=value))
    return result


def format_table(counts, size):
    lines = [f"Traffic per call at {'x'.join(map(str, size))}, counted on the CPU as a GPU runs it "
             "(fastddpm: Triton kernels under the interpreter)",
             f"{'op':15} {'dtype':9} {'provider':19} {'launches':>8} {'B/element':>10} {'syncs':>5}"]
    for case in dict.fromkeys(case for case, _ in counts):
        for (c, provider), traffic in counts.items():
            if c is case:
                lines.append(f"{case.op:15} {str(case.dtype)[6:]:9} {provider:19} {traffic.launches:8d} "
                             f"{traffic.bytes_per_element:10.2f} {traffic.syncs:5d}")
        lines.append(f"{case.op:15} {str(case.dtype)[6:]:9} {'floor':19} {case.floor_launches:8d} "
                     f"{float(case.floor):10.2f}")
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import json

    from . import harness, paths

    parser = argparse.ArgumentParser(description="launches and bytes per element of every hot path and its peers")
    parser.add_argument("--size", default="x".join(map(str, paths.SIZE)), help="the main tensor's shape, e.g. 16x3x32x32")
    parser.add_argument("--only", nargs="+", default=None, metavar="OP", help="only these ops")
    parser.add_argument("--json", default=None, help="write the long-format rows to this file")
    args = parser.parse_args(argv)
    harness.rerun_with_interpreter(__spec__.name, argv)
    torch.set_num_threads(1)
    size = tuple(int(n) for n in args.size.split("x"))
    cases = [case for case in paths.CASES if args.only is None or case.op in args.only]
    counts = measure(cases, size)
    print(format_table(counts, size))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows(counts, size), handle, indent=2, default=str)
    return counts


if __name__ == "__main__":
    main()

"""`launch(kernel, grid, *args, **kwargs)`: `kernel[grid](*args, **kwargs)` with less host time.

Triton's `JITFunction.run` binds the arguments, specializes them, builds a string cache key
and looks the compiled kernel up on every launch: about 20 µs of host time for our 15-argument
kernels, more than a GPU spends running them at DDPM's sizes. Here the first launch of each
specialization goes through `kernel[grid]`, which compiles if needed and returns the
CompiledKernel; later launches with the same key call that kernel's `run` directly, with the
very arguments `JITFunction.run` would pass it (grid, stream, function, packed metadata,
launch metadata, launch hooks, argument values).

The key is at least as fine as Triton's: the device; the keyword names, types and values
(constexprs and launch options) and the options `run` adds (the debug flag and, by version,
the instrumentation knobs); for each positional argument, a tensor's dtype and 16-byte
alignment or a scalar's type and value (Triton's divisibility, ==1 and int32/int64 classes
are functions of the value, and `do_not_specialize` only makes its key coarser). Everything
else takes the normal path on every call: other argument types, constexprs passed by
position, callable grids, pre-run hooks, global values that changed (Triton raises there),
a backend other than CUDA, and any Triton whose `JITFunction.run` is not one read for this
file (identified by a hash of its source, `_LAYOUTS`). So does the interpreter
(TRITON_INTERPRET=1), whose kernels are not JITFunctions. The device and stream are queried
on each call as `run` queries them, so launches follow the current device and stream (a CUDA
graph capture's included) and capture the same way.
"""
import functools
import hashlib
import inspect
import os

from torch import Tensor
from triton.compiler import CompiledKernel
from triton.runtime import jit

_MAX_ENTRIES = 512  # keys kept per kernel (every new int value is a key): cleared beyond
_SCALARS = (bool, int, float, type(None))  # positional arguments keyed by type and value
_CONSTANTS = (bool, int, str, type(None))  # keyword values keyed by type and value (no floats: -0.0 == 0.0)
_NORMAL = object()  # a spec or an entry whose launches always take `kernel[grid]`
_MISSING = object()
_specs = {}  # (id(kernel), *argument types) -> `_spec`


def _debug_env():
    return os.environ.get("TRITON_DEBUG", "0") == "1"


def _options_32(kernel, kwargs):
    return kwargs.get("debug", False) or _debug_env(),


def _options_33(kernel, kwargs):
    return kwargs.get("debug", kernel.debug) or _debug_env(),


def _options_34(kernel, kwargs):
    return kwargs.get("debug", kernel.debug) or jit.knobs.runtime.debug,


def _options_36(kernel, kwargs):
    knobs = jit.knobs
    return kwargs.get("debug", kernel.debug) or knobs.runtime.debug, knobs.compilation.instrumentation_mode


def _options_39(kernel, kwargs):
    knobs = jit.knobs
    compilation = knobs.compilation
    return (kwargs.get("debug", kernel.debug) or knobs.runtime.debug, compilation.instrumentation_mode,
            compilation.fpsan_homomorphic_casts)


# sha256 of inspect.getsource(JITFunction.run), first 16 hex digits -> (the options `run` adds
# to the kwargs, constexpr values passed to the kernel (3.2 passes only the others), launch hooks
# read from knobs.runtime (else from CompiledKernel), add_stages_inspection_hook checked).
_LAYOUTS = {
    "c0fa2cfc1f214c89": (_options_32, False, False, False),  # 3.2.0
    "860b92e1d4829969": (_options_33, True, False, False),  # 3.3.1
    "c09793349906dcc4": (_options_34, True, True, False),  # 3.4.0
    "c70e9a09e69c01e4": (_options_34, True, True, False),  # 3.5.1
    "966265fd6647e6c1": (_options_36, True, True, False),  # 3.6.0
    "8686893714b9aef1": (_options_36, True, True, True),  # 3.7.1, 3.8.0
    "3293f3bc9eab4de7": (_options_39, True, True, True),  # 3.9.0
}


@functools.cache
def _layout():
    """(JITFunction.run, its entry of _LAYOUTS), or None if it has none."""
    run = jit.JITFunction.run
    try:
        layout = _LAYOUTS.get(hashlib.sha256(inspect.getsource(run).encode()).hexdigest()[:16])
    except (OSError, TypeError):  # no source
        return None
    return None if layout is None else (run, *layout)


def _spec(kernel, types):
    """What `launch` needs for `kernel` with positional arguments of these types: (the kernel, kept
    so that its id stays its own; the key function; {key: entry}; the layout's fields), or _NORMAL
    where every launch takes `kernel[grid]` (no layout, or an argument type the key cannot hold)."""
    layout = _layout() if type(kernel) is jit.JITFunction else None
    key_function = None if layout is None else _key_function(types)
    return _NORMAL if key_function is None else (kernel, key_function, {}, *layout)


def _key_function(types):
    """For positional arguments of these types, a function of them that gives each tensor's dtype
    and 16-byte alignment and each scalar itself (generated: no call per argument); None if a
    type is neither."""
    if not all(issubclass(t, Tensor) or t in _SCALARS for t in types):
        return None
    names = [f"a{i}" for i in range(len(types))]
    parts = [f"{a}.dtype, not {a}.data_ptr() & 15" if issubclass(t, Tensor) else a for a, t in zip(names, types)]
    namespace = {}
    exec(f"def key({', '.join(names)}):\n    return ({', '.join(parts)},)", namespace)
    return namespace["key"]


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`; constexprs go by keyword. Returns the CompiledKernel."""
    spec = _specs.get((id(kernel), *map(type, args)))
    if spec is None:
        types = tuple(map(type, args))
        spec = _specs[(id(kernel), *types)] = _spec(kernel, types)
    if spec is _NORMAL:
        return kernel[grid](*args, **kwargs)
    _, key_function, entries, run, options, all_args, knob_hooks, stages_hook = spec
    if jit.JITFunction.run is not run:  # patched since
        return kernel[grid](*args, **kwargs)
    active = jit.driver.active
    device = active.get_current_device()
    stream = active.get_current_stream(device)
    key = (device, *options(kernel, kwargs), *kwargs, *kwargs.values(), *map(type, kwargs.values()),
           *key_function(*args))
    try:
        entry = entries.get(key)
    except TypeError:  # an unhashable keyword value
        return kernel[grid](*args, **kwargs)
    if entry is _NORMAL or type(grid) is not tuple or kernel.pre_run_hooks or (
            stages_hook and jit.knobs.runtime.add_stages_inspection_hook is not None):
        return kernel[grid](*args, **kwargs)
    if entry is None or kernel.used_global_vals is not entry[2]:
        return _first_launch(kernel, entries, key, all_args, grid, args, kwargs)
    compiled, tail, _, seen = entry
    for scope, name, value in seen:
        if scope.get(name, _MISSING) is not value:  # a global rebound since: Triton compares (and raises)
            return _first_launch(kernel, entries, key, all_args, grid, args, kwargs)
    values = args + tail
    hooks = jit.knobs.runtime if knob_hooks else kernel.CompiledKernel
    enter_hook = hooks.launch_enter_hook
    # as JITFunction.run: launch metadata first, then run, function, packed metadata in this order;
    # without an enter hook launch_metadata returns None at once (3.2-3.9): not called then
    grid_size = len(grid)
    launch_metadata = None if enter_hook is None else compiled.launch_metadata(grid, stream, *values)
    compiled.run(grid[0], grid[1] if grid_size > 1 else 1, grid[2] if grid_size > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, launch_metadata, enter_hook,
                 hooks.launch_exit_hook, *values)
    return compiled


def _first_launch(kernel, entries, key, all_args, grid, args, kwargs):
    """The normal launch, and the entry for later ones with this key."""
    compiled = kernel[grid](*args, **kwargs)
    if len(entries) >= _MAX_ENTRIES:
        entries.clear()
    entries[key] = _entry(kernel, compiled, all_args, args, kwargs)
    return compiled


def _entry(kernel, compiled, all_args, args, kwargs):
    """(compiled kernel, the argument values `run` passes after `args`, the kernel's recorded
    global values and the objects they were checked against by this launch), or _NORMAL where
    a later launch with this key could not be made as JITFunction.run makes it."""
    params = kernel.params
    by_name = {param.name: param for param in params}
    if (not isinstance(compiled, CompiledKernel) or hasattr(compiled, "result")  # 3.5, 3.6 would call it
            or jit.driver.active.get_current_target().backend != "cuda"
            or any(param.is_constexpr for param in params[:len(args)])
            or any(name in by_name and not by_name[name].is_constexpr for name in kwargs)
            or not all(type(value) in _CONSTANTS for value in kwargs.values())):
        return _NORMAL
    defaults = kernel.signature.parameters
    tail = tuple(kwargs[param.name] if param.name in kwargs else defaults[param.name].default
                 for param in params[len(args):] if all_args or not param.is_constexpr)
    used = kernel.used_global_vals
    seen = tuple((scope, name, scope.get(name, _MISSING)) for (name, _), (_, scope) in used.items())
    return compiled, tail, used, seen

"""kernels/_launch.launch against Triton's own JITFunction.run, with no GPU.

Both run on JITFunctions of our kernels with benchmarks/host_overhead's faked driver and faked
compiles, whose kernels record what their `run` is given. From the launches our ops really make
(captured under the interpreter), each argument is varied in turn (dtype, alignment, None,
integers divisible by 16 or not, 1, beyond int32, equal values of another type, each constexpr,
the launch options, the device, the knobs): `run` must get the same arguments from both, the
compiled kernel named by the Triton cache key it was compiled for, so that a kernel compiled for
one specialization never serves another. A second pass over the same variations, on fresh
tensors and other streams, must not go through JITFunction.run at all.
"""
import contextlib
import functools
import itertools

import pytest
import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel
from triton.runtime import jit
from triton.runtime.interpreter import InterpretedFunction

import fastddpm
from fastddpm import NoiseSchedule
from fastddpm import functional as F
from fastddpm.benchmarks import host_overhead
from fastddpm.benchmarks.host_overhead import _FakeDriver, _FakeKernel, faked_gpu, jit_function
from fastddpm.kernels import _launch, loss
from fastddpm.kernels._common import _checked_launch_options
from fastddpm.kernels._launch import launch

CHECKED = _checked_launch_options()  # what a GPU launch adds
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INTS = (torch.int64, torch.int32)
_streams = itertools.count(100)


class _Recording(_FakeKernel):
    launches = []

    def launch_metadata(self, grid, stream, *args):
        """As Triton's (3.2-3.9): None without an enter hook."""
        return None if _hook_owner().launch_enter_hook is None else ("metadata", grid, stream, args)

    def run(self, *args):
        self.launches.append((self, args))


@functools.cache
def _ops():
    """The launches of one call of each op on backend "triton": {kernel name: (kernel, grid, args, kwargs)}."""
    schedule = NoiseSchedule.linear(50)
    generator = torch.Generator().manual_seed(0)
    x0, output, noise = (torch.randn(2, 3, 5, 5, generator=generator) for _ in range(3))
    t = torch.tensor([7, 31])
    seed = torch.tensor([5])
    captured = {}

    def grid_of(kernel, grid):
        return lambda *args, **kwargs: captured.setdefault(kernel.fn.__name__, (kernel, grid, args, kwargs))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InterpretedFunction, "__getitem__", grid_of)
        previous = fastddpm.get_backend()
        fastddpm.set_backend("triton")
        try:
            F.q_sample(x0, t, None, schedule, seed=seed)
            F.diffusion_loss(output, x0, noise, t, schedule)
            F.p_sample_step(output, x0, t, schedule, clip_denoised=True)
            F.ddim_step(output, x0, t, t - 3, schedule, eta=1.0)
            F.vb_terms_bpd(output, x0, x0, t, schedule, clip_denoised=True)
            F.hybrid_loss(torch.cat([output, output], 1), x0, noise, t, schedule)
        finally:
            fastddpm.set_backend(previous)
    return captured


KERNELS = ("q_sample_kernel", "diffusion_loss_kernel", "p_sample_kernel", "ddim_kernel", "vb_terms_kernel",
           "vlb_loss_kernel")


def _tensor(dtype, numel, offset=0):
    """A fresh tensor, `offset` elements into its storage (offset 1: not 16-byte aligned)."""
    return torch.zeros(numel + offset, dtype=dtype)[offset:]


def _like(arg):
    """A recipe for a fresh argument like `arg` (a tensor: its dtype, size and alignment)."""
    if isinstance(arg, torch.Tensor):
        return lambda: _tensor(arg.dtype, arg.numel(), 1 if arg.data_ptr() % 16 else 0)
    return lambda: arg


def _variations(args, kwargs):
    """(name, positional recipes, keyword arguments, device): the op's launch, then each argument changed."""
    base = [_like(arg) for arg in args]
    kwargs = {**kwargs, **CHECKED}

    def changed(i, recipe):
        return base[:i] + [recipe] + base[i + 1:]

    yield "base", base, kwargs, 0
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            for dtype in (FLOATS if arg.dtype.is_floating_point else INTS):
                if dtype != arg.dtype:
                    yield f"{i}:{dtype}", changed(i, lambda d=dtype, n=arg.numel(): _tensor(d, n)), kwargs, 0
            offset = 0 if arg.data_ptr() % 16 else 1  # the other alignment (an empty tensor's pointer is 0)
            misaligned = changed(i, lambda d=arg.dtype, n=max(arg.numel(), 1): _tensor(d, n, offset))
            yield f"{i}:offset {offset}", misaligned, kwargs, 0
            yield f"{i}:None", changed(i, lambda: None), kwargs, 0
        elif type(arg) is int:
            others = (arg + 1, arg + 16, 1, 16, 0, 2 ** 31 + 16, 2 ** 31 + 1, -5)  # int32 and int64, 16 | value or not
            for value in dict.fromkeys(v for v in others if v != arg):
                yield f"{i}={value}", changed(i, lambda v=value: v), kwargs, 0
            yield f"{i}={float(arg)}", changed(i, lambda v=float(arg): v), kwargs, 0  # equal, another type
        else:
            yield f"{i}={arg + 0.5}", changed(i, lambda v=arg + 0.5: v), kwargs, 0
    for name, value in kwargs.items():
        if type(value) is bool:
            yield f"{name}={not value}", base, {**kwargs, name: not value}, 0
            yield f"{name}={int(value)}", base, {**kwargs, name: int(value)}, 0  # equal, another type
        elif name == "BLOCK":
            yield f"{name}=128", base, {**kwargs, name: 128 if value != 128 else 256}, 0
        elif name == "num_warps":
            other = 8 if value != 8 else 4
            yield f"{name}={other}", base, {**kwargs, name: other}, 0
        else:
            yield f"{name}={value + 1}", base, {**kwargs, name: value + 1}, 0
    yield "no options", base, {k: v for k, v in kwargs.items() if k not in CHECKED}, 0
    yield "device 1", base, kwargs, 1


def _triton_key(fn, device, compiled):
    cache = fn.device_caches[device][0] if hasattr(fn, "device_caches") else fn.cache[device]
    return next(key for key, value in cache.items() if value is compiled)


def _launched(fn, device, call):
    """What `call` made the compiled kernel's run get, its function replaced by its Triton key."""
    _Recording.launches.clear()
    call()
    (compiled, args), = _Recording.launches
    return args[:4] + (_triton_key(fn, device, compiled),) + args[5:]


def _same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


class _Counted:
    """Counts JITFunction.run calls of `fn` (the normal path)."""

    def __init__(self, fn):
        self.calls, self.run = 0, fn.run
        fn.run = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.run(*args, **kwargs)


@contextlib.contextmanager
def _faked():
    driver = _FakeDriver()
    with faked_gpu(driver, _Recording):
        yield driver


def _compare(driver, ref, ours, grid, args, kwargs, device):
    """Launch through both; assert the kernel's run got the same. Returns ours' JITFunction.run calls."""
    driver.device, driver.stream = device, next(_streams)
    expected = _launched(ref, device, lambda: ref.run(*args, grid=grid, warmup=False, **kwargs))
    before = ours.run.calls
    got = _launched(ours, device, lambda: launch(ours, grid, *args, **kwargs))
    assert _same(got, expected)
    return ours.run.calls - before


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("do_not_specialize", [False, True])
def test_run_gets_what_jit_run_gives(name, do_not_specialize):
    kernel, grid, args, kwargs = _ops()[name]
    unspecialized = [i for i, arg in enumerate(args) if type(arg) is int][:1] + [0]  # an int and a pointer
    variations = list(_variations(args, kwargs))
    with _faked() as driver:
        options = {"do_not_specialize": unspecialized} if do_not_specialize else {}
        ref, ours = jit_function(kernel, **options), jit_function(kernel, **options)
        _Counted(ours)
        for _, recipes, call_kwargs, device in variations:
            _compare(driver, ref, ours, grid, [make() for make in recipes], call_kwargs, device)
        assert ours.run.calls == len(variations)  # each one a new key
        for variation, recipes, call_kwargs, device in variations:  # fresh tensors, other streams: direct
            assert _compare(driver, ref, ours, grid, [make() for make in recipes], call_kwargs, device) == 0, variation


def _hook_owner():
    return jit.knobs.runtime if hasattr(jit, "knobs") else CompiledKernel


@pytest.mark.parametrize("setting", ["hooks", "debug", "instrumentation_mode", "fpsan_homomorphic_casts"])
def test_run_follows_hooks_and_knobs(setting, monkeypatch):
    """Launch hooks are read at every launch; knobs that JITFunction.run adds to the options change the key."""
    kernel, grid, args, kwargs = _ops()["q_sample_kernel"]
    recipes = [_like(arg) for arg in args]
    if setting == "hooks":
        def change(i):
            monkeypatch.setattr(_hook_owner(), "launch_enter_hook", lambda *a: i)
            monkeypatch.setattr(_hook_owner(), "launch_exit_hook", lambda *a: -i)
    elif setting == "debug":  # not given at launch: from the environment (3.2, 3.3) or knobs
        def change(i):
            monkeypatch.setenv("TRITON_DEBUG", str(i % 2))
            if hasattr(jit, "knobs"):
                monkeypatch.setattr(jit.knobs.runtime, "debug", bool(i % 2))
    elif not hasattr(jit, "knobs") or not hasattr(jit.knobs.compilation, setting):
        pytest.skip(f"no {setting} knob in triton {triton.__version__}")
    elif setting == "instrumentation_mode":
        def change(i):
            monkeypatch.setattr(jit.knobs.compilation, setting, ["", "fpsan"][i % 2])
    else:
        def change(i):
            monkeypatch.setenv("TRITON_FPSAN_HOMOMORPHIC_CASTS", str(i % 2))
    with _faked() as driver:
        ref, ours = jit_function(kernel), jit_function(kernel)
        _Counted(ours)
        direct = 0
        for i in range(6):
            change(i)
            direct += _compare(driver, ref, ours, grid, [make() for make in recipes], kwargs, 0) == 0
        assert direct == (5 if setting == "hooks" else 4)  # the first launch, and the first one with the knob on


def test_launches_that_jit_run_must_make_go_through_it():
    """A callable grid, pre-run hooks and constexprs given by position take the normal path, every time."""
    kernel, grid, args, kwargs = _ops()["q_sample_kernel"]
    recipes = [_like(arg) for arg in args]
    hooked = []
    with _faked() as driver:
        ref, ours = jit_function(kernel), jit_function(kernel)
        _Counted(ours)
        for _ in range(2):
            for call_grid in (grid, lambda meta: grid):
                _compare(driver, ref, ours, call_grid, [make() for make in recipes], kwargs, 0)
        assert ours.run.calls == 3
        ours.add_pre_run_hook(lambda *a, **k: hooked.append(1))
        ref.add_pre_run_hook(lambda *a, **k: None)
        for _ in range(2):
            _compare(driver, ref, ours, grid, [make() for make in recipes], kwargs, 0)
        assert ours.run.calls == 5 and len(hooked) == 2
        ours.pre_run_hooks.clear()
        ref.pre_run_hooks.clear()
        positional = [make() for make in recipes] + list(kwargs.values())[:1]  # the first constexpr
        for _ in range(2):
            _compare(driver, ref, ours, grid, positional, dict(list(kwargs.items())[1:]), 0)
        assert ours.run.calls == 7


SCALE = tl.constexpr(2)


@triton.jit
def _scaled_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * SCALE, mask=offs < n)


def test_global_values_are_checked_as_jit_run_checks_them():
    global SCALE
    x = torch.arange(5.0)
    out = torch.empty(5)
    launch(_scaled_kernel, (1,), x, out, 5, BLOCK=8)  # the interpreter: kernel[grid]
    torch.testing.assert_close(out, 2 * x)
    with _faked() as driver:
        ref, ours = jit_function(_scaled_kernel), jit_function(_scaled_kernel)
        ref.cache_key, ours.cache_key  # record the global values, as a compile would
        _Counted(ours)
        calls = [_compare(driver, ref, ours, (1,), [x, out, 5], {"BLOCK": 8}, 0) for _ in range(2)]
        try:
            SCALE = tl.constexpr(2)  # rebound, equal: checked by Triton once more, then direct
            calls += [_compare(driver, ref, ours, (1,), [x, out, 5], {"BLOCK": 8}, 0) for _ in range(2)]
            assert calls == [1, 0, 1, 0]
            SCALE = tl.constexpr(3)
            with pytest.raises(RuntimeError, match="SCALE"):
                ref.run(x, out, 5, grid=(1,), warmup=False, BLOCK=8)
            for _ in range(2):
                with pytest.raises(RuntimeError, match="SCALE"):
                    launch(ours, (1,), x, out, 5, BLOCK=8)
        finally:
            SCALE = tl.constexpr(2)


def test_a_patched_jit_run_is_called(monkeypatch):
    kernel, grid, args, kwargs = _ops()["vb_terms_kernel"]
    calls = []
    original = jit.JITFunction.run

    def run(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    with _faked():
        ours = jit_function(kernel)
        launch(ours, grid, *args, **kwargs)
        monkeypatch.setattr(jit.JITFunction, "run", run)
        for _ in range(2):
            launch(ours, grid, *args, **kwargs)
    assert len(calls) == 2


def test_this_triton_launches_directly():
    assert _launch._layout() is not None, f"triton {triton.__version__}: its JITFunction.run is not in _LAYOUTS"


def test_an_unknown_triton_launches_through_jit_run():
    kernel, grid, args, kwargs = _ops()["ddim_kernel"]
    layouts, _launch._LAYOUTS = _launch._LAYOUTS, {}
    _launch._layout.cache_clear()
    try:
        with _faked() as driver:
            ref, ours = jit_function(kernel), jit_function(kernel)
            _Counted(ours)
            for _ in range(2):
                _compare(driver, ref, ours, grid, [_like(arg)() for arg in args], kwargs, 0)
            assert ours.run.calls == 2
    finally:
        _launch._LAYOUTS = layouts
        _launch._layout.cache_clear()


def test_host_overhead_fake_launches_directly_once_compiled():
    """benchmarks/host_overhead's fastddpm+launch row: the kernels module's own `launch` on a
    JITFunction of its kernel, JITFunction.run on the first launch only; the stub launches nothing."""
    kernel, grid, args, kwargs = _ops()["diffusion_loss_kernel"]
    with host_overhead.stubbed_launches() as modes:
        modes.gpu()
        fn = loss.diffusion_loss_kernel
        assert loss.launch is launch and isinstance(fn, jit.JITFunction) and fn.fn is kernel.fn
        _Counted(fn)
        for _ in range(3):
            loss.launch(fn, grid, *[_like(arg)() for arg in args], **kwargs)
        assert fn.run.calls == 1
        modes.stub()
        assert loss.diffusion_loss_kernel is kernel and loss.launch is not launch
        loss.launch(kernel, grid, *args, **kwargs)
    assert loss.diffusion_loss_kernel is kernel and loss.launch is launch

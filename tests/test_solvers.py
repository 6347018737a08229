"""The fused solver kernels (Triton's interpreter on CPU) against the float64 reference of
fastddpm.solvers: every step family, order and prediction; float32, bfloat16, float16; odd shapes,
batch 1, channels_last and strided inputs; different times per sample with the final step (σ = 0)
in the batch; int, fractional and σ times; in-kernel noise; opcheck, torch.compile and the PTX."""
import pytest
import torch
from helpers import SHAPES, TOLERANCES, make_layout, use_backend

from fastddpm import NoiseSchedule
from fastddpm.functional import solvers as S
from fastddpm.timesteps import interp_sigmas, solver_sigmas

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
PREDICTIONS = ["eps", "x0", "v"]
# Triton's interpreter (numpy) warns on log(0) = -inf, the λ of the final σ = 0
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")

T = 1000


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def chain(batch, final=True):
    """Per-sample times t2 > t1 > t > t_prev, evenly spaced by a per-sample stride; with `final` and
    batch > 1, sample 1 ends the chain (t_prev = -1)."""
    t = torch.randint(60, 800, (batch,))
    stride = torch.randint(5, 60, (batch,))
    t_prev = t - stride
    if final and batch > 1:
        t_prev[1] = -1
    return t, t_prev, t + stride, t + 2 * stride


def step_inputs(shape, dtype, layout, wide=False):
    """Model output (2C channels if wide), x_t, two history x0_hat and noise, rounded to dtype, in layout."""
    channels = 2 * shape[1] if wide else shape[1]
    tensors = [torch.randn(shape[0], channels, *shape[2:])] + [torch.randn(shape) for _ in range(4)]
    return [make_layout(x.to(dtype), layout) for x in tensors]


def assert_matches(actual, exact, like, sigma):
    """actual within float32 math of the float64 `exact` rounded once; the absolute tolerance grows with
    sqrt(1 + σ²), the amplification of x0_hat = sqrt(1 + σ²) x_t - σ eps at t."""
    assert actual.dtype == like.dtype and actual.shape == like.shape
    tolerance = TOLERANCES[like.dtype]
    scale = (1 + sigma.double() ** 2).sqrt().reshape(-1, *([1] * (actual.ndim - 1)))
    error = (actual.double() - exact.double()).abs()
    allowed = tolerance["atol"] * scale + tolerance["rtol"] * exact.double().abs()
    assert bool((error <= allowed).all()), f"{int((error > allowed).sum())} of {error.numel()} off, worst " \
                                           f"{float((error - allowed).max()):.3g} over"


def compare(call, tensors, times, schedule, sigma):
    """Run call(tensors, times) on the kernels (tensors as given) and on the float64 reference."""
    with use_backend("triton"):
        ours = call(tensors, times)
    with use_backend("reference"):
        exact = call([x.double() for x in tensors], times)
    for actual, expected in zip(ours, exact):
        assert_matches(actual, expected, tensors[1], sigma)


def cases(*axes):
    """One (dtype, shape, layout) per combination of `axes`, rotating so all of each appear."""
    import itertools
    for i, combo in enumerate(itertools.product(*axes)):
        yield (*combo, DTYPES[i % 3], SHAPES[i % len(SHAPES)], LAYOUTS[(i // 3) % 3])


@pytest.mark.parametrize("order,solver,solver_type,prediction,dtype,shape,layout", list(cases(
    [1, 2, 3], S.SOLVERS, S.SOLVER_TYPES, PREDICTIONS)))
def test_dpm_solver_kernel_matches_reference(schedule, order, solver, solver_type, prediction, dtype, shape, layout):
    out, x_t, h1, h2, noise = step_inputs(shape, dtype, layout)
    t, t_prev, t1, t2 = chain(shape[0])

    def call(x, times):
        return S.dpm_solver_step(x[0], x[1], times[0], times[1], schedule, history=((x[2], times[2]), (x[3], times[3])),
                                 order=order, solver=solver, solver_type=solver_type, noise=x[4], prediction=prediction)

    compare(call, [out, x_t, h1, h2, noise], (t, t_prev, t1, t2), schedule, solver_sigmas(schedule)[t])


@pytest.mark.parametrize("mode,prediction,dtype,shape,layout", list(cases(
    ["euler", "euler-a", "heun-1", "heun-2"], PREDICTIONS)))
def test_euler_kernels_match_reference(schedule, mode, prediction, dtype, shape, layout):
    out, x_t, first, _, noise = step_inputs(shape, dtype, layout)
    t, t_prev, _, _ = chain(shape[0], final=mode != "heun-2")

    def call(x, times):
        if mode == "euler":
            return S.euler_step(x[0], x[1], *times, schedule, prediction=prediction)
        if mode == "euler-a":
            return S.euler_ancestral_step(x[0], x[1], *times, schedule, noise=x[4], prediction=prediction)
        first = x[2] if mode == "heun-2" else None
        return S.heun_step(x[0], x[1], *times, schedule, x0_hat_first=first, prediction=prediction)

    sigmas = solver_sigmas(schedule)
    compare(call, [out, x_t, first, first, noise], (t, t_prev), schedule,
            sigmas[t_prev.clamp(min=0)] if mode == "heun-2" else sigmas[t])


@pytest.mark.parametrize("order,corrector,prediction,dtype,shape,layout", list(cases(
    [1, 2], [0, 1, 2], PREDICTIONS)))
def test_unipc_kernel_matches_reference(schedule, order, corrector, prediction, dtype, shape, layout):
    out, x_t, h1, h2, _ = step_inputs(shape, dtype, layout)
    t, t_prev, t1, t2 = chain(shape[0])

    def call(x, times):
        return S.unipc_step(x[0], x[1], times[0], times[1], schedule, history=((x[2], times[2]), (x[3], times[3])),
                            order=order, corrector_order=corrector, prediction=prediction)

    compare(call, [out, x_t, h1, h2, out], (t, t_prev, t1, t2), schedule, solver_sigmas(schedule)[t])


def step_call(family, x, times, schedule, **options):
    history = ((x[2], times[2]), (x[3], times[3]))
    if family == "dpm":
        return S.dpm_solver_step(x[0], x[1], times[0], times[1], schedule, history=history, order=3, **options)
    if family == "unipc":
        return S.unipc_step(x[0], x[1], times[0], times[1], schedule, history=history, **options)
    return S.euler_ancestral_step(x[0], x[1], times[0], times[1], schedule, noise=x[4], **options)


@pytest.mark.parametrize("family", ["dpm", "unipc", "euler-a"])
@pytest.mark.parametrize("time", ["fractional", "sigma"])
def test_fractional_timesteps_and_sigmas(schedule, family, time):
    """Float timesteps: σ interpolated linearly between table entries (np.interp); or σ given."""
    tensors = step_inputs((3, 2, 5, 7), torch.float32, "contiguous")
    t, t_prev, t1, t2 = (s.double() + torch.rand(3) for s in chain(3))
    t_prev[1] = -1.0
    times = (t, t_prev, t1, t2)
    sigmas = solver_sigmas(schedule)
    if time == "sigma":
        times = tuple(torch.where(s >= 0, interp_sigmas(s.clamp(min=0), sigmas), 0.0) for s in times)
    options = dict(time="sigma") if time == "sigma" else {}
    compare(lambda x, ts: step_call(family, x, ts, schedule, **options), tensors, times, schedule,
            interp_sigmas(t, sigmas))


@pytest.mark.parametrize("family", ["dpm", "unipc", "euler-a"])
def test_wide_output_and_clipping(schedule, family):
    """A 2C-channel output (learned variance) has its variance half skipped; clip_denoised clamps x0_hat."""
    tensors = step_inputs((2, 3, 6, 5), torch.float32, "channels_last", wide=True)
    times = chain(2)
    compare(lambda x, ts: step_call(family, x, ts, schedule, prediction="x0", clip_denoised=True), tensors, times,
            schedule, solver_sigmas(schedule)[times[0]])
    with use_backend("triton"):
        _, x0_hat = step_call(family, tensors, times, schedule, prediction="x0", clip_denoised=True)
    assert float(x0_hat.abs().max()) == 1.0


@pytest.mark.parametrize("family", ["dpm", "unipc", "euler-a"])
def test_zero_terminal_snr_first_step(family):
    """ab[T-1] = 0: σ is diffusers' stand-in 4096, and a v prediction gives finite steps from t = T-1."""
    schedule = NoiseSchedule.linear(T, zero_terminal_snr=True)
    tensors = step_inputs((2, 3, 4, 4), torch.float32, "contiguous")
    times = (torch.full((2,), T - 1), torch.tensor([T - 41, -1]), torch.full((2,), T - 1), torch.full((2,), T - 1))
    with use_backend("triton"):
        x_prev, x0_hat = _first_step(family, tensors, times, schedule)
    assert torch.isfinite(x_prev).all() and torch.isfinite(x0_hat).all()
    compare(lambda x, ts: _first_step(family, x, ts, schedule), tensors, times, schedule, torch.full((2,), 4096.0))


def _first_step(family, x, times, schedule):
    if family == "dpm":
        return S.dpm_solver_step(x[0], x[1], times[0], times[1], schedule, prediction="v")
    if family == "unipc":
        return S.unipc_step(x[0], x[1], times[0], times[1], schedule, prediction="v")
    return S.euler_ancestral_step(x[0], x[1], times[0], times[1], schedule, noise=x[4], prediction="v")

"""The solver ops as ops: in-kernel noise, one launch per step and no host sync in the sampling loop,
opcheck, torch.compile without graph breaks, the PTX for GPUs, and bad input."""
import pytest
import torch
from helpers import SYNC_OPS, recorded_calls
from torch.utils._python_dispatch import TorchDispatchMode

from fastddpm import functional as F
from fastddpm.functional import solvers as S
from fastddpm.reference import solvers as RS
from fastddpm.kernels import solvers as K
from fastddpm import sample
from fastddpm.guidance import ClassifierFreeGuidance

# Triton's interpreter (numpy) warns on log(0) = -inf, the λ of the final σ = 0
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")

SHAPE = (2, 3, 8, 8)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def inputs(shape=SHAPE, layout=torch.contiguous_format):
    out, x_t, h1, h2 = (torch.randn(shape).contiguous(memory_format=layout) for _ in range(4))
    return out, x_t, h1, h2, torch.tensor([700, 300]), torch.tensor([650, -1]), torch.tensor([750, 350])


@pytest.mark.parametrize("family", ["sde", "ancestral"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_drawn_noise_is_q_samples_philox_stream(triton_backend, schedule, family, layout):
    """Noise drawn in the kernel from a seed is, element for element, the noise q_sample draws from that
    seed (whatever the layout), recovered as (x_prev(seed) - x_prev(noise = 0)) / its coefficient."""
    out, x_t, h1, _, t, t_prev, t1 = inputs(layout=layout)
    t_prev = torch.tensor([650, 250])
    seed = torch.tensor([1234])

    def step(**noise):
        if family == "sde":
            return S.dpm_solver_step(out, x_t, t, t_prev, schedule, history=((h1, t1),), solver="sde-dpmsolver++",
                                     **noise)[0]
        return S.euler_ancestral_step(out, x_t, t, t_prev, schedule, **noise)[0]

    drawn, quiet = step(seed=seed), step(noise=torch.zeros_like(x_t))
    assert torch.equal(drawn, step(seed=seed))
    sigmas = RS.sigma_of(torch.cat([t, t_prev]), schedule, "timestep")
    sigma, sigma_next = sigmas[:2], sigmas[2:]
    alpha_next = (1 + sigma_next ** 2).rsqrt()
    if family == "sde":
        coefficient = sigma_next * alpha_next * (1 - (sigma_next / sigma) ** 2).sqrt()
    else:
        coefficient = alpha_next * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2).sqrt()
    z = (drawn - quiet).double() / coefficient.reshape(-1, 1, 1, 1)
    _, expected = F.q_sample(torch.zeros_like(x_t), t, None, schedule, seed=seed, return_noise=True)
    torch.testing.assert_close(z, expected.double(), atol=2e-4, rtol=2e-4)
    assert abs(float(z.mean())) < 0.2 and abs(float(z.std()) - 1) < 0.2


class OpLog(TorchDispatchMode):
    """The ops a region runs, views and factory-free bookkeeping left out."""
    VIEWS = ("aten.select.int", "aten.slice.Tensor", "aten.alias.default", "aten.detach.default",
             "aten.expand.default", "aten.view.default")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in self.VIEWS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["dpm++3m-sde", "euler-a", "heun", "unipc"])
def test_sampling_loop_is_one_fused_kernel_per_model_call_without_host_sync(triton_backend, schedule, method):
    from fastddpm.benchmarks.traffic import count

    steps, x_T, first_call, recorded = 5, torch.randn(SHAPE), [], [[]]

    def model(x, t):
        first_call.append(len(recorded[0]))
        return x * 0.5

    def run():
        sample(model, SHAPE, schedule, method=method, steps=steps, x_T=x_T, progress=False)

    run()  # compiles the kernels
    kernels = [name for name, _ in count(run).kernels if name.startswith("triton.")]
    model_calls = 2 * steps - 1 if method == "heun" else steps
    kernel = {"dpm++3m-sde": "triton.dpm_solver_kernel", "unipc": "triton.unipc_kernel"}.get(method,
                                                                                             "triton.euler_kernel")
    assert kernels == [kernel] * model_calls
    first_call.clear()
    with recorded_calls() as calls:
        recorded[0] = calls
        run()
    # the plan (timesteps, sigmas) is computed on the host before the loop; the loop never syncs
    assert not {name for name, _ in calls[first_call[0]:]} & SYNC_OPS


def test_launches_one_kernel_per_step(triton_backend, schedule, monkeypatch):
    out, x_t, h1, h2, t, t_prev, t1 = inputs()
    launched = []
    for name in ("dpm_solver_kernel", "euler_kernel", "unipc_kernel"):
        kernel = getattr(K, name)
        monkeypatch.setattr(K, name, type("Counted", (), {"__getitem__": lambda self, grid, k=kernel, n=name: (
            launched.append(n), k[grid])[1]})())
    S.dpm_solver_step(out, x_t, t, t_prev, schedule, history=((h1, t1), (h2, t1 + 50)), order=3)
    S.heun_step(out, x_t, t, t_prev, schedule, x0_hat_first=h1)
    S.unipc_step(out, x_t, t, t_prev, schedule, history=((h1, t1), (h2, t1 + 50)))
    assert launched == ["dpm_solver_kernel", "euler_kernel", "unipc_kernel"]


def test_opcheck(triton_backend, schedule):
    out, x_t, h1, h2, t, t_prev, t1 = inputs()
    table, seed, ops = schedule.kernel_table("cpu"), torch.tensor([7]), torch.ops.fastddpm
    sigma = torch.tensor([3.0, 0.5])
    torch.library.opcheck(ops.dpm_solver_step.default, (out, x_t, h1, h2, None, seed, t, t_prev, t1, t1 + 50, table,
                                                        "eps", 3, True, False, False, "timestep", False))
    torch.library.opcheck(ops.dpm_solver_step.default, (out, x_t, h1, None, x_t, None, sigma, sigma / 2,
                                                        sigma * 2, None, table, "v", 2, True, True, True, "sigma",
                                                        False))
    torch.library.opcheck(ops.euler_step.default, (out, x_t, h1, None, None, t.double(), t_prev.double(), table,
                                                   "x0", "heun", False, "fractional", False))
    torch.library.opcheck(ops.euler_step.default, (out, x_t, None, None, seed, t, t_prev, table, "eps", "ancestral",
                                                   False, "timestep", False))
    torch.library.opcheck(ops.unipc_step.default, (out, x_t, h1, h2, t, t_prev, t1, t1 + 50, table, "eps", 2, 2,
                                                   False, "timestep", False))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.compile)])
def test_compiles_without_graph_break(triton_backend, schedule, backend):
    out, x_t, h1, h2, t, t_prev, t1 = inputs()

    def steps(out, x_t, h1, h2):
        x, x0 = S.dpm_solver_step(out, x_t, t, t_prev, schedule, history=((h1, t1), (h2, t1 + 50)), order=3)
        y, _ = S.unipc_step(out, x, t, t_prev, schedule, history=((x0, t1), (h1, t1 + 50)))
        mid, first = S.heun_step(out, y, t, t_prev, schedule)
        z, _ = S.heun_step(out, mid, t, t_prev, schedule, x0_hat_first=first)
        drawn, _ = S.euler_ancestral_step(out, z, t, t_prev, schedule)
        return z, drawn

    torch._dynamo.reset()
    compiled = torch.compile(steps, fullgraph=True, backend=backend)
    z, drawn = compiled(out, x_t, h1, h2)
    torch.testing.assert_close(z, steps(out, x_t, h1, h2)[0])
    assert drawn.shape == x_t.shape and torch.isfinite(drawn).all()


def test_compiles_for_gpus_with_vector_accesses():
    """16-byte loads and stores on every full-tensor access, no spills, sm_80 and sm_90: (2 + history)
    reads and 2 writes a step, noise drawn in the kernel."""
    from aot import DTYPES, assert_fast_ptx

    sizes = {"D": "i32", "T": "i32", "C": "i32", "HW": "i32", "prediction": "i32"}
    specs, tensors = [], []
    for dtype in ("float32", "bfloat16"):
        data = "*" + DTYPES[dtype]
        like = torch.empty(8, 3, 32, 32, dtype=getattr(torch, dtype), device="meta")
        _, block, num_warps = K.step_launch_config(like)
        common = dict(CLIP=True, TIME=1, WIDE_OUTPUT=False, CHANNELS_LAST=False, BLOCK=block)
        times = {name: "*i64" for name in ("t_ptr", "t_prev_ptr", "t1_ptr", "t2_ptr")}
        out = {"x_prev_ptr": data, "x0_ptr": data, **sizes}
        specs.append(dict(module="fastddpm.kernels.solvers", kernel="dpm_solver_kernel", num_warps=num_warps,
                          signature={"out_ptr": data, "x_ptr": data, "h1_ptr": data, "h2_ptr": data, "noise_ptr": data,
                                     "seed_ptr": "*i64", **times, "table_ptr": "*fp32", **out},
                          constexprs=dict(ORDER=3, SDE=True, HEUN=False, DRAW_NOISE=True, **common),
                          divisible=["out_ptr", "x_ptr", "h1_ptr", "h2_ptr", "x_prev_ptr", "x0_ptr", "D"]))
        specs.append(dict(module="fastddpm.kernels.solvers", kernel="euler_kernel", num_warps=num_warps,
                          signature={"out_ptr": data, "x_ptr": data, "first_ptr": data, "noise_ptr": data,
                                     "seed_ptr": "*i64", "t_ptr": "*i64", "t_prev_ptr": "*i64", "table_ptr": "*fp32",
                                     **out},
                          constexprs=dict(MODE=2, DRAW_NOISE=False, **common),
                          divisible=["out_ptr", "x_ptr", "first_ptr", "x_prev_ptr", "x0_ptr", "D"]))
        specs.append(dict(module="fastddpm.kernels.solvers", kernel="unipc_kernel", num_warps=num_warps,
                          signature={"out_ptr": data, "x_ptr": data, "h1_ptr": data, "h2_ptr": data, **times,
                                     "table_ptr": "*fp32", **out},
                          constexprs=dict(ORDER=2, CORRECTOR=2, **common),
                          divisible=["out_ptr", "x_ptr", "h1_ptr", "h2_ptr", "x_prev_ptr", "x0_ptr", "D"]))
        # full tensors read (output, x_t, history) and written: one 16-byte access each a thread
        per_tensor = block // (32 * num_warps) * like.dtype.itemsize // 16
        tensors += [(reads * per_tensor, 2 * per_tensor) for reads in (4, 3, 4)]
    assert_fast_ptx(specs, [n for n, _ in tensors], [n for _, n in tensors])


# -- bad input -------------------------------------------------------------------------------------


def _step(**kwargs):
    return lambda s, o, x, h, t, tp, t1: S.dpm_solver_step(o, x, t, tp, s, **kwargs)


@pytest.mark.parametrize("call, error, match", [
    (_step(history=[1]), TypeError, r"history\[0\] must be an \(x0_hat, t\) pair"),
    (_step(history=(torch.zeros(2),)), TypeError, r"history\[0\] must be"),
    (lambda s, o, x, h, t, tp, t1: S.dpm_solver_step(o, x, t, tp, s, history=((h[:1], t1),)), ValueError,
     r"history\[0\]\[0\] must have shape"),
    (lambda s, o, x, h, t, tp, t1: S.dpm_solver_step(o, x, t, tp, s, history=((h, t1 * 0 - 1),)), ValueError,
     r"history\[0\]\[1\] must lie in \[0, 1000\)"),
    (lambda s, o, x, h, t, tp, t1: S.dpm_solver_step(o, x, t, tp, s, history={"h": h}), TypeError, "history must be"),
    (_step(order=4), ValueError, "order must be one of"),
    (_step(solver="dpmsolver"), ValueError, "solver must be one of"),
    (_step(solver_type="bh2"), ValueError, "solver_type must be one of"),
    (_step(time="lambda"), ValueError, "time must be one of"),
    (_step(prediction="mu"), ValueError, "prediction must be one of"),
    (_step(clip_denoised="dynamic"), ValueError, "clip_denoised must be one of"),
    (_step(noise=torch.zeros(1, 3, 8, 8)), ValueError, "noise must have shape"),
    (_step(generator=1), TypeError, "generator must be"),
    (_step(seed=torch.tensor([1.0])), TypeError, "seed must be a 1-element int64"),
    (lambda s, o, x, h, t, tp, t1: S.dpm_solver_step(o, x, t + 400, tp, s), ValueError, r"t must lie in \[0, 1000\)"),
    (lambda s, o, x, h, t, tp, t1: S.dpm_solver_step(o, x, t, tp - 5, s), ValueError, r"t_prev must lie in \[-1"),
    (lambda s, o, x, h, t, tp, t1: S.dpm_solver_step(o, x, t.double() + 500, tp.double(), s), ValueError,
     r"t must lie in \[0, 999\]"),
    (lambda s, o, x, h, t, tp, t1: S.dpm_solver_step(o, x, t.double(), tp, s), TypeError, "t_prev must be of t's kind"),
    (lambda s, o, x, h, t, tp, t1: S.euler_step(o, x, t.double() * 0, tp.double(), s, time="sigma"), ValueError,
     "t must be finite and > 0"),
    (lambda s, o, x, h, t, tp, t1: S.euler_step(o, x, t[:1], tp, s), ValueError, r"t must have shape \(2,\)"),
    (lambda s, o, x, h, t, tp, t1: S.euler_step(o[:, :2], x, t, tp, s), ValueError, "model_output must have shape"),
    (lambda s, o, x, h, t, tp, t1: S.euler_step(o, x, t, tp, "linear"), TypeError, "schedule must be"),
    (lambda s, o, x, h, t, tp, t1: S.heun_step(o, x, t, tp, s, x0_hat_first=h[:, :1]), ValueError,
     "x0_hat_first must have shape"),
    (lambda s, o, x, h, t, tp, t1: S.unipc_step(o, x, t, tp, s, order=3), ValueError, "order must be one of"),
    (lambda s, o, x, h, t, tp, t1: S.unipc_step(o, x, t, tp, s, corrector_order=1), ValueError,
     "corrector_order=1 needs 1 history"),
    (lambda s, o, x, h, t, tp, t1: S.unipc_step(o, x, t, tp, s, corrector_order=3), ValueError,
     "corrector_order must be one of"),
])
def test_bad_input_names_the_argument(schedule, call, error, match):
    out, x_t, h1, _, t, t_prev, t1 = inputs()
    with pytest.raises(error, match=match):
        call(schedule, out, x_t, h1, t, t_prev, t1)


def test_seed_needs_the_triton_backend(reference_backend, schedule):
    out, x_t, _, _, t, t_prev, _ = inputs()
    with pytest.raises(ValueError, match="seed needs the triton backend"):
        S.euler_ancestral_step(out, x_t, t, t_prev, schedule, seed=torch.tensor([1]))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="ddpm2"), ValueError, "method must be one of"),
    (dict(steps=0), ValueError, "num_inference_steps must be a positive int"),
    (dict(spacing="uniform"), ValueError, "spacing must be one of"),
    (dict(method="heun", final_sigmas_type="sigma_min"), ValueError, "final_sigmas_type must be 'zero'"),
    (dict(method="euler", lu_lambdas=True), ValueError, "lu_lambdas is a DPM-Solver option"),
    (dict(solver_type="bh2"), ValueError, "solver_type must be one of"),
    (dict(clip_denoised="dynamic"), ValueError, "clip_denoised='dynamic' is for DDPM and DDIM"),
    (dict(noise_fn=3), TypeError, "noise_fn must be callable"),
    (dict(callback="print"), TypeError, "callback must be callable"),
    (dict(x_T=torch.zeros(1, 3, 8, 8)), ValueError, "x_T must have shape"),
    (dict(dtype=torch.int64), TypeError, "dtype must be one of"),
    (dict(shape=(2,)), ValueError, "shape must be a tuple"),
    (dict(steps_offset=-1), ValueError, "steps_offset must be an int >= 0"),
    (dict(generator="seed"), TypeError, "generator must be"),
    (dict(model=None), TypeError, "model must be callable"),
])
def test_sample_solver_bad_input(schedule, kwargs, error, match):
    arguments = {**dict(shape=SHAPE, method="dpm++2m", steps=4, progress=False), **kwargs}
    with pytest.raises(error, match=match):
        sample(arguments.pop("model", lambda x, t: x), arguments.pop("shape"), schedule, **arguments)


def test_guided_model_batches_cond_and_uncond(schedule):
    seen = []

    def model(x, t, y):
        seen.append(x.shape[0])
        return x + y.reshape(-1, 1, 1, 1).float()

    guided = ClassifierFreeGuidance(model, 3.0, {"y": torch.tensor([1, 1])}, {"y": torch.tensor([0, 0])})
    x = torch.randn(SHAPE)
    torch.testing.assert_close(guided(x, torch.tensor([5, 5])), x + 3.0)
    assert seen == [4]
    with pytest.raises(ValueError, match="null_kwargs must have the keys"):
        ClassifierFreeGuidance(model, 3.0, {"y": torch.tensor([1])}, {})

"""The fused reverse-process kernels (Triton's interpreter on CPU): q_posterior, p_mean_variance,
the DDPM ancestral step and the DDIM step, against the float64 reference and diffusers."""
import itertools

import pytest
import torch
from helpers import SHAPES, TOLERANCES, make_layout, use_backend

from fastddpm import functional as F
from fastddpm import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PREDICTIONS = ["eps", "x0", "v"]
VARIANCES = ["fixed_small", "fixed_large", "learned_range"]
CLIPS = [False, True, "dynamic"]
LAYOUTS = ["contiguous", "channels_last", "strided"]
T = 1000


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def case_shape_layout(index):
    """A shape and a layout for the index-th case: every shape and layout appears across a matrix."""
    return SHAPES[index % len(SHAPES)], LAYOUTS[index % len(LAYOUTS)]


def timesteps(batch):
    """Random t, with t = 0 (no noise) and t = T - 1 present whenever the batch allows."""
    t = torch.randint(1, T - 1, (batch,))
    t[0] = 0
    if batch > 2:
        t[-1] = T - 1
    return t


def model_output(shape, channels, dtype, layout):
    """A model output with `channels` channels; a second half, if any, is a learned-range v in (-1, 1)."""
    out = torch.randn(shape[0], channels, *shape[2:])
    if channels == 2 * shape[1]:
        out[:, shape[1]:] = out[:, shape[1]:].tanh()
    return make_layout(out.to(dtype), layout)


def step_inputs(shape, dtype, layout, variance="fixed_small"):
    x_t = make_layout(torch.randn(shape).to(dtype), layout)
    out = model_output(shape, 2 * shape[1] if variance == "learned_range" else shape[1], dtype, layout)
    noise = make_layout(torch.randn(shape).to(dtype), layout)
    return out, x_t, timesteps(shape[0]), noise


def assert_matches(actual, exact, like, t=None, schedule=None):
    """actual (in like's dtype) within float32 math of the float64 `exact` rounded once.

    With t, the absolute tolerance grows with the conditioning of the eps <-> x0 conversions at
    t: x0_hat = sqrt_recip_ab x_t - sqrt_recipm1_ab eps cancels up to 156x (t = T - 1, linear), and
    eps from a clipped x0_hat up to 100x (t = 0), so float32 inputs carry that much rounding.
    """
    assert actual.dtype == like.dtype
    tolerance = TOLERANCES[like.dtype]
    atol = tolerance["atol"]
    if t is not None:
        conditioning = torch.maximum(schedule.sqrt_recip_alphas_cumprod,
                                     schedule.sqrt_one_minus_alphas_cumprod.reciprocal())
        atol = atol * conditioning[t].reshape(-1, *([1] * (actual.ndim - 1)))
    exact = exact.double().expand(actual.shape)
    error = (actual.double() - exact).abs()
    allowed = atol + tolerance["rtol"] * exact.abs()
    worst = int((error - allowed).flatten().argmax())
    assert bool((error <= allowed).all()), (
        f"{int((error > allowed).sum())} of {error.numel()} elements off; worst: {actual.flatten()[worst].item()} "
        f"vs {exact.flatten()[worst].item()} at flat index {worst}")


# -- every prediction x variance x clip x dtype, noise given ------------------------------------


CASES = list(itertools.product(PREDICTIONS, VARIANCES, CLIPS, DTYPES))


@pytest.mark.parametrize("index", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_p_sample_step_matches_reference(triton_backend, schedule, index):
    prediction, variance, clip, dtype = CASES[index]
    shape, layout = case_shape_layout(index)
    out, x_t, t, noise = step_inputs(shape, dtype, layout, variance)
    options = dict(prediction=prediction, variance=variance, clip_denoised=clip)
    x_prev = F.p_sample_step(out, x_t, t, schedule, noise=noise, **options)
    exact = R.p_sample_step(out.double(), x_t.double(), t, schedule, noise=noise.double(), **options)
    assert x_prev.shape == x_t.shape
    assert_matches(x_prev, exact, x_t, t, schedule)


@pytest.mark.parametrize("index", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_p_mean_variance_matches_reference(triton_backend, schedule, index):
    prediction, variance, clip, dtype = CASES[index]
    shape, layout = case_shape_layout(index + 1)
    out, x_t, t, _ = step_inputs(shape, dtype, layout, variance)
    options = dict(prediction=prediction, variance=variance, clip_denoised=clip)
    actual = F.p_mean_variance(out, x_t, t, schedule, **options)
    exact = R.p_mean_variance(out.double(), x_t.double(), t, schedule, **options)
    for name, a, e in zip(("mean", "variance", "log_variance", "x0_hat"), actual, exact):
        assert a.shape == e.shape, name
        assert_matches(a, e, x_t, t, schedule)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_q_posterior_matches_reference(triton_backend, schedule, dtype, index):
    shape, layout = case_shape_layout(index)
    x0 = make_layout(torch.randn(shape).to(dtype), layout)
    x_t = make_layout(torch.randn(shape).to(dtype), layout)
    t = timesteps(shape[0])
    actual = F.q_posterior(x0, x_t, t, schedule)
    exact = R.q_posterior(x0.double(), x_t.double(), t, schedule)
    for a, e in zip(actual, exact):
        assert a.shape == e.shape
        assert_matches(a, e, x_t)
    assert float(actual[1][0]) == 0.0  # the posterior variance at t = 0 is exactly 0


DDIM_CASES = list(itertools.product(PREDICTIONS, CLIPS, DTYPES, [0.0, 0.7]))


@pytest.mark.parametrize("index", range(len(DDIM_CASES)), ids=["-".join(map(str, c)) for c in DDIM_CASES])
def test_ddim_step_matches_reference(triton_backend, schedule, index):
    prediction, clip, dtype, eta = DDIM_CASES[index]
    shape, layout = case_shape_layout(index)
    # every other case feeds a learned-range model output: its variance half is ignored
    out, x_t, t, noise = step_inputs(shape, dtype, layout, "learned_range" if index % 2 else "fixed_small")
    t_prev = torch.where(t > 20, t - torch.randint(1, 20, t.shape), -1)
    options = dict(eta=eta, prediction=prediction, clip_denoised=clip)
    x_prev = F.ddim_step(out, x_t, t, t_prev, schedule, noise=noise, **options)
    exact = R.ddim_step(out.double(), x_t.double(), t, t_prev, schedule, noise=noise.double(), **options)
    assert_matches(x_prev, exact, x_t, t, schedule)


@pytest.mark.parametrize("out_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_learned_range_in_every_layout(triton_backend, schedule, x_layout, out_layout):
    """The variance half is channels C..2C-1 of the same sample, whatever each tensor's memory layout."""
    shape = (3, 3, 6, 5)
    out, x_t, t, noise = step_inputs(shape, torch.float32, "contiguous", "learned_range")
    out, x_t, noise = make_layout(out, out_layout), make_layout(x_t, x_layout), make_layout(noise, x_layout)
    options = dict(prediction="v", variance="learned_range", clip_denoised=True)
    x_prev = F.p_sample_step(out, x_t, t, schedule, noise=noise, **options)
    assert_matches(x_prev, R.p_sample_step(out.double(), x_t.double(), t, schedule, noise=noise.double(), **options),
                   x_t)
    assert x_prev.is_contiguous(memory_format=torch.channels_last) == (x_layout == "channels_last")
    mean, var, log_var, _ = F.p_mean_variance(out, x_t, t, schedule, **options)
    exact = R.p_mean_variance(out.double(), x_t.double(), t, schedule, **options)
    for actual, expected in zip((mean, var, log_var), exact):
        assert_matches(actual, expected, x_t)
    ddim = F.ddim_step(out, x_t, t, t - 1, schedule, prediction="v")
    assert_matches(ddim, R.ddim_step(out.double(), x_t.double(), t, t - 1, schedule, prediction="v"), x_t)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_return_x0_hat(schedule, method, backend):
    with use_backend(backend):
        out, x_t, t, noise = step_inputs((2, 3, 4, 5), torch.float32, "contiguous")
        options = dict(prediction="v", clip_denoised=True)
        if method == "ddpm":
            x_prev, x0_hat = F.p_sample_step(out, x_t, t, schedule, noise=noise, return_x0_hat=True, **options)
            alone = F.p_sample_step(out, x_t, t, schedule, noise=noise, **options)
        else:
            x_prev, x0_hat = F.ddim_step(out, x_t, t, t - 1, schedule, return_x0_hat=True, **options)
            alone = F.ddim_step(out, x_t, t, t - 1, schedule, **options)
    torch.testing.assert_close(x_prev, alone)
    exact = R.p_mean_variance(out.double(), x_t.double(), t, schedule, **options)[3]
    assert_matches(x0_hat, exact, x_t)


# -- noise drawn in the kernel ----------------------------------------------------------------


def drawn_noise(x_prev, x_t, out, t, schedule, **options):
    """z = (x_{t-1} - mean) / std recovered from a step with drawn noise."""
    mean, var, _, _ = F.p_mean_variance(out, x_t, t, schedule, **options)
    return (x_prev.double() - mean.double()) / var.double().sqrt()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_drawn_noise_is_standard_normal_and_absent_at_t0(triton_backend, schedule, layout):
    out, x_t, _, _ = step_inputs((4, 3, 32, 32), torch.float32, layout)
    t = torch.tensor([0, 10, 500, 999])
    options = dict(prediction="eps", variance="fixed_large", clip_denoised=False)
    x_prev = F.p_sample_step(out, x_t, t, schedule, generator=torch.Generator().manual_seed(1), **options)
    mean = F.p_mean_variance(out, x_t, t, schedule, **options)[0]
    assert torch.equal(x_prev[0], mean[0])  # t = 0: exactly the mean
    z = drawn_noise(x_prev, x_t, out, t, schedule, **options)[1:].flatten()
    n = z.numel()  # 9216: Monte Carlo errors 0.010 (mean) and 0.007 (std)
    assert abs(float(z.mean())) < 4 / n ** 0.5
    assert abs(float(z.std()) - 1) < 4 * (0.5 / n) ** 0.5
    assert abs(float((z ** 4).mean()) - 3) < 0.25  # Gaussian tails (kurtosis 3)
    # a fresh draw differs; the same generator state gives bit-identical samples
    again = F.p_sample_step(out, x_t, t, schedule, generator=torch.Generator().manual_seed(1), **options)
    other = F.p_sample_step(out, x_t, t, schedule, generator=torch.Generator().manual_seed(2), **options)
    assert torch.equal(again, x_prev) and not torch.equal(other[1:], x_prev[1:])


def test_drawn_noise_is_q_samples_stream(triton_backend, schedule):
    """A seed gives the noise q_sample draws with it: the step then equals the reference fed that noise."""
    out, x_t, _, _ = step_inputs((2, 3, 8, 6), torch.float32, "contiguous", "learned_range")
    t = torch.tensor([0, 700])
    seed = torch.tensor([123456789])
    _, noise = F.q_sample(torch.zeros_like(x_t), t, None, schedule, seed=seed, return_noise=True)
    options = dict(prediction="x0", variance="learned_range", clip_denoised=True)
    for layout in ("contiguous", "channels_last"):
        x_prev = F.p_sample_step(make_layout(out, layout), make_layout(x_t, layout), t, schedule, seed=seed,
                                 **options)
        exact = R.p_sample_step(out.double(), x_t.double(), t, schedule, noise=noise.double(), **options)
        assert_matches(x_prev, exact, x_t)
    t_prev = torch.tensor([-1, 300])
    x_prev = F.ddim_step(out, x_t, t, t_prev, schedule, eta=1.0, seed=seed, prediction="x0")
    exact = R.ddim_step(out.double(), x_t.double(), t, t_prev, schedule, eta=1.0, noise=noise.double(),
                        prediction="x0")
    assert_matches(x_prev, exact, x_t)


def test_ddim_drawn_noise_statistics(triton_backend, schedule):
    out, x_t, _, _ = step_inputs((2, 4, 32, 32), torch.float32, "contiguous")
    t, t_prev = torch.tensor([600, 20]), torch.tensor([400, -1])
    x_prev = F.ddim_step(out, x_t, t, t_prev, schedule, eta=1.0, generator=torch.Generator().manual_seed(3))
    deterministic = F.ddim_step(out, x_t, t, t_prev, schedule, eta=1.0, noise=torch.zeros_like(x_t))
    assert torch.equal(x_prev[1], deterministic[1])  # t_prev = -1: sigma = 0, no noise
    ab, ab_prev = schedule.alphas_cumprod[600], schedule.alphas_cumprod[400]
    sigma = ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    z = ((x_prev[0] - deterministic[0]).double() / sigma).flatten()
    assert abs(float(z.mean())) < 4 / z.numel() ** 0.5
    assert abs(float(z.std()) - 1) < 4 * (0.5 / z.numel()) ** 0.5
    # eta = 0 draws nothing: the generator is not touched
    generator = torch.Generator().manual_seed(5)
    F.ddim_step(out, x_t, t, t_prev, schedule, eta=0.0, generator=generator)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(5).get_state())


# -- against diffusers, sample by sample (diffusers takes one scalar t) -----------------------


def float64_tables(scheduler, schedule):
    """diffusers keeps ab in float32 (1 - ab[0] is off by 1.7e-4 relatively, linear schedule): give it
    our float64 ab, and float64 inputs, so that the comparison checks the formulas and conventions."""
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.one = scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction, diffusers_prediction", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_diffusers(triton_backend, schedule, prediction, diffusers_prediction, variance, clip):
    from diffusers import DDPMScheduler

    # diffusers' DDPM step at t goes to t - 1 (no set_timesteps); its variance is clamped at 1e-20
    # only where t = 0, which adds no noise, so fixed_small and learned_range agree with ours.
    scheduler = float64_tables(DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type=variance,
                                             prediction_type=diffusers_prediction, clip_sample=clip), schedule)
    shape = (4, 3, 6, 6)
    out, x_t, _, _ = step_inputs(shape, torch.float32, "contiguous", variance)
    t = torch.tensor([0, 1, 437, 999])
    noise = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(b), dtype=torch.float64)
                       for b in range(4)])
    ours = F.p_sample_step(out, x_t, t, schedule, noise=noise.float(), prediction=prediction, variance=variance,
                           clip_denoised=clip)
    theirs = torch.cat([
        scheduler.step(out[b:b + 1].double(), int(t[b]), x_t[b:b + 1].double(),
                       generator=torch.Generator().manual_seed(b)).prev_sample for b in range(shape[0])])
    assert_matches(ours, theirs, x_t, t, schedule)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction, diffusers_prediction", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("clip, clipped_output", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ddim_step_matches_diffusers(schedule, prediction, diffusers_prediction, eta, clip, clipped_output, backend):
    from diffusers import DDIMScheduler

    # clip_sample with use_clipped_model_output=True re-derives eps from the clipped x0 (our default);
    # False (DDIMPipeline's) keeps the model's eps
    scheduler = float64_tables(DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=clip,
                                             set_alpha_to_one=True, prediction_type=diffusers_prediction), schedule)
    scheduler.set_timesteps(50)
    stride = T // 50
    t = scheduler.timesteps[[0, 17, 48, 49]]  # 49 is t = 0, the last step, to ab_prev = 1
    t_prev = torch.where(t - stride >= 0, t - stride, -1)
    shape = (4, 3, 5, 5)
    out, x_t, _, noise = step_inputs(shape, torch.float32, "contiguous")
    with use_backend(backend):
        ours = F.ddim_step(out, x_t, t, t_prev, schedule, eta=eta, noise=noise, prediction=prediction,
                           clip_denoised=clip, use_clipped_model_output=clipped_output)
    theirs = torch.cat([
        scheduler.step(out[b:b + 1].double(), int(t[b]), x_t[b:b + 1].double(), eta=eta,
                       use_clipped_model_output=clipped_output and clip,
                       variance_noise=noise[b:b + 1].double() if eta > 0 else None).prev_sample
        for b in range(shape[0])])
    assert_matches(ours, theirs, x_t, t, schedule)


# -- gradients --------------------------------------------------------------------------------


def test_q_posterior_gradients(triton_backend, schedule):
    x0, x_t = torch.randn(2, 3, 5, 7, requires_grad=True), torch.randn(2, 3, 5, 7, requires_grad=True)
    t, upstream = torch.tensor([0, 700]), torch.randn(2, 3, 5, 7)
    (F.q_posterior(x0, x_t, t, schedule)[0] * upstream).sum().backward()
    x0_ref, x_t_ref = x0.detach().double().requires_grad_(), x_t.detach().double().requires_grad_()
    (R.q_posterior(x0_ref, x_t_ref, t, schedule)[0] * upstream.double()).sum().backward()
    torch.testing.assert_close(x0.grad.double(), x0_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_t.grad.double(), x_t_ref.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance_gradients(triton_backend, schedule, prediction, variance, clip):
    """Through the mean, x0_hat and the learned (log) variance, w.r.t. the model output and x_t."""
    out, x_t, t, _ = step_inputs((3, 2, 4, 5), torch.float32, "contiguous", variance)
    t = torch.tensor([0, 40, 800])
    options = dict(prediction=prediction, variance=variance, clip_denoised=clip)
    upstream = [torch.randn(3, 2, 4, 5) for _ in range(4)]

    def gradients(fn, out, x_t):
        out, x_t = out.detach().requires_grad_(), x_t.detach().requires_grad_()
        outputs = fn(out, x_t, t, schedule, **options)
        wanted = outputs if variance == "learned_range" else (outputs[0], outputs[3])
        weights = upstream if variance == "learned_range" else (upstream[0], upstream[3])
        sum((o * w.to(o.dtype)).sum() for o, w in zip(wanted, weights)).backward()
        return out.grad, x_t.grad

    ours = gradients(F.p_mean_variance, out, x_t)
    exact = gradients(R.p_mean_variance, out.double(), x_t.double())
    for a, e in zip(ours, exact):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-4)


def test_no_gradient_through_dynamic_thresholding_or_steps(triton_backend, schedule):
    out, x_t, t, noise = step_inputs((2, 3, 4, 4), torch.float32, "contiguous")
    out.requires_grad_()
    mean = F.p_mean_variance(out, x_t, t, schedule, clip_denoised="dynamic")[0]
    with pytest.raises(RuntimeError, match="no gradient through clip_denoised='dynamic'"):
        mean.sum().backward()
    with pytest.raises(RuntimeError, match="no autograd formula"):
        F.p_sample_step(out, x_t, t, schedule, noise=noise).sum().backward()
    with pytest.raises(RuntimeError, match="no autograd formula"):
        F.ddim_step(out, x_t, t, t - 1, schedule).sum().backward()


# -- torch.library and torch.compile ------------------------------------------------------------


def test_opcheck(triton_backend, schedule):
    out, x_t, t, noise = step_inputs((2, 3, 4, 4), torch.float32, "contiguous", "learned_range")
    table, seed = schedule.kernel_table("cpu"), torch.tensor([11])
    eps, x0, v = (schedule.prediction_table(name, "cpu") for name in ("eps", "x0", "v"))
    ops = torch.ops.fastddpm
    torch.library.opcheck(ops.q_posterior_mean.default, (x_t, noise, t, table, x0, False))
    torch.library.opcheck(ops.p_mean_variance.default, (out, x_t, t, table, v, "learned_range", "clip", False))
    torch.library.opcheck(ops.p_mean_variance.default,
                          (out[:, :3].contiguous(), x_t, t, table, eps, "fixed_small", "dynamic", False),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.p_sample_step.default,
                          (out, x_t, t, table, eps, noise, seed[:0], "learned_range", "none", False, True))
    torch.library.opcheck(ops.p_sample_step.default,
                          (out, x_t, t, table, x0, None, seed, "learned_range", "dynamic", False, False))
    torch.library.opcheck(ops.ddim_step.default,
                          (out, x_t, t, t - 1, table, v, None, seed, 0.5, "clip", False, True, False))
    torch.library.opcheck(ops.ddim_step.default,
                          (out, x_t, t, t - 1, table, eps, None, seed, 0.0, "clip", False, False, True))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(triton_backend, schedule, backend):
    out, x_t, t, noise = step_inputs((2, 3, 4, 4), torch.float32, "contiguous")

    def steps(out, x_t, t, noise):
        x_prev = F.p_sample_step(out, x_t, t, schedule, noise=noise, prediction="v", clip_denoised=True)
        drawn = F.p_sample_step(out, x_t, t, schedule, variance="fixed_large")
        ddim, x0_hat = F.ddim_step(out, x_t, t, t - 1, schedule, eta=0.5, return_x0_hat=True)
        mean = F.p_mean_variance(out, x_t, t, schedule)[0] + F.q_posterior(x0_hat, x_t, t, schedule)[0]
        return x_prev * 2, drawn, ddim, mean

    torch._dynamo.reset()
    compiled = torch.compile(steps, fullgraph=True, backend=backend)
    x_prev, drawn, ddim, mean = compiled(out, x_t, t, noise)
    exact = R.p_sample_step(out.double(), x_t.double(), t, schedule, noise=noise.double(), prediction="v",
                            clip_denoised=True)
    assert_matches(x_prev / 2, exact, x_t)
    assert drawn.shape == ddim.shape == mean.shape == x_t.shape


def test_compiles_for_gpus_with_vector_accesses():
    """16-byte loads and stores on every full-tensor access, no spills, sm_80 and sm_90, at the JIT's
    real-launch specialisation (16-byte aligned pointers, D divisible by 16)."""
    from aot import DTYPES, assert_fast_ptx

    from fastddpm.kernels.posterior import step_launch_config

    data_pointers = ["out_ptr", "x_ptr", "noise_ptr", "x_prev_ptr", "x0_ptr"]
    specs, loads, stores, scale = [], [], [], {}
    for dtype in ("float32", "bfloat16"):
        data = "*" + DTYPES[dtype]
        _, block, num_warps = step_launch_config(torch.empty(8, 3, 32, 32, dtype=getattr(torch, dtype), device="meta"))
        scale[dtype] = block // (32 * num_warps) * getattr(torch, dtype).itemsize // 16  # 16-byte accesses a thread
        common = {"out_ptr": data, "x_ptr": data, "noise_ptr": data, "seed_ptr": "*i64", "t_ptr": "*i64"}
        p_sample = dict(module="fastddpm.kernels.posterior", kernel="p_sample_kernel", num_warps=num_warps,
                        signature={**common, "table_ptr": "*fp32", "pred_table_ptr": "*fp32", "scale_ptr": "*fp32",
                                   "x_prev_ptr": data, "x0_ptr": data, "log_var_ptr": data, "var_ptr": data,
                                   "D": "i32", "T": "i32", "C": "i32", "HW": "i32", "variance_row": "i32"},
                        divisible=data_pointers + ["log_var_ptr", "var_ptr", "D"])
        flags = dict(CLIP=1, LEARNED_RANGE=True, ADD_NOISE=True, DRAW_NOISE=True, STORE_X0=True,
                     STORE_VARIANCE=False, CHANNELS_LAST=False, BLOCK=block)
        # the ancestral step: reads x_t, the output and its variance half; writes x_{t-1} and x0_hat
        specs.append({**p_sample, "constexprs": flags})
        loads.append(3)
        stores.append(2)
        # p_mean_variance of a learned-range output: writes mean, x0_hat, log variance and variance
        specs.append({**p_sample, "constexprs": {**flags, "CLIP": 0, "ADD_NOISE": False, "DRAW_NOISE": False,
                                                 "STORE_VARIANCE": True}})
        loads.append(3)
        stores.append(4)
        specs.append(dict(
            module="fastddpm.kernels.posterior", kernel="ddim_kernel", num_warps=num_warps,
            signature={**common, "t_prev_ptr": "*i64", "table_ptr": "*fp32", "pred_table_ptr": "*fp32",
                       "scale_ptr": "*fp32", "x_prev_ptr": data, "x0_ptr": data, "D": "i32", "T": "i32", "C": "i32",
                       "HW": "i32", "eta": "fp32"},
            constexprs=dict(CLIP=2, EPS_FROM_OUTPUT=False, WIDE_OUTPUT=True, ADD_NOISE=True, DRAW_NOISE=True,
                            STORE_X0=True, CHANNELS_LAST=False, BLOCK=block),
            divisible=data_pointers + ["D"]))
        loads.append(2)
        stores.append(2)
    per_tensor = [scale["float32"]] * 3 + [scale["bfloat16"]] * 3
    loads, stores = [n * k for n, k in zip(loads, per_tensor)], [n * k for n, k in zip(stores, per_tensor)]
    # channels_last learned range: the output's two halves interleave per pixel, so only x_t's
    # loads and the stores are 16-byte (the model output is read by 4-byte gathers)
    channels_last = specs[0]
    specs.append({**channels_last, "signature": {**channels_last["signature"], **{
        name: "*fp32" for name in data_pointers + ["log_var_ptr", "var_ptr"]}},
        "constexprs": {**channels_last["constexprs"], "CHANNELS_LAST": True}})
    loads.append(scale["float32"])
    stores.append(2 * scale["float32"])
    assert_fast_ptx(specs, loads, stores)


# -- bad input to the new arguments -------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda s, o, x, t: F.p_sample_step(o, x, t, s, seed=torch.tensor([1.5])), "seed must be"),
    (lambda s, o, x, t: F.p_sample_step(o, x, t, s, seed=torch.tensor([1]), noise=x), "pass it without noise"),
    (lambda s, o, x, t: F.ddim_step(o, x, t, t - 1, s, eta=0.5, seed=torch.tensor([1, 2])), "seed must be"),
    (lambda s, o, x, t: F.ddim_step(o, x, t, t - 1, s, eta=True), "eta must be a float >= 0"),
    (lambda s, o, x, t: F.ddim_step(o, x, t, t - 1, s, eta=float("nan")), "eta must be a float >= 0"),
])
def test_bad_new_arguments(triton_backend, schedule, call, match):
    out, x_t, t, _ = step_inputs((2, 3, 4, 4), torch.float32, "contiguous")
    with pytest.raises((TypeError, ValueError), match=match):
        call(schedule, out, x_t, t)


def test_seed_needs_the_triton_backend(reference_backend, schedule):
    out, x_t, t, _ = step_inputs((2, 3, 4, 4), torch.float32, "contiguous")
    with pytest.raises(ValueError, match="seed selects the kernels' Philox stream"):
        F.p_sample_step(out, x_t, t, schedule, seed=torch.tensor([1]))

"""The sampler: respacing as improved-diffusion, trajectories against the reference, the right
distribution for Gaussian data, guidance, and the PyTorch (CPU) path of the reverse steps."""
import itertools
import math

import pytest
import torch
from helpers import TOLERANCES, use_backend
from helpers import SYNC_OPS, recorded_calls

from fastddpm import NoiseSchedule
from fastddpm import functional as F
from fastddpm import reference as R
from fastddpm import respace, sample, space_timesteps

T = 1000


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# -- respacing ---------------------------------------------------------------------------------


def improved_diffusion_space_timesteps(num_timesteps, section_counts):
    """improved-diffusion's respace.space_timesteps, written from its description: cut the process
    into len(section_counts) sections (the first num_timesteps % len ones one step longer); in a
    section of `size` steps keep `count` steps at round(j (size - 1) / (count - 1)) from its start
    (the start alone for a count of 1). "ddimN": the integer stride giving exactly N steps."""
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        wanted = int(section_counts[4:])
        stride = next(s for s in range(1, num_timesteps) if math.ceil(num_timesteps / s) == wanted)
        return set(range(0, num_timesteps, stride))
    if isinstance(section_counts, str):
        section_counts = [int(c) for c in section_counts.split(",")]
    kept, start = set(), 0
    n = len(section_counts)
    for i, count in enumerate(section_counts):
        size = num_timesteps // n + (i < num_timesteps % n)
        kept |= {start + (0 if count == 1 else round(j * (size - 1) / (count - 1))) for j in range(count)}
        start += size
    return kept


def spaced_diffusion_betas(alphas_cumprod, use_timesteps):
    """improved-diffusion's SpacedDiffusion.__init__: a loop over the original alphas_cumprod."""
    last, betas, timestep_map = 1.0, [], []
    for i, ab in enumerate(alphas_cumprod.tolist()):
        if i in use_timesteps:
            betas.append(1 - ab / last)
            last = ab
            timestep_map.append(i)
    return torch.tensor(betas, dtype=torch.float64), torch.tensor(timestep_map)


@pytest.mark.parametrize("num_timesteps, counts", [
    (1000, "50"), (1000, "10,20,30"), (1000, "ddim50"), (1000, "ddim25"), (4000, "250"), (4000, "ddim100"),
    (1000, "1,1,1"), (1000, "7,3"), (999, "10,20,30"), (100, "100"), (1000, [25, 25])])
def test_space_timesteps_is_improved_diffusions(num_timesteps, counts):
    assert space_timesteps(num_timesteps, counts) == improved_diffusion_space_timesteps(num_timesteps, counts)


@pytest.mark.parametrize("counts", ["50", "10,20,30", "ddim20", "1000"])
@pytest.mark.parametrize("make", [lambda: NoiseSchedule.linear(T), lambda: NoiseSchedule.cosine(T)])
def test_respace_tables_are_spaced_diffusions(make, counts):
    base = make()
    kept = space_timesteps(T, counts)
    spaced, timestep_map = respace(base, kept)
    betas, expected_map = spaced_diffusion_betas(base.alphas_cumprod, kept)
    assert torch.equal(timestep_map, expected_map)
    torch.testing.assert_close(spaced.betas, betas, rtol=1e-12, atol=0)
    # the kept alphas_cumprod are the original ones
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[timestep_map], rtol=1e-10, atol=0)
    if counts == "1000":
        torch.testing.assert_close(spaced.posterior_variance, base.posterior_variance, rtol=1e-10, atol=0)


@pytest.mark.parametrize("call, error, match", [
    (lambda: space_timesteps(10, "ddim7"), ValueError, "cannot create exactly 7 steps"),
    (lambda: space_timesteps(10, "20"), ValueError, "cannot divide a section of 10 steps into 20"),
    (lambda: space_timesteps(1000, "ten"), ValueError, "steps must be an int"),
    (lambda: space_timesteps(1000, 0), ValueError, "steps must be positive"),
    (lambda: space_timesteps(1000, 2.5), ValueError, "steps must be positive ints"),
    (lambda: respace(NoiseSchedule.linear(10), {3}), ValueError, "at least 2 timesteps"),
    (lambda: respace(NoiseSchedule.linear(10), {3, 10}), ValueError, r"in \[0, 10\)"),
    (lambda: respace("linear", {1, 2}), TypeError, "schedule must be"),
])
def test_respacing_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_model_sees_the_original_timesteps(schedule):
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sample(model, (2, 1, 4), schedule, method="ddim", steps="10,5", progress=False)
    expected = sorted(improved_diffusion_space_timesteps(T, "10,5"), reverse=True)
    assert [int(t[0]) for t in seen] == expected
    assert all(t.dtype == torch.int64 and t.shape == (2,) and bool((t == t[0]).all()) for t in seen)


# -- trajectories against the reference ----------------------------------------------------------


def toy_model(prediction_channels=1):
    """A fixed nonlinear 'network': output depends on x_t and t, not a closed form the sampler knows."""
    def model(x, t):
        phase = (t.to(x.dtype) / T).reshape(-1, *([1] * (x.ndim - 1)))
        out = torch.tanh(0.7 * x + phase) - 0.3 * torch.sin(3 * x * phase)
        return torch.cat([out, torch.tanh(out)], dim=1) if prediction_channels == 2 else out
    return model


def reference_ddim_trajectory(model, x_T, schedule, kept, *, prediction, clip_denoised):
    """50 DDIM steps by reference.ddim_step in float64 on the ORIGINAL schedule, t -> previous kept t."""
    x = x_T.double()
    order = sorted(kept, reverse=True)
    for t, t_prev in zip(order, order[1:] + [-1]):
        t_vec = torch.full((x.shape[0],), t)
        x = R.ddim_step(model(x, t_vec), x, t_vec, torch.full_like(t_vec, t_prev), schedule,
                        prediction=prediction, clip_denoised=clip_denoised)
    return x


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("prediction, clip", [("eps", True), ("v", False), ("x0", "dynamic")])
def test_ddim_50_step_trajectory_matches_reference(schedule, backend, prediction, clip):
    x_T = torch.randn(2, 3, 8, 8)
    expected = reference_ddim_trajectory(toy_model(), x_T, schedule, space_timesteps(T, 50), prediction=prediction,
                                         clip_denoised=clip)
    with use_backend(backend):
        actual = sample(toy_model(), x_T.shape, schedule, method="ddim", steps=50, prediction=prediction,
                        clip_denoised=clip, x_T=x_T, progress=False)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-4)


def test_triton_and_reference_ddpm_agree_given_the_noise(schedule):
    """With x_T and every step's noise fixed, the two backends follow the same ancestral chain."""
    x_T, model = torch.randn(2, 2, 4, 4), toy_model(prediction_channels=2)
    spaced, timestep_map = respace(schedule, space_timesteps(T, 8))
    noises = torch.randn(8, 2, 2, 4, 4)
    chains = {}
    for backend in ("triton", "reference"):
        with use_backend(backend):
            x = x_T
            for k, i in enumerate(range(7, -1, -1)):
                t = torch.full((2,), i)
                x = F.p_sample_step(model(x, timestep_map[t]), x, t, spaced, noise=noises[k], prediction="v",
                                    variance="learned_range", clip_denoised=True)
            chains[backend] = x
    torch.testing.assert_close(chains["triton"], chains["reference"], rtol=1e-5, atol=1e-5)


# -- the right distribution: Gaussian data, the optimal model in closed form ----------------------

DATA_MEAN, DATA_STD = 0.3, 0.5


def optimal_eps_model(schedule):
    """E[eps | x_t] for x0 ~ N(m, s²): x_t ~ N(sqrt_ab m, ab s² + 1 - ab), so
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt_ab m) / (ab s² + 1 - ab) (the model sees original t)."""
    def model(x, t):
        ab = schedule.alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1)))
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * DATA_MEAN) / (ab * DATA_STD ** 2 + 1 - ab)
        return eps.to(x.dtype)
    return model


def sampler_law(schedule, kept, method, eta=0.0):
    """The exact law N(mean, std²) of the sampler's output with the optimal model: every step is
    affine in x_t plus Gaussian noise, so mean and variance follow in float64 from docs/math.md section 4
    with the kept subsequence's alphas_cumprod (independently of fastddpm's respace)."""
    ab_all, m, s2 = schedule.alphas_cumprod, DATA_MEAN, DATA_STD ** 2
    order = sorted(kept, reverse=True)
    mean, var = 0.0, 1.0
    for t, t_prev in zip(order, order[1:] + [-1]):
        ab = float(ab_all[t])
        ab_prev = float(ab_all[t_prev]) if t_prev >= 0 else 1.0
        # x0_hat = k x + c, eps_hat = ke x + ce
        k = math.sqrt(ab) * s2 / (ab * s2 + 1 - ab)
        c = m - k * math.sqrt(ab) * m
        ke = math.sqrt(1 - ab) / (ab * s2 + 1 - ab)
        ce = -ke * math.sqrt(ab) * m
        if method == "ddpm":
            beta = 1 - ab / ab_prev
            coef1, coef2 = beta * math.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
            gain, shift = coef1 * k + coef2, coef1 * c
            noise_var = beta * (1 - ab_prev) / (1 - ab) if t_prev >= 0 else 0.0  # fixed_small; none at the end
        else:
            sigma2 = eta ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
            direction = math.sqrt(max(1 - ab_prev - sigma2, 0.0))
            gain, shift = math.sqrt(ab_prev) * k + direction * ke, math.sqrt(ab_prev) * c + direction * ce
            noise_var = sigma2
        mean, var = gain * mean + shift, gain ** 2 * var + noise_var
    return mean, math.sqrt(var)


def assert_law(samples, mean, std):
    """Sample mean and std within 4 Monte Carlo standard errors of N(mean, std²)."""
    n = samples.numel()
    assert abs(float(samples.mean()) - mean) < 4 * std / math.sqrt(n), (float(samples.mean()), mean)
    assert abs(float(samples.std()) - std) < 4 * std / math.sqrt(2 * n), (float(samples.std()), std)


def test_ddpm_1000_steps_recovers_the_data(reference_backend, schedule):
    samples = sample(optimal_eps_model(schedule), (4, 1, 1000), schedule, method="ddpm", clip_denoised=False,
                     generator=torch.Generator().manual_seed(1), progress=False)
    assert_law(samples, DATA_MEAN, DATA_STD)
    law_mean, law_std = sampler_law(schedule, range(T), "ddpm")
    assert_law(samples, law_mean, law_std)
    assert abs(law_std / DATA_STD - 1) < 0.01 and abs(law_mean - DATA_MEAN) < 1e-3


def test_ddim_50_steps_recovers_the_data(reference_backend, schedule):
    samples = sample(optimal_eps_model(schedule), (4, 1, 1000), schedule, method="ddim", steps=50,
                     clip_denoised=False, generator=torch.Generator().manual_seed(2), progress=False)
    law_mean, law_std = sampler_law(schedule, space_timesteps(T, 50), "ddim")
    assert_law(samples, law_mean, law_std)
    # 50 deterministic steps shrink the spread of N(0.3, 0.5²) by 5% (discretization, not noise)
    assert abs(law_std / DATA_STD - 1) < 0.06 and abs(law_mean - DATA_MEAN) < 3e-3


@pytest.mark.parametrize("method, steps, eta", [("ddim", 50, 0.0), ("ddim", 10, 1.0), ("ddpm", 10, None)])
def test_triton_sampler_has_the_exact_law(triton_backend, schedule, method, steps, eta):
    """The kernels' sampler (noise drawn in the kernel), on 2048 one-dimensional samples."""
    samples = sample(optimal_eps_model(schedule), (2, 1, 1024), schedule, method=method, steps=steps, eta=eta or 0.0,
                     clip_denoised=False, generator=torch.Generator().manual_seed(3), progress=False)
    law_mean, law_std = sampler_law(schedule, space_timesteps(T, steps), method, eta or 0.0)
    assert_law(samples, law_mean, law_std)


# -- guidance, previews, options --------------------------------------------------------------------


class Conditional(torch.nn.Module):
    """A toy class-conditional model with the UNet's null-class convention."""
    num_classes = 3

    def __init__(self, channels_out_factor=1):
        super().__init__()
        self.embed = torch.nn.Embedding(self.num_classes + 1, 1)
        self.factor = channels_out_factor
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], y.clone()))
        out = torch.tanh(x + self.embed(y).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / T)
        return out.repeat(1, self.factor, 1, 1)


@pytest.mark.parametrize("variance, factor", [("fixed_small", 1), ("learned_range", 2)])
def test_classifier_free_guidance(reference_backend, schedule, variance, factor):
    model, y, scale = Conditional(factor), torch.tensor([0, 2]), 3.0
    x_T = torch.randn(2, 1, 4, 4)

    def guided(x, t):
        cond, uncond = model(x, t, y=y), model(x, t, y=torch.full_like(y, 3))
        mean = uncond[:, :1] + scale * (cond[:, :1] - uncond[:, :1])
        return torch.cat([mean, cond[:, 1:]], dim=1)

    options = dict(method="ddpm", steps=5, variance=variance, x_T=x_T, progress=False)
    actual = sample(model, x_T.shape, schedule, model_kwargs={"y": y}, guidance_scale=scale,
                    generator=torch.Generator().manual_seed(4), **options)
    expected = sample(guided, x_T.shape, schedule, generator=torch.Generator().manual_seed(4), **options)
    torch.testing.assert_close(actual, expected)
    batch, labels = model.calls[0]
    assert batch == 4 and labels.tolist() == [0, 2, 3, 3]  # one call of 2B: cond, then the null class


def test_guidance_with_null_kwargs_and_errors(reference_backend, schedule):
    model = Conditional()
    y = torch.tensor([1, 1])
    sample(model, (2, 1, 2, 2), schedule, steps=2, model_kwargs={"y": y}, guidance_scale=2.0,
           null_kwargs={"y": torch.tensor([0, 0])}, progress=False)
    assert model.calls[-1][1].tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="guidance_scale needs a condition"):
        sample(lambda x, t: x, (2, 1, 2, 2), schedule, steps=2, guidance_scale=2.0, progress=False)
    with pytest.raises(ValueError, match="null_kwargs must have the keys"):
        sample(model, (2, 1, 2, 2), schedule, steps=2, model_kwargs={"y": y}, guidance_scale=2.0,
               null_kwargs={"z": y}, progress=False)
    with pytest.raises(TypeError, match="guidance_scale must be a float"):
        sample(model, (2, 1, 2, 2), schedule, steps=2, model_kwargs={"y": y}, guidance_scale="2", progress=False)


@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_sampling_loop_is_capturable(triton_backend, schedule, method, eta):
    """What `cuda_graph=True` needs and a CPU can show: after the first step, every step runs the
    same ops with the same allocations, and no step waits for the device."""
    steps = []
    with recorded_calls() as calls:
        sample(toy_model(), (2, 1, 4, 4), schedule, method=method, eta=eta, steps=5, progress=False,
               return_x0_hat=lambda preview: steps.append(len(calls)))
    per_step = [calls[start:stop] for start, stop in zip(steps, steps[1:])]
    assert len(per_step) == 4 and all(ops == per_step[0] for ops in per_step)
    assert not {name for name, _ in calls[steps[0]:]} & SYNC_OPS


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_x0_hat_previews(schedule, backend, method):
    previews = []
    with use_backend(backend):
        x, x0_hat = sample(toy_model(), (2, 1, 4, 4), schedule, method=method, steps=4, return_x0_hat=True,
                           generator=torch.Generator().manual_seed(5), progress=False)
        again = sample(toy_model(), (2, 1, 4, 4), schedule, method=method, steps=4, return_x0_hat=previews.append,
                       generator=torch.Generator().manual_seed(5), progress=False)
    # the last step lands on its x0_hat: DDIM to ab_prev = 1, DDPM's t = 0 mean is coef1 = 1 times x0_hat
    torch.testing.assert_close(x, x0_hat, rtol=1e-6, atol=1e-6)
    assert torch.equal(again, x)
    assert [p["step"] for p in previews] == [0, 1, 2, 3]
    assert previews[0]["t"].tolist() == [999, 999] and previews[-1]["t"].tolist() == [0, 0]
    assert torch.equal(previews[-1]["sample"], x) and torch.equal(previews[-1]["x0_hat"], x0_hat)


def test_unet_samples_with_guidance(reference_backend, schedule):
    from fastddpm.unet import UNet

    model = UNet.from_preset("tiny", in_channels=1, num_classes=10, learn_sigma=True).eval()
    x = sample(model, (2, 1, 8, 8), schedule, steps=3, variance="learned_range",
               model_kwargs={"y": torch.tensor([3, 7])}, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(6), progress=True)
    assert x.shape == (2, 1, 8, 8) and bool(torch.isfinite(x).all())


def test_generator_makes_samples_reproducible(schedule):
    for backend in ("triton", "reference"):
        with use_backend(backend):
            runs = [sample(toy_model(), (2, 1, 4, 4), schedule, steps=3, generator=torch.Generator().manual_seed(s),
                           progress=False) for s in (7, 7, 8)]
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_sample_dtype(reference_backend, schedule, dtype):
    x = sample(toy_model(), (2, 1, 4, 4), schedule, method="ddim", steps=3, dtype=dtype, progress=False)
    assert x.dtype == dtype


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="plms"), ValueError, "method must be one of"),
    (dict(steps="ddim999"), ValueError, "cannot create exactly 999 steps"),
    (dict(steps=1), ValueError, "at least 2 timesteps"),
    (dict(eta=-1.0), ValueError, "eta must be a float >= 0"),
    (dict(prediction="score"), ValueError, "prediction must be one of"),
    (dict(variance="learned"), ValueError, "variance must be one of"),
    (dict(clip_denoised="soft"), ValueError, "clip_denoised must be one of"),
    (dict(generator=3), TypeError, "generator must be"),
    (dict(dtype=torch.int32), TypeError, "dtype must be one of"),
    (dict(return_x0_hat="yes"), TypeError, "return_x0_hat must be a bool or a callable"),
    (dict(x_T=torch.randn(2, 1, 5)), ValueError, r"x_T must have shape \(2, 1, 4\)"),
    (dict(x_T=[0.0]), TypeError, "x_T must be a float tensor"),
    (dict(cuda_graph=True), ValueError, "cuda_graph=True needs a CUDA device"),
    (dict(shape=(2,)), ValueError, "shape must be a tuple"),
    (dict(shape=(2, 0, 4)), ValueError, "shape must be a tuple"),
    (dict(model=None), TypeError, "model must be callable"),
    (dict(schedule="linear"), TypeError, "schedule must be"),
])
def test_bad_input(schedule, kwargs, error, match):
    arguments = dict(model=toy_model(), shape=(2, 1, 4), schedule=schedule, steps=2, progress=False)
    arguments.update(kwargs)
    model, shape, schedule = arguments.pop("model"), arguments.pop("shape"), arguments.pop("schedule")
    with pytest.raises(error, match=match):
        sample(model, shape, schedule, **arguments)


# -- the PyTorch path of the steps (CPU under backend "auto") against the float64 reference ----------

EAGER_CASES = list(itertools.product(["eps", "x0", "v"], ["fixed_small", "fixed_large", "learned_range"],
                                     [False, True, "dynamic"], [torch.float32, torch.bfloat16, torch.float16]))


def step_inputs(shape, dtype, learned):
    x_t = torch.randn(shape).to(dtype)
    out = torch.randn(shape[0], shape[1] * (2 if learned else 1), *shape[2:])
    out[:, shape[1]:] = out[:, shape[1]:].tanh()
    t = torch.tensor([0, 1, 500, 999][: shape[0]])
    return out.to(dtype), x_t, t, torch.randn(shape).to(dtype)


def assert_close_conditioned(actual, exact, like, t, schedule):
    """As test_posterior.assert_matches: the absolute tolerance scaled by the eps <-> x0 conditioning."""
    tolerance = TOLERANCES[like.dtype]
    conditioning = torch.maximum(schedule.sqrt_recip_alphas_cumprod,
                                 schedule.sqrt_one_minus_alphas_cumprod.reciprocal())
    atol = tolerance["atol"] * conditioning[t].reshape(-1, *([1] * (actual.ndim - 1)))
    assert actual.dtype == like.dtype
    error = (actual.double() - exact).abs()
    assert bool((error <= atol + tolerance["rtol"] * exact.abs()).all()), float(error.max())


@pytest.mark.parametrize("prediction, variance, clip, dtype", EAGER_CASES)
def test_pytorch_steps_match_reference(reference_backend, schedule, prediction, variance, clip, dtype):
    out, x_t, t, noise = step_inputs((4, 3, 5, 6), dtype, variance == "learned_range")
    options = dict(prediction=prediction, clip_denoised=clip)
    x_prev, x0_hat = F.p_sample_step(out, x_t, t, schedule, noise=noise, variance=variance, return_x0_hat=True,
                                     **options)
    exact = R.p_sample_step(out.double(), x_t.double(), t, schedule, noise=noise.double(), variance=variance,
                            **options)
    assert_close_conditioned(x_prev, exact, x_t, t, schedule)
    exact_x0 = R.p_mean_variance(out.double(), x_t.double(), t, schedule, variance=variance, **options)[3]
    assert_close_conditioned(x0_hat, exact_x0, x_t, t, schedule)
    t_prev = torch.tensor([-1, 0, 321, 998])
    for eta in (0.0, 0.8):
        ddim = F.ddim_step(out, x_t, t, t_prev, schedule, eta=eta, noise=noise, **options)
        exact = R.ddim_step(out.double(), x_t.double(), t, t_prev, schedule, eta=eta, noise=noise.double(), **options)
        assert_close_conditioned(ddim, exact, x_t, t, schedule)


def test_pytorch_steps_in_float64_and_drawn_noise(reference_backend, schedule):
    out, x_t, t, noise = step_inputs((4, 2, 3, 3), torch.float64, False)
    options = dict(prediction="v", clip_denoised=True)
    torch.testing.assert_close(F.p_sample_step(out, x_t, t, schedule, noise=noise, **options),
                               R.p_sample_step(out, x_t, t, schedule, noise=noise, **options), rtol=1e-12, atol=1e-12)
    # drawn with the generator, the noise is torch.randn's, as in the reference
    drawn = F.p_sample_step(out, x_t, t, schedule, generator=torch.Generator().manual_seed(9), **options)
    same = R.p_sample_step(out, x_t, t, schedule, generator=torch.Generator().manual_seed(9), **options)
    torch.testing.assert_close(drawn, same, rtol=1e-12, atol=1e-12)


def test_pytorch_x0_hat_is_not_the_model_output(reference_backend, schedule):
    out, x_t, t, noise = step_inputs((2, 3, 4, 4), torch.float32, False)
    _, x0_hat = F.p_sample_step(out, x_t, t[:2], schedule, noise=noise, prediction="x0", return_x0_hat=True)
    assert torch.equal(x0_hat, out) and x0_hat.data_ptr() != out.data_ptr()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("clip", [False, True])
def test_zero_terminal_snr_first_step_is_finite(backend, clip):
    """At ab = 0 (zero terminal SNR) a v prediction gives x0_hat = -v and eps_hat = x_t, clipped or
    not (the float64 reference divides inf by inf there when it re-derives eps from a clipped x0)."""
    schedule = NoiseSchedule.cosine(T, zero_terminal_snr=True)
    x_t, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, t_prev = torch.tensor([T - 1, T - 1]), torch.tensor([979, 979])
    x0 = (-v.double()).clamp(-1, 1) if clip else -v.double()
    ab_prev = schedule.alphas_cumprod[979]
    with use_backend(backend):
        ddim = F.ddim_step(v, x_t, t, t_prev, schedule, prediction="v", clip_denoised=clip)
        ddpm = F.p_sample_step(v, x_t, t, schedule, prediction="v", clip_denoised=clip, noise=torch.zeros_like(x_t))
    torch.testing.assert_close(ddim.double(), ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * x_t.double(),
                               rtol=1e-5, atol=1e-5)
    mean = schedule.posterior_mean_coef1[T - 1] * x0 + schedule.posterior_mean_coef2[T - 1] * x_t.double()
    torch.testing.assert_close(ddpm.double(), mean, rtol=1e-5, atol=1e-5)

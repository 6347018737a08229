"""The fused variational-bound kernels (kernels/vlb.py, kernels/hybrid.py; Triton's interpreter
on CPU) against the float64 reference, the decoder against exact tail probabilities, and the
tanh option against improved-diffusion's formulas (written here from docs/math.md section 6)."""
import math
import zlib

import pytest
import torch
from helpers import SHAPES, make_layout, relative_error

from fastddpm import NoiseSchedule
from fastddpm import functional as F
from fastddpm import reference as R
from fastddpm.kernels import vlb
from fastddpm.kernels._common import interpreting
from fastddpm.testing import plausible_eps, plausible_output, random_images, variance_half

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PREDICTIONS = ["eps", "x0", "v"]
VARIANCES = ["fixed_small", "fixed_large", "learned_range"]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# improved-diffusion's linear schedule for T = 100: t = 0 (the decoder) and t >= 1 are both common
SCHEDULE = NoiseSchedule.linear(100, rescale_with_T=True)
T = SCHEDULE.num_timesteps


def make_inputs(shape, dtype=torch.float32, prediction="eps", variance="fixed_small", *, spread=0.5,
                layout="contiguous", t=None):
    """(model_output, x0, x_t, noise, t): x0 in [-1, 1] with some pixels exactly at the edges ±1,
    t = 0 for the first sample and t >= 1 for the others, and a plausible model: eps_hat = eps +
    spread · N(0, 1), written in `prediction`'s parameterization (keeps the decoder's bin masses
    where float64 is exact); the variance half uniform in [-1.2, 1.2]."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, prediction, variance, spread, layout)).encode()))
    x0 = random_images(shape, generator=g, dtype=torch.float64)
    x0.view(-1)[::7] = 1.0
    x0.view(-1)[3::7] = -1.0
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    if t is None:
        t = torch.randint(1, T, (shape[0],), generator=g)
        t[0] = 0
    x_t = R.q_sample(x0, t, noise, SCHEDULE)
    output = plausible_output(x0, noise, t, SCHEDULE, prediction=prediction, variance=variance, spread=spread,
                              variance_bound=1.2, generator=g)
    return tuple(make_layout(x.to(dtype), layout) for x in (output, x0, x_t, noise)) + (t,)


def reference_vb(output, x0, x_t, t, **options):
    return R.vb_terms_bpd(output.double(), x0.double(), x_t.double(), t, SCHEDULE, **options)


# -- the evaluation kernel against the reference ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vb_terms_match_reference(triton_backend, prediction, variance, dtype):
    index = PREDICTIONS.index(prediction) * 9 + VARIANCES.index(variance) * 3 + DTYPES.index(dtype)
    shape, layout = SHAPES[index % len(SHAPES)], LAYOUTS[index % len(LAYOUTS)]
    output, x0, x_t, _, t = make_inputs(shape, dtype, prediction, variance, layout=layout)
    clip = bool(index % 2)
    for tanh_cdf in (False, True):
        options = dict(prediction=prediction, variance=variance, clip_denoised=clip, tanh_cdf=tanh_cdf)
        vb = F.vb_terms_bpd(output, x0, x_t, t, SCHEDULE, **options)
        assert vb.dtype == torch.float32 and vb.shape == (shape[0],)
        # the same input values on both sides: only the kernel's float32 math differs
        torch.testing.assert_close(vb.double(), reference_vb(output, x0, x_t, t, **options), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vb_terms_gradient_matches_reference_autograd(triton_backend, prediction, variance):
    dtype = torch.bfloat16 if prediction == "v" else torch.float32
    output, x0, x_t, _, t = make_inputs((3, 2, 6, 5), dtype, prediction, variance)
    upstream = torch.rand(3) + 0.5
    clip = prediction == "x0"  # the clip's mask on the mean's gradient
    options = dict(prediction=prediction, variance=variance, clip_denoised=clip)
    output = output.requires_grad_()
    (F.vb_terms_bpd(output, x0, x_t, t, SCHEDULE, **options) * upstream).sum().backward()
    exact = output.detach().double().requires_grad_()
    (R.vb_terms_bpd(exact, x0.double(), x_t.double(), t, SCHEDULE, **options) * upstream.double()).sum().backward()
    assert output.grad.dtype == dtype
    # rounded once to the output's dtype (float32 for the others)
    assert relative_error(output.grad, exact.grad) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("clip", [False, True])
def test_mse_statistics_of_the_bpd_loop(triton_backend, clip):
    for prediction in PREDICTIONS:
        output, x0, x_t, noise, t = make_inputs((3, 3, 4, 5), prediction=prediction, variance="learned_range")
        options = dict(prediction=prediction, variance="learned_range", clip_denoised=clip, tanh_cdf=False)
        vb, x0_mse, eps_mse = F.vb_terms_with_mse(output, x0, x_t, noise, t, SCHEDULE, **options)
        exact = R.vb_terms_with_mse(output.double(), x0.double(), x_t.double(), noise.double(), t, SCHEDULE,
                                    **options)
        for actual, expected in zip((vb, x0_mse, eps_mse), exact):
            torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-6)


def test_random_outputs_and_dynamic_thresholding(triton_backend):
    """Outputs unrelated to the data put most decoder masses far out in the tails (clamped)."""
    output, x0, x_t, _, t = make_inputs((4, 3, 5, 5), prediction="x0", variance="learned_range", spread=30.0)
    for clip in (False, True, "dynamic"):
        options = dict(prediction="x0", variance="learned_range", clip_denoised=clip)
        vb = F.vb_terms_bpd(output, x0, x_t, t, SCHEDULE, **options)
        torch.testing.assert_close(vb.double(), reference_vb(output, x0, x_t, t, **options), rtol=1e-4, atol=1e-5)


def test_float64_inputs_run_the_reference(triton_backend):
    output, x0, x_t, _, t = make_inputs((2, 3, 4, 4), torch.float64, variance="learned_range")
    vb = F.vb_terms_bpd(output, x0, x_t, t, SCHEDULE, variance="learned_range")
    assert vb.dtype == torch.float64
    torch.testing.assert_close(vb, reference_vb(output, x0, x_t, t, variance="learned_range"), rtol=1e-12, atol=0)


# -- closed forms -------------------------------------------------------------------------


def test_decoder_tails_and_edges_match_exact_probabilities(triton_backend):
    """t = 0, one pixel per sample, x0 prediction (mu = x0_hat): -log2 of the exact bin mass,
    from scipy's log survival function, so deep in the tails too (1 - Phi(x) from erf is 0 in
    float32 beyond x = 5.4). The edges x0 = ±1 take the whole tail beyond the edge."""
    stats = pytest.importorskip("scipy.stats")
    log_var = SCHEDULE.posterior_log_variance_clipped[0].item()
    scale = math.exp(0.5 * log_var)  # the decoder's std at t = 0
    grid = lambda k: 2 * k / 255 - 1  # noqa: E731  the 256 data values
    # (x0, (mu - x0) in decoder stds): the centre, moderate, deep tails (mass 1e-9..1e-11),
    # clamped (< 1e-12), and the edges with the mean inside and outside [-1, 1]
    cases = [(grid(100), 0.0), (grid(31), 0.7), (grid(200), -2.5), (grid(7), 6.4), (grid(250), -6.9),
             (grid(128), 8.0), (1.0, 1.5), (1.0, -3.0), (-1.0, -1.5), (-1.0, 6.5), (1.0, -7.5), (-1.0, 0.0)]
    x0 = torch.tensor([[c[0]] for c in cases], dtype=torch.float64)
    mu = x0 + torch.tensor([[c[1] * scale] for c in cases], dtype=torch.float64)
    t = torch.zeros(len(cases), dtype=torch.long)
    x_t = R.q_sample(x0, t, torch.zeros_like(x0), SCHEDULE)
    # x0 prediction: mu = coef1[0] x0_hat + coef2[0] x_t, with coef2[0] = 0
    output = (mu - SCHEDULE.posterior_mean_coef2[0] * x_t) / SCHEDULE.posterior_mean_coef1[0]
    vb = F.vb_terms_bpd(output.float(), x0.float(), x_t.float(), t, SCHEDULE, prediction="x0")
    expected = []
    for (value, _), mean in zip(cases, mu[:, 0].tolist()):
        lo, hi = (value - 1 / 255 - mean) / scale, (value + 1 / 255 - mean) / scale
        if value > 0.999:
            log_mass = stats.norm.logsf(lo)
        elif value < -0.999:
            log_mass = stats.norm.logcdf(hi)
        elif mean < value:  # the mean below the bin: a difference of upper tails
            log_mass = stats.norm.logsf(lo) + math.log1p(-math.exp(stats.norm.logsf(hi) - stats.norm.logsf(lo)))
        else:
            log_mass = stats.norm.logcdf(hi) + math.log1p(-math.exp(stats.norm.logcdf(lo) - stats.norm.logcdf(hi)))
        expected.append(-max(log_mass, math.log(1e-12)) / math.log(2))
    torch.testing.assert_close(vb.double(), torch.tensor(expected, dtype=torch.float64), rtol=2e-5, atol=1e-5)
    # the edges are one-sided: the two-sided bin mass would be far smaller here
    two_sided = stats.norm.cdf(1 / 255 / scale - 1.5) - stats.norm.cdf(-1 / 255 / scale - 1.5)
    assert vb[6].item() < -math.log2(two_sided) - 1


@pytest.mark.parametrize("variance", VARIANCES)
def test_kl_terms_are_never_negative(triton_backend, variance):
    """With the exact mean, fixed_small's KL is 0 and fixed_large's is 0.5 (e^-d - 1 + d),
    d = log(betas / posterior variance), tiny at large t of the cosine schedule (d ~ 1e-4):
    computed directly in float32 it would cancel to noise, or below 0."""
    schedule = NoiseSchedule.cosine(1000)
    shape = (8, 2, 4, 4)
    g = torch.Generator().manual_seed(3)
    x0, noise = random_images(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([1, 2, 50, 300, 700, 900, 990, 999])
    x_t = R.q_sample(x0, t, noise, schedule)
    for output in (noise, plausible_eps(noise, generator=g)):
        if variance == "learned_range":
            output = torch.cat([output, variance_half(shape, generator=g)], dim=1)
        vb = F.vb_terms_bpd(output, x0, x_t, t, schedule, variance=variance)
        assert bool((vb >= 0).all()), vb
        exact = R.vb_terms_bpd(output.double(), x0.double(), x_t.double(), t, schedule, variance=variance)
        torch.testing.assert_close(vb.double(), exact, rtol=1e-3, atol=1e-9)


def test_tanh_option_matches_improved_diffusion_formulas(triton_backend):
    """improved-diffusion's _vb_terms_bpd for a learned-range eps model, from math.md's formulas
    in float64: the tanh CDF, the one-sided edges, the clamps, log var = frac log beta + (1 -
    frac) log posterior variance clipped, and the mean from eps."""
    output, x0, x_t, _, t = make_inputs((3, 3, 6, 6), variance="learned_range", spread=0.3,
                                        t=torch.tensor([0, 1, 60]))
    eps_hat, v = output.double().chunk(2, dim=1)
    x0d, x_td = x0.double(), x_t.double()
    s = SCHEDULE

    def at(table):
        return table[t].reshape(-1, 1, 1, 1)

    frac = (v + 1) / 2
    log_var = frac * at(s.betas).log() + (1 - frac) * at(s.posterior_log_variance_clipped)
    x0_hat = x_td / at(s.alphas_cumprod).sqrt() - (1 / at(s.alphas_cumprod) - 1).sqrt() * eps_hat
    mean = at(s.posterior_mean_coef1) * x0_hat + at(s.posterior_mean_coef2) * x_td
    true_mean = at(s.posterior_mean_coef1) * x0d + at(s.posterior_mean_coef2) * x_td
    true_log_var = at(s.posterior_log_variance_clipped)
    kl = 0.5 * (-1 + log_var - true_log_var + (true_log_var - log_var).exp() + (true_mean - mean) ** 2 / log_var.exp())

    def cdf(x):
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    inv_std = (-0.5 * log_var).exp()
    plus, minus = cdf(inv_std * (x0d - mean + 1 / 255)), cdf(inv_std * (x0d - mean - 1 / 255))
    log_p = torch.where(x0d < -0.999, plus.clamp(min=1e-12).log(),
                        torch.where(x0d > 0.999, (1 - minus).clamp(min=1e-12).log(),
                                    (plus - minus).clamp(min=1e-12).log()))
    expected = torch.where(t == 0, -log_p.flatten(1).mean(1), kl.flatten(1).mean(1)) / math.log(2)
    vb = F.vb_terms_bpd(output, x0, x_t, t, SCHEDULE, variance="learned_range", tanh_cdf=True)
    torch.testing.assert_close(vb.double(), expected, rtol=1e-4, atol=1e-6)
    # the exact CDF gives a different decoder term, the same KL terms
    exact_cdf = F.vb_terms_bpd(output, x0, x_t, t, SCHEDULE, variance="learned_range")
    assert abs(exact_cdf[0] - vb[0]) > 1e-5 and torch.allclose(exact_cdf[1:], vb[1:])


# -- training: the hybrid loss and the rescaled KL --------------------------------------------


def loss_and_grad(loss_fn, output, *args, upstream=None, **options):
    output = output.detach().requires_grad_()
    loss = loss_fn(output, *args, **options)
    (loss if upstream is None else loss * upstream).sum().backward()
    return loss.detach(), output.grad


def rebuilt_x_t(x0, t, noise):
    """The x_t the hybrid kernel rebuilds (the one the model saw): q_sample in float32, rounded
    once to the data's dtype; Triton's interpreter truncates to bfloat16 (the GPU rounds to nearest)."""
    x_t = R.q_sample(x0.float(), t, noise.float(), SCHEDULE)
    if x0.dtype == torch.bfloat16 and interpreting():
        x_t = (x_t.view(torch.int32) & -65536).view(torch.float32)
    return x_t.to(x0.dtype)


def exact_hybrid_loss(output, x0, noise, t, *, prediction, weighting, reduction, tanh_cdf):
    """reference.hybrid_loss in float64 on float64 copies, except x_t: `rebuilt_x_t`."""
    x_t = rebuilt_x_t(x0, t, noise).double()
    output, x0, noise = output.double(), x0.double(), noise.double()
    mean, var = output.chunk(2, dim=1)
    mse = R.diffusion_loss(mean, x0, noise, t, SCHEDULE, prediction=prediction, weighting=weighting, reduction="none")
    vb = R.vb_terms_bpd(torch.cat([mean.detach(), var], dim=1), x0, x_t, t, SCHEDULE, prediction=prediction,
                        variance="learned_range", tanh_cdf=tanh_cdf)
    return R.reduce_per_sample(mse + T / 1000 * vb, reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_hybrid_loss_and_both_gradients_match_reference(triton_backend, prediction, dtype):
    index = PREDICTIONS.index(prediction) * 3 + DTYPES.index(dtype)
    shape, layout = SHAPES[index % len(SHAPES)], LAYOUTS[index % 2]
    reduction = ("mean", "sum", "none")[index % 3]
    weighting = ("simple", "snr", "min_snr")[index % 3]
    output, x0, _, noise, t = make_inputs(shape, dtype, prediction, "learned_range", layout=layout)
    upstream = torch.rand(shape[0]) + 0.5 if reduction == "none" else None
    options = dict(prediction=prediction, weighting=weighting, reduction=reduction, tanh_cdf=index % 2 == 1)
    loss, grad = loss_and_grad(F.hybrid_loss, output, x0, noise, t, SCHEDULE, upstream=upstream, **options)
    exact_loss, exact_grad = loss_and_grad(exact_hybrid_loss, output, x0, noise, t, upstream=upstream, **options)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == output.shape
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=1e-6)
    C = shape[1]
    for half in (slice(0, C), slice(C, 2 * C)):  # the mean half (MSE) and the variance half (vb)
        assert relative_error(grad[:, half], exact_grad[:, half]) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_hybrid_vb_term_trains_only_the_variance_half(triton_backend):
    output, x0, _, noise, t = make_inputs((4, 3, 5, 5), prediction="eps", variance="learned_range")
    _, mse_only = loss_and_grad(F.hybrid_loss, output, x0, noise, t, SCHEDULE, vlb_weight=0.0)
    _, hybrid = loss_and_grad(F.hybrid_loss, output, x0, noise, t, SCHEDULE, vlb_weight=5.0)
    assert torch.equal(mse_only[:, :3], hybrid[:, :3])
    assert not mse_only[:, 3:].any() and hybrid[:, 3:].abs().min() > 0
    # the reference too: the vb part alone has no gradient on the mean half
    exact = output.double().requires_grad_()
    _, terms = R.hybrid_loss(exact, x0.double(), noise.double(), t, SCHEDULE, return_terms=True)
    vb_part = R.hybrid_loss(exact, x0.double(), noise.double(), t, SCHEDULE, reduction="sum") \
        - R.diffusion_loss(exact[:, :3], x0.double(), noise.double(), t, SCHEDULE, reduction="sum")
    vb_part.backward()
    assert not exact.grad[:, :3].any() and exact.grad[:, 3:].abs().max() > 0
    torch.testing.assert_close(vb_part.detach(), T / 1000 * terms["vb"].sum())


@pytest.mark.parametrize("variance", VARIANCES)
def test_rescaled_kl_loss_matches_reference(triton_backend, variance):
    for prediction in (["eps", "x0", "v"] if variance == "learned_range" else ["eps"]):
        output, x0, _, noise, t = make_inputs((3, 2, 5, 6), prediction=prediction, variance=variance)
        options = dict(prediction=prediction, variance=variance, loss="kl", reduction="none")
        loss, grad = loss_and_grad(F.hybrid_loss, output, x0, noise, t, SCHEDULE, **options)
        exact_loss, exact_grad = loss_and_grad(R.hybrid_loss, output.double(), x0.double(), noise.double(), t,
                                               SCHEDULE, **options)
        torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-6)
        assert relative_error(grad, exact_grad) < 1e-5
        # RESCALED_KL: T times the vb term
        vb = R.vb_terms_bpd(output.double(), x0.double(), R.q_sample(x0.double(), t, noise.double(), SCHEDULE), t,
                            SCHEDULE, prediction=prediction, variance=variance)
        torch.testing.assert_close(exact_loss, T * vb)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_hybrid_loss_regenerates_q_samples_noise(triton_backend, layout):
    output, x0, _, _, t = make_inputs((3, 3, 6, 4), variance="learned_range", layout=layout)
    seed = torch.tensor([1234])
    x_t, noise = F.q_sample(x0, t, None, SCHEDULE, seed=seed, return_noise=True)
    torch.testing.assert_close(x_t, R.q_sample(x0, t, noise, SCHEDULE), rtol=1e-6, atol=1e-6)
    given = loss_and_grad(F.hybrid_loss, output, x0, noise, t, SCHEDULE, reduction="none")
    regenerated = loss_and_grad(F.hybrid_loss, output, x0, None, t, SCHEDULE, seed=seed, reduction="none")
    for a, b in zip(given, regenerated):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_hybrid_loss_terms_and_no_grad(triton_backend):
    output, x0, _, noise, t = make_inputs((3, 2, 4, 4), variance="learned_range")
    loss, terms = F.hybrid_loss(output, x0, noise, t, SCHEDULE, weighting="snr", reduction="none", return_terms=True)
    exact_loss, exact = R.hybrid_loss(output.double(), x0.double(), noise.double(), t, SCHEDULE, weighting="snr",
                                      reduction="none", return_terms=True)
    for name in ("mse", "vb"):
        torch.testing.assert_close(terms[name].double(), exact[name], rtol=1e-5, atol=1e-7)
    snr = SCHEDULE.snr[t].float()
    torch.testing.assert_close(loss, snr * terms["mse"] + T / 1000 * terms["vb"])
    with torch.no_grad():
        no_grad = F.hybrid_loss(output.requires_grad_(), x0, noise, t, SCHEDULE, weighting="snr")
    torch.testing.assert_close(no_grad, loss.mean())


def test_hybrid_loss_float64_runs_the_reference(triton_backend):
    output, x0, _, noise, t = make_inputs((2, 2, 4, 4), torch.float64, variance="learned_range")
    loss = F.hybrid_loss(output, x0, noise, t, SCHEDULE, reduction="none")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, R.hybrid_loss(output, x0, noise, t, SCHEDULE, reduction="none"))


# -- registration, compilation, GPU code ----------------------------------------------------------


def test_opcheck(triton_backend):
    output, x0, x_t, noise, t = make_inputs((2, 2, 4, 4), variance="learned_range")
    table, pred_table = SCHEDULE.kernel_table("cpu"), SCHEDULE.prediction_table("eps", "cpu")
    row = vlb.FIXED_LOG_VARIANCE_ROWS["learned_range"]
    torch.library.opcheck(torch.ops.fastddpm.vb_terms_bpd,
                          (output.requires_grad_(), x0, x_t, noise, t, table, pred_table, True, row, False, False,
                           False))
    torch.library.opcheck(torch.ops.fastddpm.vb_terms_bpd_backward,
                          (output.detach(), x0, x_t, t, table, pred_table, torch.rand(2), True, row, True, False, False))
    weights = SCHEDULE.loss_weight_table("simple", "eps", 5.0, "cpu")
    torch.library.opcheck(torch.ops.fastddpm.vlb_loss,
                          (output, x0, noise, t, table, pred_table, weights, t.new_empty(0), 0.1, True, True, row,
                           False, False, True))


def test_compiles_without_graph_break(triton_backend):
    output, x0, x_t, noise, t = make_inputs((2, 3, 4, 4), variance="learned_range")

    def step(output, x0, x_t, noise, t):
        vb = F.vb_terms_bpd(output, x0, x_t, t, SCHEDULE, variance="learned_range")
        return F.hybrid_loss(output, x0, noise, t, SCHEDULE) + vb.mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, grad = loss_and_grad(compiled, output, x0, x_t, noise, t)
    exact_loss, exact_grad = loss_and_grad(step, output, x0, x_t, noise, t)
    torch.testing.assert_close(loss, exact_loss)
    torch.testing.assert_close(grad, exact_grad)


def test_compiles_for_gpus_with_vector_accesses():
    """sm_80 and sm_90, float32 and bfloat16, at the real launch's specialisation: 16-byte loads
    of every full tensor and stores of the gradient, no spills."""
    from aot import DTYPES as AOT_DTYPES
    from aot import assert_fast_ptx

    from fastddpm.kernels._common import launch_config
    from fastddpm.kernels.hybrid import hybrid_launch_config

    specs, loads, stores = [], [], []
    for dtype in ("float32", "bfloat16"):
        data = "*" + AOT_DTYPES[dtype]
        like = torch.empty(8, 3, 32, 32, dtype=getattr(torch, dtype), device="meta")
        _, block, num_warps = launch_config(like)
        per_thread = block // (32 * num_warps) * getattr(torch, dtype).itemsize // 16  # 16-byte accesses
        specs.append(dict(
            module="fastddpm.kernels.vlb", kernel="vb_terms_kernel", num_warps=num_warps,
            signature={"out_ptr": data, "x0_ptr": data, "x_t_ptr": data, "noise_ptr": data, "t_ptr": "*i64",
                       "table_ptr": "*fp32", "pred_table_ptr": "*fp32", "partial_ptr": "*fp32",
                       "grad_scale_ptr": "*fp32", "grad_ptr": data, "D": "i32", "T": "i32", "C": "i32",
                       "n_blocks": "i32", "fixed_log_var_row": "i32"},
            constexprs=dict(LEARNED=True, CLIP=True, TANH_CDF=False, WITH_MSE=True, COMPUTE_GRAD=False,
                            CHANNELS_LAST=False, BLOCK=block),
            divisible=["out_ptr", "x0_ptr", "x_t_ptr", "noise_ptr", "grad_ptr", "D"]))
        loads.append(5 * per_thread)  # both output halves, x0, x_t, noise
        stores.append(0)
        _, block, num_warps = hybrid_launch_config(like)
        per_thread = block // (32 * num_warps) * getattr(torch, dtype).itemsize // 16
        specs.append(dict(
            module="fastddpm.kernels.hybrid", kernel="vlb_loss_kernel", num_warps=num_warps,
            signature={"out_ptr": data, "x0_ptr": data, "noise_ptr": data, "t_ptr": "*i64", "seed_ptr": "*i64",
                       "table_ptr": "*fp32", "pred_table_ptr": "*fp32", "mse_weight_ptr": "*fp32",
                       "partial_ptr": "*fp32", "grad_ptr": data, "vlb_weight": "fp32", "D": "i32", "T": "i32",
                       "C": "i32", "HW": "i32", "n_blocks": "i32", "fixed_log_var_row": "i32"},
            constexprs=dict(HYBRID=True, LEARNED=True, DRAW_NOISE=dtype == "bfloat16", TANH_CDF=False,
                            COMPUTE_GRAD=True, CHANNELS_LAST=False, BLOCK=block),
            divisible=["out_ptr", "x0_ptr", "noise_ptr", "grad_ptr", "D"]))
        loads.append((3 if dtype == "bfloat16" else 4) * per_thread)  # output halves, x0 (and the noise)
        stores.append(2 * per_thread)  # the gradient's two halves
    assert_fast_ptx(specs, loads, stores)


# -- bad input --------------------------------------------------------------------------------


def _hybrid_args(variance="learned_range"):
    output, x0, _, noise, t = make_inputs((2, 2, 4, 4), variance=variance)
    return output, x0, noise, t, SCHEDULE


@pytest.mark.parametrize("call, error, match", [
    (lambda a: F.hybrid_loss(*a, loss="vlb"), ValueError, "loss must be one of"),
    (lambda a: F.hybrid_loss(*_hybrid_args("fixed_small"), variance="fixed_small"), ValueError,
     "variance must be 'learned_range'"),
    (lambda a: F.hybrid_loss(*_hybrid_args("fixed_small"), loss="kl", variance="learned"), ValueError,
     "variance must be one of"),
    (lambda a: F.hybrid_loss(a[0][:, :2], *a[1:]), ValueError, "model_output must have shape"),
    (lambda a: F.hybrid_loss(*a, vlb_weight=-1.0), ValueError, "vlb_weight must be"),
    (lambda a: F.hybrid_loss(*a, vlb_weight="0.1"), ValueError, "vlb_weight must be"),
    (lambda a: F.hybrid_loss(a[0], a[1], None, *a[3:]), ValueError, "exactly one of noise"),
    (lambda a: F.hybrid_loss(*a, seed=torch.tensor([1])), ValueError, "exactly one of noise"),
    (lambda a: F.hybrid_loss(a[0], a[1], None, *a[3:], seed=torch.tensor([1.0])), TypeError, "seed must be"),
    (lambda a: F.hybrid_loss(*a, tanh_cdf=1), TypeError, "tanh_cdf must be a bool"),
    (lambda a: F.hybrid_loss(*a, return_terms="yes"), TypeError, "return_terms must be a bool"),
    (lambda a: F.hybrid_loss(*a, weighting="lvlb"), ValueError, "weighting must be one of"),
    (lambda a: F.vb_terms_bpd(a[0], a[1], a[1], a[3], SCHEDULE, variance="learned_range", tanh_cdf="no"), TypeError,
     "tanh_cdf must be a bool"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(_hybrid_args())


def test_seed_needs_the_triton_backend(reference_backend):
    output, x0, _, t, schedule = _hybrid_args()
    with pytest.raises(ValueError, match="on the reference backend pass noise"):
        F.hybrid_loss(output, x0, None, t, schedule, seed=torch.tensor([3]))

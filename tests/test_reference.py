"""The float64 reference against closed forms, identities and diffusers."""
import math

import pytest
import torch

from helpers import relative_error

from fastddpm import NoiseSchedule
from fastddpm import reference as R

diffusers = pytest.importorskip("diffusers")


def rand(*shape, dtype=torch.float64, generator=None):
    return torch.randn(*shape, dtype=dtype, generator=generator)


def test_eps_form_and_coefficient_form_of_the_mean_agree(schedule):
    x_t, eps = rand(4, 3, 5, 5), rand(4, 3, 5, 5)
    t = torch.tensor([0, 1, 500, 999])
    mean, _, _, _ = R.p_mean_variance(eps, x_t, t, schedule, prediction="eps")
    b = lambda table: R.gather(table, t, x_t)  # noqa: E731
    eps_form = (x_t - b(schedule.betas) / b(schedule.sqrt_one_minus_alphas_cumprod) * eps) / b(schedule.alphas).sqrt()
    torch.testing.assert_close(mean, eps_form, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterizations_recover_x0_and_eps(schedule, prediction):
    x0, eps = rand(3, 2, 4, 4), rand(3, 2, 4, 4)
    t = torch.tensor([3, 400, 998])
    x_t = R.q_sample(x0, t, eps, schedule)
    output = R.training_target(x0, t, eps, schedule, prediction)
    x0_hat, eps_hat = R.x0_eps_from_output(output, x_t, t, schedule, prediction)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_posterior_of_the_true_x0_is_exact(schedule):
    """With x0_hat = x0, the model mean is the posterior mean and the KL is 0."""
    x0, eps = rand(2, 3, 4, 4), rand(2, 3, 4, 4)
    t = torch.tensor([1, 700])
    x_t = R.q_sample(x0, t, eps, schedule)
    mean, var, log_var = R.q_posterior(x0, x_t, t, schedule)
    model_mean, model_var, _, _ = R.p_mean_variance(eps, x_t, t, schedule)
    torch.testing.assert_close(model_mean, mean)
    torch.testing.assert_close(model_var, var)
    assert var.shape == (2, 1, 1, 1) and log_var.shape == (2, 1, 1, 1)
    kl = R.vb_terms_bpd(eps, x0, x_t, t, schedule)
    torch.testing.assert_close(kl, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_kl_of_equal_gaussians_is_zero_and_positive_otherwise():
    m, lv = rand(100), rand(100)
    assert R.normal_kl(m, lv, m, lv).abs().max() < 1e-15
    assert (R.normal_kl(m, lv, rand(100), rand(100)) > 0).all()


def test_vlb_weight_times_eps_mse_is_the_kl_term(schedule):
    """For fixed_small, w_vlb[t] · mean((eps - eps_hat)²) = KL / D in nats, t >= 1."""
    x0, eps, eps_hat = rand(4, 3, 6, 6), rand(4, 3, 6, 6), rand(4, 3, 6, 6)
    t = torch.tensor([1, 10, 300, 999])
    x_t = R.q_sample(x0, t, eps, schedule)
    weighted = R.diffusion_loss(eps_hat, x0, eps, t, schedule, weighting="vlb", reduction="none")
    kl_bits = R.vb_terms_bpd(eps_hat, x0, x_t, t, schedule, variance="fixed_small")
    torch.testing.assert_close(weighted, kl_bits * math.log(2), rtol=1e-9, atol=0)
    for prediction in ("x0", "v"):  # the same objective through the other parameterizations
        output = R.training_target(R.x0_eps_from_output(eps_hat, x_t, t, schedule, "eps")[0], t,
                                   R.x0_eps_from_output(eps_hat, x_t, t, schedule, "eps")[1], schedule, prediction)
        converted = R.diffusion_loss(output, x0, eps, t, schedule, prediction=prediction, weighting="vlb",
                                     reduction="none")
        torch.testing.assert_close(converted, weighted, rtol=1e-7, atol=0)


def test_q_sample_monte_carlo_moments(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = rand(1, 1, 1, 1, generator=g).expand(20000, 1, 1, 1).contiguous()
    t = torch.full((20000,), 250)
    x_t = R.q_sample(x0, t, rand(20000, 1, 1, 1, generator=g), schedule)
    mean, std = schedule.sqrt_alphas_cumprod[250] * x0[0, 0, 0, 0], schedule.sqrt_one_minus_alphas_cumprod[250]
    assert abs(x_t.mean() - mean) < 4 * std / math.sqrt(20000)
    assert abs(x_t.std() / std - 1) < 4 / math.sqrt(2 * 20000)


def test_decoder_likelihood_sums_to_one_over_bins():
    """The 256 discretized bins of one Gaussian carry all its mass."""
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.3, -2.0), (-0.9, -4.0), (0.0, 0.5)):
        logp = R.discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_tanh_cdf_is_close_to_erf_cdf():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    assert (R.approx_standard_normal_cdf(x) - R.standard_normal_cdf(x)).abs().max() < 1e-3


def test_prior_bpd_closed_form(schedule):
    x0 = rand(3, 2, 4, 4)
    ab = schedule.alphas_cumprod[-1]
    expected = 0.5 * (-1 - (1 - ab).log() + (1 - ab) + ab * x0 ** 2).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(R.prior_bpd(x0, schedule), expected)


def test_dynamic_thresholding():
    x0_hat = rand(3, 2, 8, 8) * 3
    out = R.process_x0(x0_hat, "dynamic")
    s = torch.quantile(x0_hat.abs().flatten(1), 0.995, dim=1).clamp(min=1)
    torch.testing.assert_close(out, x0_hat.clamp(-s[:, None, None, None], s[:, None, None, None]) / s[:, None, None, None])
    assert out.abs().max() <= 1


def test_half_inputs_compute_in_float32_and_round_once(schedule):
    """bfloat16 keeps the noise for t < 10, where diffusers' add_noise in bfloat16 adds none."""
    x0, eps = rand(10, 3, 4, 4).bfloat16(), rand(10, 3, 4, 4).bfloat16()
    t = torch.arange(10)
    x_t = R.q_sample(x0, t, eps, schedule)
    exact = R.q_sample(x0.double(), t, eps.double(), schedule)
    assert x_t.dtype == torch.bfloat16
    torch.testing.assert_close(x_t.double(), exact, rtol=8e-3, atol=8e-3)
    # exact result rounded once to bfloat16
    assert (x_t.double() - exact).abs().max() <= (exact.bfloat16().double() - exact).abs().max() + 1e-12
    assert not torch.equal(x_t, x0)


# -- against diffusers --------------------------------------------------------------------


def test_add_noise_matches_diffusers(schedule):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    x0, eps = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    t = torch.randint(0, 1000, (8,))
    torch.testing.assert_close(R.q_sample(x0, t, eps, schedule), scheduler.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction, diffusers_name", [("eps", "epsilon"), ("v", "v_prediction"), ("x0", "sample")])
def test_ddpm_step_matches_diffusers(schedule, prediction, diffusers_name):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=diffusers_name, clip_sample=False,
                                        variance_type="fixed_small")
    x_t, output, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([999, 500, 37, 1])  # per sample: diffusers takes one t, so compare sample by sample
    ours = R.p_sample_step(output.double(), x_t.double(), t, schedule, noise=noise.double(), prediction=prediction)
    for b in range(4):
        theirs = _diffusers_ddpm_step(scheduler, output[b:b + 1], int(t[b]), x_t[b:b + 1], noise[b:b + 1])
        # diffusers runs in float32: its 1 - ab near t = 0 is off by up to 1.7e-4 (relative)
        assert relative_error(theirs, ours[b:b + 1]) < 2e-4


def _diffusers_ddpm_step(scheduler, output, t, x_t, noise):
    """DDPMScheduler.step with a given noise: its variance noise is drawn by randn_tensor."""
    import diffusers.schedulers.scheduling_ddpm as module
    original = module.randn_tensor
    module.randn_tensor = lambda *args, **kwargs: noise
    try:
        return scheduler.step(output, t, x_t).prev_sample
    finally:
        module.randn_tensor = original


@pytest.mark.parametrize("prediction, diffusers_name", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(schedule, prediction, diffusers_name, eta):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, prediction_type=diffusers_name, clip_sample=False,
                                        set_alpha_to_one=True)
    scheduler.set_timesteps(50)
    x_t, output, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    steps = [int(scheduler.timesteps[i]) for i in (0, 25, 49)]
    t = torch.tensor(steps)
    t_prev = t - 1000 // 50  # diffusers' prev_timestep; the last one is -1 + ... below 0: ab_prev = 1
    t_prev = torch.where(t_prev < 0, torch.full_like(t_prev, -1), t_prev)
    ours = R.ddim_step(output.double(), x_t.double(), t, t_prev, schedule, eta=eta, noise=noise.double(),
                       prediction=prediction)
    for b in range(3):
        theirs = scheduler.step(output[b:b + 1], steps[b], x_t[b:b + 1], eta=eta, variance_noise=noise[b:b + 1])
        torch.testing.assert_close(ours[b:b + 1].float(), theirs.prev_sample, rtol=1e-4, atol=1e-4)


def test_reference_gradients_are_exact():
    schedule = NoiseSchedule.linear(100)
    x0, eps = rand(2, 2, 3, 3), rand(2, 2, 3, 3)
    pred = rand(2, 2, 3, 3).requires_grad_()
    t = torch.tensor([5, 80])
    for prediction in ("eps", "x0", "v"):
        for weighting in ("simple", "min_snr", "vlb"):
            assert torch.autograd.gradcheck(
                lambda p: R.diffusion_loss(p, x0, eps, t, schedule, prediction=prediction, weighting=weighting), (pred,))
    assert torch.autograd.gradcheck(lambda x: R.q_sample(x, t, eps, schedule), (x0.clone().requires_grad_(),))

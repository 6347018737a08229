import math

import pytest
import torch

from fastddpm import NoiseSchedule

diffusers = pytest.importorskip("diffusers")


def test_linear_tables_match_math_md_numbers():
    s = NoiseSchedule.linear(1000)
    assert s.num_timesteps == 1000
    assert s.posterior_variance[1].item() == pytest.approx(5.4531876613e-5, rel=1e-9)
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(-9.8167251353, rel=1e-9)
    assert s.posterior_variance[0].item() == 0.0
    for name in ("betas", "alphas_cumprod", "posterior_mean_coef1", "snr", "sqrt_recipm1_alphas_cumprod"):
        table = getattr(s, name)
        assert table.dtype == torch.float64 and table.device.type == "cpu" and table.shape == (1000,)


def test_tables_satisfy_their_definitions():
    s = NoiseSchedule.cosine(300)
    ab = torch.cumprod(1 - s.betas, 0)
    torch.testing.assert_close(s.alphas_cumprod, ab, rtol=1e-14, atol=0)
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], ab[:-1], rtol=0, atol=0)
    torch.testing.assert_close(s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod, torch.ones(300, dtype=torch.float64))
    torch.testing.assert_close(s.sqrt_one_minus_alphas_cumprod ** 2 + ab, torch.ones(300, dtype=torch.float64))
    # coef1 x0 + coef2 x_t: with x_t = sqrt_ab x0, the posterior mean of a noise-free chain is sqrt_ab_prev x0.
    torch.testing.assert_close(s.posterior_mean_coef1 + s.posterior_mean_coef2 * s.sqrt_alphas_cumprod,
                               s.alphas_cumprod_prev.sqrt())
    torch.testing.assert_close(s.snr, ab / (1 - ab))


@pytest.mark.parametrize("ours, theirs", [
    (lambda: NoiseSchedule.linear(1000), dict(beta_schedule="linear")),
    (lambda: NoiseSchedule.scaled_linear(1000), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    (lambda: NoiseSchedule.cosine(1000), dict(beta_schedule="squaredcos_cap_v2")),
    (lambda: NoiseSchedule.sigmoid(1000), dict(beta_schedule="sigmoid")),
])
def test_betas_match_diffusers(ours, theirs):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, **theirs)
    # diffusers builds its betas in float32.
    torch.testing.assert_close(ours().betas.float(), scheduler.betas, rtol=2e-5, atol=1e-7)
    # from_diffusers keeps the float32 alphas_cumprod every diffusers step reads; its betas are theirs up
    # to the rounding of alphas = 1 - betas in float32
    from_diffusers = NoiseSchedule.from_diffusers(scheduler)
    torch.testing.assert_close(from_diffusers.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=1e-12, atol=0)
    torch.testing.assert_close(from_diffusers.betas, scheduler.betas.double(), rtol=0, atol=1.5e-7)


def test_zero_terminal_snr_matches_diffusers_rescale():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    base = NoiseSchedule.scaled_linear(1000)
    ours = NoiseSchedule.scaled_linear(1000, zero_terminal_snr=True)
    torch.testing.assert_close(ours.betas, rescale_zero_terminal_snr(base.betas.clone()), rtol=1e-10, atol=1e-14)


def test_improved_diffusion_linear_rescales_with_T():
    s = NoiseSchedule.linear(4000, rescale_with_T=True)
    assert s.betas[0].item() == pytest.approx(1e-4 * 1000 / 4000)
    assert s.betas[-1].item() == pytest.approx(0.02 * 1000 / 4000)


def test_zero_terminal_snr():
    base = NoiseSchedule.linear(1000)
    s = NoiseSchedule.linear(1000, zero_terminal_snr=True)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-20)
    assert s.sqrt_alphas_cumprod[0].item() == pytest.approx(base.sqrt_alphas_cumprod[0].item(), rel=1e-12)
    for weighting in ("simple", "vlb", "snr", "min_snr", "p2"):
        for prediction in ("eps", "x0", "v"):
            w = s.loss_weights(weighting, prediction)
            assert torch.isfinite(w).all(), (weighting, prediction)
    assert s.loss_weights("min_snr", "eps")[-1].item() == 1.0
    # v and x0 vlb weights have a finite limit at snr = 0; the eps one is capped
    w_v = s.loss_weights("vlb", "v")
    assert w_v[-1] == pytest.approx((s.posterior_mean_coef1[-1] ** 2 / (2 * s.posterior_variance[-1])).item())
    table = s.kernel_table("cpu")
    assert torch.isfinite(table).all()


def test_min_snr_weights_match_diffusers_example():
    """diffusers' train_text_to_image.py: min(snr, gamma) / snr (eps) or / (snr + 1) (v).

    diffusers computes snr in float32 (up to 2e-4 relative error), hence the tolerance."""
    from diffusers.training_utils import compute_snr
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    s = NoiseSchedule.from_diffusers(scheduler)
    t = torch.arange(1000)
    snr = compute_snr(scheduler, t).double()
    clipped = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(s.loss_weights("min_snr", "eps", 5.0)[t], clipped / snr, rtol=5e-4, atol=0)
    torch.testing.assert_close(s.loss_weights("min_snr", "v", 5.0)[t], clipped / (snr + 1), rtol=5e-4, atol=0)


def test_weights_are_one_objective_across_parameterizations():
    """vlb, snr, p2 are eps-space weights: converted, the x0 and v losses equal the eps loss."""
    s = NoiseSchedule.linear(1000)
    snr = s.snr
    for weighting in ("vlb", "snr", "p2", "min_snr"):
        w_eps = s.loss_weights(weighting, "eps")
        # ||x0 err||² = ||eps err||² / snr and ||v err||² = ||eps err||² (1 + snr) / snr
        torch.testing.assert_close(s.loss_weights(weighting, "x0") / snr, w_eps)
        torch.testing.assert_close(s.loss_weights(weighting, "v") * (1 + snr) / snr, w_eps)
    assert torch.equal(s.loss_weights("simple", "x0"), torch.ones(1000, dtype=torch.float64))
    torch.testing.assert_close(s.loss_weights("p2", "eps"), 1 / (1 + snr))


def test_user_weight_table():
    s = NoiseSchedule.linear(10)
    table = torch.rand(10) + 0.5
    torch.testing.assert_close(s.loss_weights(table), table.double())
    with pytest.raises(ValueError, match="length T=10"):
        s.loss_weights(torch.ones(9))
    with pytest.raises(ValueError, match="finite"):
        s.loss_weights(torch.tensor([float("nan")] * 10))


def test_kernel_table_is_cached_per_device():
    s = NoiseSchedule.linear(50)
    first = s.kernel_table("cpu")
    assert s.kernel_table(torch.device("cpu")) is first
    assert first.dtype == torch.float32
    from fastddpm.schedule import KERNEL_ROWS
    row = KERNEL_ROWS.index("sqrt_one_minus_alphas_cumprod")
    # cast once from float64: in bfloat16 this would be 0 for the first steps
    torch.testing.assert_close(first[row], s.sqrt_one_minus_alphas_cumprod.float())
    assert (first[row][:10] > 0).all()


def test_sample_timesteps():
    s = NoiseSchedule.linear(7)
    g = torch.Generator().manual_seed(3)
    t = s.sample_timesteps(5000, generator=g)
    assert t.dtype == torch.int64 and t.shape == (5000,)
    assert int(t.min()) == 0 and int(t.max()) == 6
    counts = torch.bincount(t, minlength=7).double()
    assert (counts - 5000 / 7).abs().max() < 5 * math.sqrt(5000 / 7)
    again = s.sample_timesteps(5000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, again)


@pytest.mark.parametrize("call, match", [
    (lambda: NoiseSchedule.linear(1), "T must be an int >= 2"),
    (lambda: NoiseSchedule.cosine(10.5), "T must be an int"),
    (lambda: NoiseSchedule.from_betas(torch.tensor([0.1, 1.5])), r"betas must lie in \(0, 1\]"),
    (lambda: NoiseSchedule.from_betas(torch.ones(2, 2) * 0.1), "betas must be a 1-D tensor"),
    (lambda: NoiseSchedule.linear(10).loss_weights("nope"), "weighting must be one of"),
    (lambda: NoiseSchedule.linear(10).loss_weights("snr", prediction="score"), "prediction must be one of"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_from_diffusers_needs_a_scheduler():
    with pytest.raises(TypeError, match="scheduler"):
        NoiseSchedule.from_diffusers(object())

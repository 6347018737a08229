"""denoising-diffusion-pytorch (lucidrains) in fastddpm: its beta schedules, its loss weights, its
self-conditioning in training and sampling. It cannot be installed here (it imports torchvision,
which does not load beside this torch), so its formulas are transcribed from its source
(denoising_diffusion_pytorch.py, GaussianDiffusion) element by element, in plain Python."""
import math

import pytest
import torch

from fastddpm import DiffusionLoss, NoiseSchedule, sample
from fastddpm.reference import p_mean_variance


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def lucidrains_betas(T, beta_schedule, **kwargs):
    """Its linear_beta_schedule, cosine_beta_schedule and sigmoid_beta_schedule."""
    if beta_schedule == "linear":
        scale = 1000 / T
        return torch.linspace(scale * 0.0001, scale * 0.02, T, dtype=torch.float64)
    if beta_schedule == "cosine":
        s = kwargs.get("s", 0.008)
        ab = [math.cos((i / T + s) / (1 + s) * math.pi * 0.5) ** 2 for i in range(T + 1)]
    else:
        start, end, tau = kwargs.get("start", -3), kwargs.get("end", 3), kwargs.get("tau", 1)
        # its v_start and v_end are sigmoids of 0-dim float32 tensors
        v_start, v_end = (float(torch.tensor(v / tau).sigmoid()) for v in (start, end))
        ab = [(-sigmoid((i / T * (end - start) + start) / tau) + v_end) / (v_end - v_start) for i in range(T + 1)]
    ab = [a / ab[0] for a in ab]
    return torch.tensor([min(max(1 - ab[i + 1] / ab[i], 0.0), 0.999) for i in range(T)], dtype=torch.float64)


@pytest.mark.parametrize("T, beta_schedule, kwargs", [
    (1000, "sigmoid", {}), (250, "sigmoid", dict(start=-2, end=4, tau=0.7, clamp_min=1e-4)),
    (1000, "cosine", {}), (64, "cosine", dict(s=0.02)), (1000, "linear", {}), (4000, "linear", {}),
])
def test_schedules_are_denoising_diffusion_pytorchs(T, beta_schedule, kwargs):
    ours = NoiseSchedule.from_lucidrains(T, beta_schedule, **kwargs)
    torch.testing.assert_close(ours.betas, lucidrains_betas(T, beta_schedule, **kwargs), rtol=1e-9, atol=0)
    assert ours.num_timesteps == T and ours.defaults == {}


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="beta_schedule must be"):
        NoiseSchedule.from_lucidrains(100, "quadratic")
    with pytest.raises(TypeError, match="linear schedule takes no options"):
        NoiseSchedule.from_lucidrains(100, "linear", s=0.1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        NoiseSchedule.from_lucidrains(100, "sigmoid", s=0.1)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("min_snr_loss_weight", [False, True])
def test_loss_weights_and_loss_are_its_own(objective, min_snr_loss_weight):
    schedule = NoiseSchedule.from_lucidrains(1000, "sigmoid")
    loss_fn = DiffusionLoss.from_lucidrains(schedule, objective, min_snr_loss_weight, min_snr_gamma=5)
    ab = schedule.alphas_cumprod
    snr = ab / (1 - ab)
    clipped = snr.clamp(max=5) if min_snr_loss_weight else snr
    expected = {"pred_noise": clipped / snr, "pred_x0": clipped, "pred_v": clipped / (snr + 1)}[objective]
    weights = schedule.loss_weights(loss_fn.weighting, loss_fn.prediction, loss_fn.gamma)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=0)
    # its p_losses for the same t and noise: mean over the batch of w[t] · mean((out - target)²)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 6, 6, generator=g) * 2 - 1
    x_t, t, state = loss_fn.noise(x0, generator=g)
    out = torch.randn(4, 3, 6, 6, generator=g)
    noise = (x_t - ab.sqrt()[t].float().view(-1, 1, 1, 1) * x0) / (1 - ab).sqrt()[t].float().view(-1, 1, 1, 1)
    v = ab.sqrt()[t].view(-1, 1, 1, 1) * noise.double() - (1 - ab).sqrt()[t].view(-1, 1, 1, 1) * x0.double()
    target = {"pred_noise": noise.double(), "pred_x0": x0.double(), "pred_v": v}[objective]
    theirs = (((out.double() - target) ** 2).mean((1, 2, 3)) * expected[t]).mean()
    torch.testing.assert_close(loss_fn.loss(out, x0, state).double(), theirs, rtol=2e-4, atol=0)


class SelfConditioned(torch.nn.Module):
    """lucidrains' Unet calling convention: forward(x, time, x_self_cond=None), the condition
    concatenated to x (zeros when None). Records what it was given."""

    def __init__(self, channels=3):
        super().__init__()
        torch.manual_seed(0)
        self.channels, self.self_condition, self.out_dim = channels, True, channels
        self.conv = torch.nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.calls = []

    def forward(self, x, time, x_self_cond=None):
        self.calls.append((torch.is_grad_enabled(), None if x_self_cond is None else x_self_cond.clone()))
        cond = torch.zeros_like(x) if x_self_cond is None else x_self_cond
        return 0.3 * torch.tanh(self.conv(torch.cat([cond, x], 1))) + 0.1 * x


def test_training_self_conditions_half_the_batches_on_a_no_grad_x0_hat():
    schedule = NoiseSchedule.from_lucidrains(100, "cosine")
    model = SelfConditioned()
    loss_fn = DiffusionLoss.from_lucidrains(schedule, "pred_v", self_condition=True)
    x0 = torch.rand(2, 3, 6, 6) * 2 - 1
    g = torch.Generator().manual_seed(0)
    batches = 200
    for _ in range(batches):
        loss_fn(model, x0, generator=g).backward()
    pairs = [(first, second) for first, second in zip(model.calls, model.calls[1:]) if first[1] is None
             and not first[0] and second[1] is not None]
    conditioned = len(pairs)
    assert len(model.calls) == batches + conditioned and abs(conditioned - batches / 2) < 4 * math.sqrt(batches / 4)
    for grad_enabled, cond in model.calls:
        assert grad_enabled or cond is None  # the first call runs without grad; the condition never has one
        assert cond is None or not cond.requires_grad
    # the condition is the first call's x0_hat, sqrt(ab) x_t - sqrt(1 - ab) v, unclipped (its model_predictions)
    for seed in range(20):
        model.calls.clear()
        loss_fn(model, x0, generator=torch.Generator().manual_seed(seed))
        if len(model.calls) == 2:
            break
    x_t, t, _ = loss_fn.noise(x0, generator=torch.Generator().manual_seed(seed))  # the same draws again
    v = model(x_t, t)
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(model.calls[1][1].double(), ab.sqrt() * x_t.double() - (1 - ab).sqrt() * v.double(),
                               rtol=0, atol=1e-5)
    assert "self_condition=True" in repr(loss_fn)


def test_sampling_passes_the_previous_steps_x0_hat():
    """Its p_sample_loop: x_start of step t (clipped) is the self-condition of step t - 1."""
    schedule = NoiseSchedule.from_lucidrains(20, "sigmoid")
    model = SelfConditioned()
    noises = torch.randn(21, 2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    ours = sample(model, (2, 3, 6, 6), schedule, prediction="pred_v", x_T=noises[0], self_condition=True,
                  noise_fn=lambda k, x: noises[k + 1], progress=False)
    calls, model.calls = model.calls, []
    x, x_start = noises[0].double(), None
    for k, t in enumerate(range(19, -1, -1)):  # theirs, in float64
        time = torch.full((2,), t)
        out = model(x.float(), time, None if x_start is None else x_start.float()).double()
        mean, _, log_var, x_start = p_mean_variance(out, x, time, schedule, prediction="v", clip_denoised=True)
        x = mean + (0.5 * log_var).exp() * noises[k + 1].double() * (t > 0)
    torch.testing.assert_close(ours.double(), x, rtol=0, atol=1e-5)
    assert calls[0][1] is None and all(cond is not None and cond.abs().max() <= 1 for _, cond in calls[1:])
    assert len(calls) == 20


def test_self_conditioned_ddim_and_solvers_run():
    schedule = NoiseSchedule.from_lucidrains(100, "sigmoid")
    for method in ("ddim", "dpm++2m", "heun"):
        model = SelfConditioned()
        out = sample(model, (2, 3, 6, 6), schedule, method=method, steps=5, prediction="v", self_condition=True,
                     progress=False)
        assert torch.isfinite(out).all() and model.calls[0][1] is None and model.calls[-1][1] is not None
    with pytest.raises(ValueError, match="self_condition=True works without guidance_scale"):
        sample(SelfConditioned(), (2, 3, 6, 6), schedule, self_condition=True, guidance_scale=2.0, null_kwargs={})

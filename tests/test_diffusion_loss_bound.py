"""DiffusionLoss training on the bound: learned variance (hybrid), rescaled KL, importance-sampled t."""
import pytest
import torch
from helpers import use_backend

from fastddpm import DiffusionLoss, LossSecondMomentSampler, NoiseSchedule
from fastddpm import functional as F
from fastddpm import reference as R

S = NoiseSchedule.cosine(50)


def model_2c(x_t, t):
    """A fixed toy model with a 2C-channel output; the variance half in [-1, 1]."""
    scale = (t.float() / 50).reshape(-1, 1, 1, 1)
    return torch.cat([0.7 * x_t + scale, torch.tanh(x_t - scale)], dim=1)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("loss_type, vlb_weight", [("mse", None), ("mse", 0.3), ("kl", None)])
def test_learned_variance_loss_is_the_bound_loss_of_its_noise(backend, loss_type, vlb_weight):
    with use_backend(backend):
        loss_fn = DiffusionLoss(S, prediction="v", weighting="min_snr", variance="learned_range", loss_type=loss_type,
                                vlb_weight=vlb_weight, reduction="none")
        x0 = torch.rand(3, 2, 4, 4) * 2 - 1
        x_t, t, state = loss_fn.noise(x0)
        losses = loss_fn.loss(model_2c(x_t, t), x0, state)
        noise = state.noise
        if noise is None:  # triton: regenerate the noise q-sample drew, to feed the reference
            _, noise = F.q_sample(x0, t, None, S, seed=state.seed, return_noise=True)
        expected = R.hybrid_loss(model_2c(x_t, t).double(), x0.double(), noise.double(), t, S, prediction="v",
                                 weighting="min_snr", vlb_weight=vlb_weight, reduction="none",
                                 loss="kl" if loss_type == "kl" else "hybrid", variance="learned_range")
        torch.testing.assert_close(losses.double(), expected, rtol=2e-4, atol=1e-5)


def test_importance_sampled_t_weights_the_loss_and_updates_the_history(reference_backend):
    sampler = LossSecondMomentSampler(S)
    loss_fn = DiffusionLoss(S, variance="learned_range", timestep_sampler=sampler)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    torch.manual_seed(1)
    loss = loss_fn(model_2c, x0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.manual_seed(1)
    x_t, t, state = DiffusionLoss(S, variance="learned_range", timestep_sampler=LossSecondMomentSampler(S),
                                  reduction="none").noise(x0)
    per_sample = F.hybrid_loss(model_2c(x_t, t), x0, state.noise, t, S, reduction="none")
    # uniform before warm-up: weights 1 / (T p_t) = 1
    torch.testing.assert_close(state.importance_weights, torch.ones(8))
    torch.testing.assert_close(loss, (per_sample * state.importance_weights).mean())
    assert int(sampler.loss_counts.sum()) == 8


def test_loss_second_moment_by_name():
    loss_fn = DiffusionLoss(S, timestep_sampler="loss-second-moment")
    assert isinstance(loss_fn.timestep_sampler, LossSecondMomentSampler)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(variance="learned"), ValueError, "variance must be one of"),
    (dict(loss_type="elbo"), ValueError, "loss_type must be one of"),
    (dict(timestep_sampler="importance"), ValueError, "timestep_sampler must be one of"),
    (dict(timestep_sampler=3), TypeError, "timestep_sampler must be"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        DiffusionLoss(S, **kwargs)

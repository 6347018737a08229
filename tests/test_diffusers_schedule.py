"""A diffusers scheduler's schedule and options in fastddpm (NoiseSchedule.from_diffusers), the
model outputs every entry point accepts, and diffusers' names for predictions."""
import warnings

import pytest
import torch

from fastddpm import DiffusionLoss, NoiseSchedule, TrainStep, elbo_bpd, sample
from fastddpm.options import PREDICTION_SYNONYMS, canonical_prediction

diffusers = pytest.importorskip("diffusers")
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402
from interop_models import tiny_unet  # noqa: E402

SCHEDULERS = [
    (diffusers.DDPMScheduler, {}),
    (diffusers.DDPMScheduler, dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")),
    (diffusers.DDPMScheduler, dict(beta_schedule="sigmoid", num_train_timesteps=300)),
    (diffusers.DDIMScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   rescale_betas_zero_snr=True)),
    (diffusers.DDIMScheduler, dict(trained_betas=[0.01, 0.2, 0.5, 0.9], num_train_timesteps=4)),
]


@pytest.mark.parametrize("cls, kwargs", SCHEDULERS)
def test_a_config_gives_the_schedule_of_its_scheduler(cls, kwargs):
    scheduler = cls(**kwargs)
    ours = NoiseSchedule.from_diffusers(scheduler)
    # alphas_cumprod as every diffusers step reads them (float32), betas the ratios of theirs
    torch.testing.assert_close(ours.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=1e-12, atol=0)
    for config in (scheduler.config, dict(scheduler.config)):  # a FrozenDict or a plain dict
        from_config = NoiseSchedule.from_diffusers(config)
        assert torch.equal(from_config.betas, ours.betas) and from_config.defaults == ours.defaults


@pytest.mark.parametrize("scheduler, expected", [
    (diffusers.DDPMScheduler(), dict(prediction="eps", clip_denoised=True, variance="fixed_small", spacing="leading",
                                     steps_offset=0, use_clipped_model_output=False)),
    (diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing",
                             steps_offset=1, set_alpha_to_one=False),
     dict(prediction="v", clip_denoised=False, spacing="trailing", steps_offset=1, set_alpha_to_one=False,
          use_clipped_model_output=False)),
    (diffusers.DDPMScheduler(prediction_type="sample", variance_type="fixed_large", timestep_spacing="linspace"),
     dict(prediction="x0", clip_denoised=True, variance="fixed_large", spacing="linspace", steps_offset=0,
          use_clipped_model_output=False)),
    (diffusers.DDPMScheduler(variance_type="fixed_small_log"), dict(variance="fixed_small")),
    (diffusers.DDPMScheduler(variance_type="learned_range"), dict(variance="learned_range")),
    # thresholding with sample_max_value 1 clamps the threshold to 1: plain clipping
    (diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9), dict(clip_denoised=True)),
    (diffusers.DDPMScheduler(thresholding=True, sample_max_value=float("inf")), dict(clip_denoised="dynamic")),
])
def test_the_config_options_become_defaults(scheduler, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # each of these has an exact equal
        defaults = NoiseSchedule.from_diffusers(scheduler).defaults
    assert {key: defaults.get(key) for key in expected} == expected


@pytest.mark.parametrize("kwargs, match, key, value", [
    (dict(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5), "ratio is 0.995",
     "clip_denoised", "dynamic"),
    (dict(clip_sample_range=2.0), "clip_sample_range=2.0", "clip_denoised", False),
    (dict(variance_type="learned"), "variance_type 'learned'", "variance", None),
])
def test_options_without_an_equal_warn(kwargs, match, key, value):
    with pytest.warns(UserWarning, match=match):
        defaults = NoiseSchedule.from_diffusers(diffusers.DDPMScheduler(**kwargs)).defaults
    assert defaults.get(key) == value


def test_bad_schedulers():
    with pytest.raises(TypeError, match="diffusers scheduler or its config"):
        NoiseSchedule.from_diffusers({"beta_schedule": "linear"})
    with pytest.raises(ValueError, match="beta_schedule 'laplace'"):
        NoiseSchedule.from_diffusers({"num_train_timesteps": 10, "beta_schedule": "laplace"})
    with pytest.raises(ValueError, match="prediction_type 'flow_prediction'"):
        NoiseSchedule.from_diffusers({"num_train_timesteps": 10, "prediction_type": "flow_prediction"})


class Conv(torch.nn.Module):
    """A conv with a timestep embedding, returning its output as `wrap` makes it."""

    def __init__(self, wrap=lambda out: out, channels=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.embed = torch.nn.Embedding(1000, channels)
        self.wrap = wrap

    def forward(self, x, t):
        return self.wrap(torch.tanh(self.conv(x)) + self.embed(t.long())[:, :, None, None])


OUTPUTS = {"tensor": lambda out: out, "UNet2DOutput": lambda out: UNet2DOutput(sample=out),
           "tuple": lambda out: (out, None), "list": lambda out: [out], "dict": lambda out: {"sample": out}}


def entry_points(model, schedule, **options):
    """What each entry point computes with `model`, from the same random numbers."""
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss_options = {key: value for key, value in options.items() if key != "clip_denoised"}
    return [DiffusionLoss(schedule, **loss_options)(model, x0, generator=torch.Generator().manual_seed(1)),
            sample(model, (2, 3, 8, 8), schedule, method="ddim", steps=3, progress=False,
                   generator=torch.Generator().manual_seed(2), **options),
            elbo_bpd(model, x0, schedule, timesteps=3, progress=False, generator=torch.Generator().manual_seed(3),
                     **options)["total_bpd"]]


@pytest.mark.parametrize("form", OUTPUTS)
def test_every_entry_point_takes_every_output_form(form):
    schedule = NoiseSchedule.linear(1000)
    expected = entry_points(Conv(), schedule)
    for got, want in zip(entry_points(Conv(OUTPUTS[form]), schedule), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("returned, name", [("text", "str"), (None, "NoneType"), ({"x": 1}, "dict"), ((), "tuple")])
def test_other_outputs_are_named(returned, name):
    model = Conv(lambda out: returned)
    schedule = NoiseSchedule.linear(1000)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    calls = [lambda: DiffusionLoss(schedule)(model, x0), lambda: sample(model, (2, 3, 8, 8), schedule, progress=False),
             lambda: elbo_bpd(model, x0, schedule, timesteps=2, progress=False)]
    for call in calls:
        with pytest.raises(TypeError, match=f"model returned {name}: expected a tensor, an object with a .sample"):
            call()


def test_a_diffusers_unet_trains_samples_and_is_bounded():
    """A real UNet2DModel (its forward returns UNet2DOutput) in DiffusionLoss, TrainStep, sample, elbo_bpd."""
    unet = tiny_unet()
    schedule = NoiseSchedule.from_diffusers(diffusers.DDPMScheduler())
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = DiffusionLoss(schedule, weighting="min_snr")(unet, x0)
    loss.backward()
    assert loss.ndim == 0 and all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    step = TrainStep(unet, DiffusionLoss(schedule), ema_decay=0.9)
    before = [p.detach().clone() for p in unet.parameters()]
    assert torch.isfinite(step.step(x0))
    assert any(not torch.equal(a, p) for a, p in zip(before, unet.parameters()))
    samples = sample(unet, (2, 3, 8, 8), schedule, method="ddim", steps=3, progress=False)
    assert samples.shape == (2, 3, 8, 8) and samples.abs().max() <= 1
    assert torch.isfinite(elbo_bpd(unet, x0, schedule, timesteps=3, progress=False)["total_bpd"]).all()


def test_explicit_arguments_win_over_the_schedules_defaults():
    schedule = NoiseSchedule.from_diffusers(diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False,
                                                                    timestep_spacing="trailing"))
    assert DiffusionLoss(schedule).prediction == "v"
    assert DiffusionLoss(schedule, prediction="eps").prediction == "eps"
    plain = NoiseSchedule.from_betas(schedule.betas)  # the same tables, no defaults
    assert plain.defaults == {} and DiffusionLoss(plain).prediction == "eps"
    model = Conv()
    from_schedule = entry_points(model, schedule)
    explicit = dict(prediction="v", clip_denoised=False)
    spelled_out = entry_points(model, plain, **explicit)
    # sample also takes the spacing and DDIMPipeline's use_clipped_model_output=False from the schedule
    spelled_out[1] = sample(model, (2, 3, 8, 8), plain, method="ddim", steps=3, progress=False, spacing="trailing",
                            generator=torch.Generator().manual_seed(2), use_clipped_model_output=False, **explicit)
    for got, want in zip(from_schedule, spelled_out):
        assert torch.equal(got, want)
    overridden = entry_points(model, schedule, prediction="eps", clip_denoised=True)
    assert not any(torch.equal(a, b) for a, b in zip(overridden, from_schedule))


def test_learned_range_schedule_trains_on_the_hybrid_loss():
    schedule = NoiseSchedule.from_diffusers(diffusers.DDPMScheduler(variance_type="learned_range"))
    loss_fn = DiffusionLoss(schedule)
    assert loss_fn.variance == "learned_range"
    model = Conv(lambda out: torch.cat([out, torch.tanh(out)], 1))
    assert torch.isfinite(loss_fn(model, torch.rand(2, 3, 8, 8) * 2 - 1))


@pytest.mark.parametrize("synonym", PREDICTION_SYNONYMS)
def test_prediction_synonyms_are_accepted_everywhere(synonym):
    schedule = NoiseSchedule.linear(1000)
    canonical = canonical_prediction(synonym)
    assert DiffusionLoss(schedule, prediction=synonym).prediction == canonical
    assert torch.equal(schedule.loss_weights("min_snr", synonym), schedule.loss_weights("min_snr", canonical))
    assert torch.equal(schedule.prediction_table(synonym, "cpu"), schedule.prediction_table(canonical, "cpu"))
    for got, want in zip(entry_points(Conv(), schedule, prediction=synonym),
                         entry_points(Conv(), schedule, prediction=canonical)):
        assert torch.equal(got, want)


def test_unknown_predictions_list_the_names():
    with pytest.raises(ValueError, match=r"prediction must be one of \('eps', 'x0', 'v'\) .*'epsilon'"):
        DiffusionLoss(NoiseSchedule.linear(10), prediction="score")

"""What users of other libraries pass: models wrapped in lambdas (the sampling device), uint8 and
[0, 255] images, float64 data; and what they expect of a loss module: backward twice, a resumable
state_dict."""
import functools
import io

import pytest
import torch

from helpers import use_backend
from fastddpm import DiffusionLoss, LossSecondMomentSampler, NoiseSchedule, elbo_bpd, sample
from fastddpm._checks import model_tensors
from fastddpm.sampling import _device

SCHEDULE = NoiseSchedule.linear(1000)


class Conv(torch.nn.Module):
    def __init__(self, channels=3, out_channels=None, device=None, dtype=None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, out_channels or channels, 3, padding=1, device=device, dtype=dtype)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return torch.tanh(self.conv(x)) * (1 + t.view(-1, 1, 1, 1) / 1000)


class Holder:
    """A callable object holding its module."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, t):
        return self.net(x, t)


def test_the_sampling_device_is_found_through_wrappers():
    """Resolution order: device=, x_T's, the model's parameters, then its buffers, a module reached
    through a bound method, a partial, a callable object's attributes, a lambda's closure or global
    names; torch's default device last. Modules on the meta device stand for a GPU's here."""
    meta = torch.device("meta")
    on_meta = Conv(device="meta")
    buffers_only = torch.nn.BatchNorm2d(3, affine=False, device="meta")
    for model in (on_meta, buffers_only, on_meta.forward, functools.partial(on_meta, t=None), Holder(on_meta),
                  lambda x, t: on_meta(x, t), lambda x, t: GLOBAL_NET(x, t), lambda x, t: Holder(on_meta)(x, t)):
        assert _device(None, None, model) == meta
    assert _device("cpu", None, on_meta) == torch.device("cpu")  # device= first
    assert _device(None, torch.zeros(1), on_meta) == torch.device("cpu")  # then x_T's
    with torch.device("meta"):  # nothing in reach: torch's default device
        assert _device(None, None, lambda x, t: x) == meta
    assert _device(None, None, lambda x, t: x) == torch.device("cpu")
    assert model_tensors(lambda x, t: x) == [] and model_tensors("not callable") == []


GLOBAL_NET = Conv(device="meta")


def test_a_lambda_around_a_module_samples_as_the_module():
    model = Conv()
    expected = sample(model, (2, 3, 6, 6), SCHEDULE, method="ddim", steps=4, progress=False,
                      generator=torch.Generator().manual_seed(0))
    wrapped = sample(lambda x, t: model(x, t), (2, 3, 6, 6), SCHEDULE, method="ddim", steps=4, progress=False,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(wrapped, expected)


def test_uint8_images_are_refused_with_the_scaling():
    with pytest.raises(TypeError, match=r"x0 must be float images scaled to \[-1, 1\], got uint8: pass "
                                        r"x0.float\(\) / 127.5 - 1"):
        DiffusionLoss(SCHEDULE)(Conv(), torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8))


def test_data_far_outside_minus_one_one_warns_once():
    loss_fn = DiffusionLoss(SCHEDULE)
    with pytest.warns(UserWarning, match=r"far outside \[-1, 1\]") as caught:
        for _ in range(3):
            loss_fn(Conv(), torch.rand(2, 3, 6, 6) * 255)
    assert len([w for w in caught if "far outside" in str(w.message)]) == 1


@pytest.mark.parametrize("call", ["loss", "elbo", "sample"])
def test_float64_data_and_a_float32_model_are_refused_before_the_model_runs(call):
    model = Conv()
    x0 = torch.rand(2, 3, 6, 6, dtype=torch.float64) * 2 - 1
    runs = {"loss": (lambda: DiffusionLoss(SCHEDULE)(model, x0), "x0 is torch.float64"),
            "elbo": (lambda: elbo_bpd(model, x0, SCHEDULE, timesteps=2, progress=False), "x0 is torch.float64"),
            "sample": (lambda: sample(model, (2, 3, 6, 6), SCHEDULE, dtype=torch.float64, progress=False),
                       "dtype is torch.float64")}
    run, match = runs[call]
    with pytest.raises(TypeError, match=f"{match} but the model's parameters are torch.float32"):
        run()
    assert model.calls == 0


def test_float64_runs_end_to_end_with_a_float64_model():
    model = Conv(dtype=torch.float64)
    x0 = torch.rand(2, 3, 6, 6, dtype=torch.float64) * 2 - 1
    loss = DiffusionLoss(SCHEDULE, prediction="v", weighting="min_snr")(model, x0)
    loss.backward()
    assert loss.dtype == torch.float64 and model.conv.weight.grad.dtype == torch.float64
    assert elbo_bpd(model, x0, SCHEDULE, timesteps=3, progress=False)["total_bpd"].dtype == torch.float64
    out = sample(model, (2, 3, 6, 6), SCHEDULE, method="ddim", steps=3, dtype=torch.float64, progress=False)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("options", [dict(prediction="v", weighting="min_snr"), dict(variance="learned_range"),
                                     dict(loss_type="kl")])
def test_backward_twice_with_retain_graph(backend, options):
    """The fused loss hands its precomputed gradient to the first backward and recomputes it for a
    second: both give the same gradient, on every backend."""
    channels = 6 if options.get("variance") == "learned_range" else 3
    model = Conv(out_channels=channels)
    x0 = torch.rand(2, 3, 6, 6) * 2 - 1
    with use_backend(backend):
        loss = DiffusionLoss(SCHEDULE, **options)(model, x0, generator=torch.Generator().manual_seed(0))
        loss.backward(retain_graph=True)
        first = model.conv.weight.grad.clone()
        loss.backward()
    assert first.abs().sum() > 0
    torch.testing.assert_close(model.conv.weight.grad, 2 * first, rtol=1e-6, atol=1e-9)


def test_state_dict_resumes_the_importance_sampler():
    schedule = NoiseSchedule.linear(10)
    model = Conv()
    loss_fn = DiffusionLoss(schedule, timestep_sampler=LossSecondMomentSampler(schedule, history_per_term=2))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        loss_fn(model, torch.rand(8, 3, 6, 6) * 2 - 1, generator=g)
    sampler = loss_fn.timestep_sampler
    assert bool(sampler.warmed_up())
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    buffer.seek(0)
    resumed = DiffusionLoss(schedule, timestep_sampler=LossSecondMomentSampler(schedule, history_per_term=2))
    assert not bool(resumed.timestep_sampler.warmed_up())
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert torch.equal(resumed.timestep_sampler.loss_history, sampler.loss_history)
    assert torch.equal(resumed.timestep_sampler.probabilities(), sampler.probabilities())
    draws = [fn.timestep_sampler.sample(16, generator=torch.Generator().manual_seed(1))[0] for fn in (loss_fn, resumed)]
    assert torch.equal(*draws)
    assert DiffusionLoss(schedule).state_dict() == {"_extra_state": None}

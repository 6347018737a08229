"""fastddpm against diffusers' DDPMPipeline and DDIMPipeline, step by step and end to end, given the
same model and noise; fastddpm.diffusers' schedulers inside those pipelines.

Precision: the fused DDPM step computes from float64 posterior tables, where DDPMScheduler.step
forms 1 - ab_t / ab_prev in float32 and loses three digits of beta near t = 0 (8e-5 per step at
k = 1000). Those steps are compared with diffusers' own step evaluated in float64; DDIM's fused
step reads float32 ab as diffusers does and is compared with diffusers' float32 step."""
import copy
import pickle
import subprocess
import sys

import pytest
import torch

from helpers import use_backend
from fastddpm import NoiseSchedule, sample

diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_ddpm as ddpm_module  # noqa: E402
import fastddpm.diffusers as FD  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from interop_models import TinyDenoiser, denoiser, tiny_unet  # noqa: E402

SHAPE = (2, 3, 8, 8)
PIPELINES = {"ddpm": (diffusers.DDPMPipeline, diffusers.DDPMScheduler, FD.DDPMScheduler),
             "ddim": (diffusers.DDIMPipeline, diffusers.DDIMScheduler, FD.DDIMScheduler)}


def three_ways(model, method, steps, **config):
    """(DDPMPipeline / DDIMPipeline, the same pipeline with fastddpm's scheduler, fastddpm.sample), all
    as the pipeline's output_type="pt" images, from generator seed 1."""
    pipeline_cls, scheduler_cls, ours_cls = PIPELINES[method]
    scheduler = scheduler_cls(**config)
    pipe = pipeline_cls(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=SHAPE[0], generator=torch.Generator().manual_seed(1), num_inference_steps=steps,
                  output_type="pt").images
    pipe.scheduler = ours_cls.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, ours_cls)
    in_pipeline = pipe(batch_size=SHAPE[0], generator=torch.Generator().manual_seed(1), num_inference_steps=steps,
                       output_type="pt").images
    x_T, noise_fn = FD.pipeline_noise(SHAPE, torch.Generator().manual_seed(1))
    ours = sample(model, SHAPE, NoiseSchedule.from_diffusers(scheduler), method=method, steps=steps, x_T=x_T,
                  noise_fn=noise_fn, progress=False)
    return theirs, in_pipeline, (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def assert_images_close(got, expected, atol):
    inside = ((expected > 0) & (expected < 1)).float().mean()
    assert inside > 0.9, "most pixels must lie inside (0, 1), where the comparison sees them"
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_sample_is_the_pipeline_in_50_steps(method, spacing, offset):
    theirs, in_pipeline, ours = three_ways(denoiser(), method, 50, timestep_spacing=spacing, steps_offset=offset)
    assert_images_close(ours, theirs.permute(0, 2, 3, 1), atol=1e-5)
    assert_images_close(ours, in_pipeline.permute(0, 2, 3, 1), atol=1e-6)  # the same fused steps


@pytest.mark.parametrize("method, config", [
    ("ddim", dict(prediction_type="v_prediction", set_alpha_to_one=False)),
    ("ddpm", dict(prediction_type="sample", variance_type="fixed_large", timestep_spacing="linspace")),
    ("ddpm", dict(thresholding=True, sample_max_value=float("inf"), timestep_spacing="trailing")),
])
def test_sample_is_the_pipeline_with_the_schedulers_options(method, config):
    theirs, in_pipeline, ours = three_ways(denoiser(), method, 20, **config)
    assert_images_close(ours, theirs.permute(0, 2, 3, 1), atol=1e-5)
    assert_images_close(ours, in_pipeline.permute(0, 2, 3, 1), atol=1e-6)


@torch.no_grad()
def float64_ddpm_pipeline(model, steps, monkeypatch):
    """DDPMPipeline's loop with DDPMScheduler.step in float64 (its tables and the model in float64, the
    noise drawn in float32 as the float32 pipeline draws it): the exact value of the pipeline."""
    monkeypatch.setattr(ddpm_module, "randn_tensor",
                        lambda shape, generator=None, device=None, dtype=None: randn_tensor(
                            shape, generator=generator, device=device, dtype=torch.float32).to(dtype))
    scheduler = diffusers.DDPMScheduler()
    scheduler.set_timesteps(steps)
    scheduler.alphas_cumprod, scheduler.one = scheduler.alphas_cumprod.double(), scheduler.one.double()
    model = copy.deepcopy(model).double()
    generator = torch.Generator().manual_seed(1)
    x = randn_tensor(SHAPE, generator=generator, dtype=torch.float32).double()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sample_is_the_pipeline_in_1000_steps(method, monkeypatch):
    torch.manual_seed(0)
    model = TinyDenoiser()
    theirs, in_pipeline, ours = three_ways(model, method, 1000)
    assert_images_close(ours, in_pipeline.permute(0, 2, 3, 1), atol=1e-6)
    if method == "ddim":
        assert_images_close(ours, theirs.permute(0, 2, 3, 1), atol=1e-5)
        return
    # DDPMScheduler's float32 steps drift 1e-5 … 3e-5 from their float64 value over 1000 steps; ours do not
    assert_images_close(ours, theirs.permute(0, 2, 3, 1), atol=3e-5)
    exact = float64_ddpm_pipeline(model, 1000, monkeypatch).permute(0, 2, 3, 1)
    assert_images_close(ours.double(), exact, atol=1e-5)


def test_pipeline_noise_takes_a_generator_per_sample():
    model = denoiser()
    pipe = diffusers.DDPMPipeline(model, diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    seeds = [5, 6]
    theirs = pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=10,
                  output_type="pt").images.permute(0, 2, 3, 1)
    x_T, noise_fn = FD.pipeline_noise(SHAPE, [torch.Generator().manual_seed(s) for s in seeds])
    ours = sample(model, SHAPE, NoiseSchedule.from_diffusers(pipe.scheduler), method="ddpm", steps=10, x_T=x_T,
                  noise_fn=noise_fn, progress=False)
    assert_images_close((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), theirs, atol=1e-5)


def in_float64(scheduler):
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.final_alpha_cumprod = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", 1.0)).double()
    return scheduler


STEP_CONFIGS = [
    dict(), dict(prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(prediction_type="sample", clip_sample=False, timestep_spacing="linspace"),
    dict(thresholding=True, sample_max_value=float("inf")), dict(steps_offset=1),
]


@pytest.mark.parametrize("method, config", [("ddpm", c) for c in STEP_CONFIGS + [
    dict(variance_type="fixed_large", timestep_spacing="trailing"), dict(variance_type="learned_range")]] + [
    ("ddim", c) for c in STEP_CONFIGS + [dict(set_alpha_to_one=False)]])
@pytest.mark.parametrize("steps", [50, 1000])
def test_scheduler_steps_are_diffusers(method, config, steps, monkeypatch):
    if steps == 1000 and config.get("steps_offset"):
        pytest.skip("leading spacing with steps_offset=1 reaches t = 1000 at k = 1000, in diffusers too")
    _, scheduler_cls, ours_cls = PIPELINES[method]
    theirs, ours = scheduler_cls(**config), ours_cls(**config)
    if method == "ddpm":  # compared with DDPMScheduler.step in float64, given float32 noise
        theirs = in_float64(theirs)
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda shape, generator=None, device=None, dtype=None:
                            randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype))
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(steps)
    assert torch.equal(theirs.timesteps, ours.timesteps)
    channels = 6 if config.get("variance_type") == "learned_range" else 3
    kwargs = dict(eta=0.5, use_clipped_model_output=True) if method == "ddim" else {}
    timesteps = theirs.timesteps if steps == 50 else torch.cat([theirs.timesteps[:-20:13], theirs.timesteps[-20:]])
    g = torch.Generator().manual_seed(0)
    for t in timesteps:
        x, out = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, channels, 5, 5, generator=g) * 2
        expected = theirs.step(out.to(theirs.alphas_cumprod.dtype), t, x.to(theirs.alphas_cumprod.dtype),
                               generator=torch.Generator().manual_seed(int(t)), **kwargs)
        got = ours.step(out, t, x, generator=torch.Generator().manual_seed(int(t)), **kwargs)
        assert got.prev_sample.dtype == torch.float32
        torch.testing.assert_close(got.prev_sample.double(), expected.prev_sample.double(), rtol=0, atol=1e-5)
        # x0_hat = (x_t - sqrt(1 - ab) out) / sqrt(ab): float32 rounds terms of size |x_t| / sqrt(ab)
        terms = float((x.abs().max() + out.abs().max()) / theirs.alphas_cumprod[t].sqrt())
        torch.testing.assert_close(got.pred_original_sample.double(), expected.pred_original_sample.double(),
                                   rtol=0, atol=max(1e-5, 2.5e-7 * terms))


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_scheduler_steps_on_the_kernels(method, triton_backend):
    _, scheduler_cls, ours_cls = PIPELINES[method]
    theirs, ours = scheduler_cls(prediction_type="v_prediction"), ours_cls(prediction_type="v_prediction")
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(20)
    kwargs = dict(eta=1.0) if method == "ddim" else {}
    g = torch.Generator().manual_seed(0)
    for t in theirs.timesteps[::6]:
        x, out = torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 3, 5, 7, generator=g)
        expected = theirs.step(out, t, x, generator=torch.Generator().manual_seed(int(t)), **kwargs).prev_sample
        got = ours.step(out, t, x, generator=torch.Generator().manual_seed(int(t)), **kwargs).prev_sample
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method, config, out_channels", [
    ("ddpm", dict(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5), 3),
    ("ddim", dict(clip_sample_range=2.0), 3),
    ("ddpm", dict(variance_type="learned"), 6),
    ("ddpm", dict(variance_type="fixed_large", timestep_spacing="trailing"), 3),  # noise at the last t > 0
])
def test_options_the_ops_lack_run_diffusers_own_step(method, config, out_channels):
    _, scheduler_cls, ours_cls = PIPELINES[method]
    theirs, ours = scheduler_cls(**config), ours_cls(**config)
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(10)
    t = theirs.timesteps[-1 if config.get("variance_type") == "fixed_large" else 2]
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, out_channels, 4, 4) * 3
    expected = theirs.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    got = ours.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)  # "learned": sqrt of the output


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_add_noise_is_diffusers(dtype, atol):
    theirs, ours = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"), FD.DDIMScheduler(
        beta_schedule="squaredcos_cap_v2")
    x0, noise = torch.randn(4, 3, 5, 5).to(dtype), torch.randn(4, 3, 5, 5).to(dtype)
    for t in (torch.tensor([0, 7, 500, 999]), torch.tensor(321), 321):
        exact = theirs.add_noise(x0.double(), noise.double(), torch.as_tensor(t))
        got = ours.add_noise(x0, noise, t)
        assert got.dtype == dtype and got.shape == x0.shape
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=atol)


def test_config_round_trip_pickle_and_saved_pipelines(tmp_path):
    pipe = diffusers.DDPMPipeline(tiny_unet(), diffusers.DDPMScheduler(prediction_type="v_prediction", steps_offset=1))
    ours = FD.DDPMScheduler.from_config(pipe.scheduler.config)
    assert isinstance(ours, diffusers.DDPMScheduler) and dict(ours.config) == dict(pipe.scheduler.config)
    ours.save_config(tmp_path / "scheduler")
    for cls in (diffusers.DDPMScheduler, FD.DDPMScheduler, FD.DDIMScheduler):
        loaded = cls.from_pretrained(tmp_path / "scheduler")
        assert type(loaded) is cls and loaded.config.prediction_type == "v_prediction" and loaded.config.steps_offset == 1
    copied = pickle.loads(pickle.dumps(ours))
    assert type(copied) is FD.DDPMScheduler and torch.equal(copied.alphas_cumprod, ours.alphas_cumprod)
    x = torch.randn(1, 3, 8, 8)
    assert ours.scale_model_input(x, 10) is x
    # a pipeline saved with fastddpm's scheduler records it, and diffusers loads it back
    pipe.scheduler = ours
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.scheduler) is FD.DDPMScheduler and loaded.scheduler.config.prediction_type == "v_prediction"


def test_ddim_pipeline_keeps_a_scheduler_assigned_after_it_is_built():
    pipe = diffusers.DDIMPipeline(denoiser(), FD.DDIMScheduler())
    assert type(pipe.scheduler) is diffusers.DDIMScheduler  # DDIMPipeline.__init__ converts its argument
    pipe.scheduler = FD.DDIMScheduler.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is FD.DDIMScheduler


def test_diffusers_is_imported_on_first_use_only():
    code = "import sys, fastddpm, fastddpm.diffusers; assert 'diffusers' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(AttributeError, match="has no attribute 'PNDMScheduler'"):
        FD.PNDMScheduler  # noqa: B018


@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_noise_fn_replaces_the_kernels_noise(method, eta, triton_backend):
    """On the kernels too, the steps add noise_fn's noise (here the pipeline's), not Philox noise."""
    model = denoiser()
    schedule = NoiseSchedule.from_diffusers(PIPELINES[method][1]())
    runs = []
    for backend in ("triton", "torch"):
        with use_backend(backend):
            x_T, noise_fn = FD.pipeline_noise(SHAPE, torch.Generator().manual_seed(1))
            runs.append(sample(model, SHAPE, schedule, method=method, steps=8, eta=eta, x_T=x_T, noise_fn=noise_fn,
                               progress=False))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-5)

"""fastddpm inside diffusers: schedulers that a diffusers pipeline takes in place of its own, stepping
with fastddpm's fused ops, and the noise of diffusers' pipelines for `fastddpm.sample`.

    pipe.scheduler = fastddpm.diffusers.DDPMScheduler.from_config(pipe.scheduler.config)

`DDPMScheduler` and `DDIMScheduler` subclass diffusers' classes of those names: the same config,
set_timesteps, previous_timestep, scale_model_input, save_config / from_config round trip;
`step` and `add_noise` run fastddpm's fused ops: DDPM `functional.p_sample_step` in the schedule
respaced to the scheduler's timesteps (improved-diffusion's SpacedDiffusion: the same posterior
from t to the next timestep), DDIM `functional.ddim_step`, add_noise `functional.q_sample`. They
compute in float32 from float64 tables where diffusers computes in float32 throughout; see
docs/interop.md for how far apart that puts them. What the fused ops do not do is left to diffusers'
own step: DDPM's variance types "learned" and "fixed_large_log", fixed_large and learned_range at a
last timestep > 0 (diffusers adds noise there), thresholding other than plain clipping
(sample_max_value 1) or Imagen's (ratio 0.995, no cap), clip_sample_range other than 1.

diffusers is imported on first use of these names, not when fastddpm is.
"""
import warnings

import torch

from . import functional as F
from . import timesteps as TS
from .options import PREDICTIONS, canonical_prediction
from .respace import respace
from .diffusers_config import DIFFUSERS_VARIANCES, diffusers_clip
from .schedule import NoiseSchedule

__all__ = ["DDPMScheduler", "DDIMScheduler", "pipeline_noise"]


def pipeline_noise(shape, generator=None, *, device="cpu", dtype=torch.float32):
    """(x_T, noise_fn) drawn from `generator` as DDPMPipeline and DDIMPipeline draw them: x_T by
    `randn_tensor(shape, generator, device, dtype)`, then one tensor of x's shape, device and dtype
    at each call of noise_fn(k, x), which `fastddpm.sample` makes where the scheduler's step draws
    (DDPM where t > 0, DDIM with eta > 0). `generator`: a torch.Generator, a list of one per sample,
    or None, as the pipelines take it. Use as `sample(..., x_T=x_T, noise_fn=noise_fn)`."""
    from diffusers.utils.torch_utils import randn_tensor

    x_T = randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)

    def noise_fn(k, x):
        return randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    return x_T, noise_fn


def fused_options(config):
    """(prediction, clip_denoised) of fastddpm's ops for a DDPM / DDIM scheduler config, or None where
    the config asks for what they do not do (then diffusers' own step runs)."""
    prediction = canonical_prediction(config.prediction_type)
    clip, difference = diffusers_clip(config)
    if prediction not in PREDICTIONS or difference is not None:
        return None
    return prediction, False if clip is None else clip


class _Fused:
    """What both schedulers share: the NoiseSchedule of their alphas_cumprod and the fused add_noise."""

    def fastddpm_schedule(self):
        """The NoiseSchedule of this scheduler's alphas_cumprod (fixed at init), built once."""
        schedule = self.__dict__.get("_fastddpm_schedule")
        if schedule is None:
            with warnings.catch_warnings():  # options the ops lack send `step` to diffusers' own: no warning
                warnings.simplefilter("ignore")
                schedule = self._fastddpm_schedule = NoiseSchedule.from_diffusers(self)
        return schedule

    def add_noise(self, original_samples, noise, timesteps):
        """sqrt(ab_t) x0 + sqrt(1 - ab_t) noise by `functional.q_sample` (one fused pass on the kernels)."""
        t = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1).long()
        if t.numel() == 1:
            t = t.expand(original_samples.shape[0])
        return F.q_sample(original_samples, t.contiguous(), noise, self.fastddpm_schedule())


def _timesteps(value, like):
    return torch.full((like.shape[0],), int(value), dtype=torch.long, device=like.device)


class _DDPMStep(_Fused):
    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.__dict__.pop("_fastddpm_spaced", None)

    def fastddpm_spaced(self):
        """(schedule, {timestep: index}) of the steps: before set_timesteps the whole schedule, after
        it the schedule respaced to `timesteps` (DDPMScheduler steps from each to the next)."""
        spaced = self.__dict__.get("_fastddpm_spaced")
        if spaced is None:
            schedule = self.fastddpm_schedule()
            kept = range(schedule.num_timesteps)
            if self.custom_timesteps or self.num_inference_steps:
                kept = sorted(int(t) for t in self.timesteps)
                schedule = respace(schedule, kept)[0] if len(kept) > 1 else None
            spaced = self._fastddpm_spaced = (schedule, {t: i for i, t in enumerate(kept)})
        return spaced

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """DDPMScheduler.step by `functional.p_sample_step` in the respaced schedule."""
        from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
        from diffusers.utils.torch_utils import randn_tensor

        options, variance = fused_options(self.config), DIFFUSERS_VARIANCES.get(self.variance_type)
        schedule, index = self.fastddpm_spaced()
        t = int(timestep)
        # diffusers adds noise at a last timestep > 0 too: exp(log variance / 2) with the posterior variance
        # clamped at 1e-20 (nothing for fixed_small, but not so for fixed_large and learned_range)
        noisy_last = index.get(t) == 0 and t > 0 and variance != "fixed_small"
        if options is None or variance is None or schedule is None or t not in index or noisy_last:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        # drawn where and as diffusers draws (t > 0; the shape of the mean half of a learned_range
        # output), so a shared generator stays in step with DDPMPipeline's
        noise = randn_tensor(sample.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype) if t > 0 else torch.zeros_like(sample)
        prev_sample, x0_hat = F.p_sample_step(model_output, sample, _timesteps(index[t], sample), schedule, noise=noise,
                                              prediction=options[0], variance=variance, clip_denoised=options[1],
                                              return_x0_hat=True)
        if not return_dict:
            return prev_sample, x0_hat
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_hat)


class _DDIMStep(_Fused):
    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        """DDIMScheduler.step by `functional.ddim_step` from t to t - T // num_inference_steps."""
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
        from diffusers.utils.torch_utils import randn_tensor

        options = fused_options(self.config)
        if options is None or self.num_inference_steps is None or (eta > 0 and variance_noise is not None
                                                                   and generator is not None):
            return super().step(model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                                generator=generator, variance_noise=variance_noise, return_dict=return_dict)
        t = _timesteps(timestep, sample)
        prev_t = TS.ddim_prev_timesteps(t, self.config.num_train_timesteps, self.num_inference_steps,
                                        self.config.set_alpha_to_one)
        noise = None
        if eta > 0:
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample, x0_hat = F.ddim_step(model_output, sample, t, prev_t, self.fastddpm_schedule(), eta=float(eta), noise=noise,
                                          prediction=options[0], clip_denoised=options[1], return_x0_hat=True,
                                          use_clipped_model_output=bool(use_clipped_model_output))
        if not return_dict:
            return prev_sample, x0_hat
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_hat)


_MIXINS = {"DDPMScheduler": _DDPMStep, "DDIMScheduler": _DDIMStep}


def __getattr__(name):
    """DDPMScheduler and DDIMScheduler, built (and diffusers imported) on first access; and diffusers'
    SchedulerMixin, which diffusers looks up in the library a saved pipeline names for its scheduler
    (this module), to find how to load it."""
    if name not in _MIXINS and name != "SchedulerMixin":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import diffusers

    base = getattr(diffusers, name)
    if name == "SchedulerMixin":
        return base
    cls = type(name, (_MIXINS[name], base), {
        "__module__": __name__, "__qualname__": name,
        "__doc__": f"diffusers' {name}, stepping with fastddpm's fused ops (see fastddpm.diffusers)."})
    globals()[name] = cls
    return cls

"""What a diffusers scheduler's config asks of fastddpm's options: its prediction, clipping or
thresholding, variance, timestep spacing and offset (`NoiseSchedule.from_diffusers` keeps them as
the schedule's defaults; `fastddpm.diffusers` steps with the fused ops where they are exact)."""
import math
import warnings

from .options import DYNAMIC_THRESHOLD_PERCENTILE, PREDICTIONS, SPACINGS, canonical_prediction

# diffusers' variance_type -> ours; fixed_small_log is fixed_small's standard deviation through its log.
DIFFUSERS_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                       "learned_range": "learned_range"}


def diffusers_clip(config):
    """(clip_denoised, None) for a diffusers config's thresholding or clip_sample (clip_denoised None
    where it sets neither), or (the nearest clip_denoised, what fastddpm does differently) where no
    option equals it: see `diffusers_defaults`."""
    if config.get("thresholding", False):
        ratio, cap = config.get("dynamic_thresholding_ratio", 0.995), config.get("sample_max_value", 1.0)
        if cap == 1.0:  # the threshold clamped to [1, 1]: plain clipping
            return True, None
        if ratio == DYNAMIC_THRESHOLD_PERCENTILE and cap == math.inf:
            return "dynamic", None
        return "dynamic", (f"thresholding with dynamic_thresholding_ratio={ratio}, sample_max_value={cap} is read as "
                           f"clip_denoised='dynamic', whose ratio is {DYNAMIC_THRESHOLD_PERCENTILE} and whose "
                           "threshold has no cap")
    if "clip_sample" not in config:
        return None, None
    clip_range = config.get("clip_sample_range", 1.0)
    if config["clip_sample"] and clip_range != 1.0:
        return False, (f"clip_sample_range={clip_range}: fastddpm clips x0_hat to [-1, 1] only, so the default "
                       "is clip_denoised=False")
    return bool(config["clip_sample"]), None


def diffusers_defaults(config):
    """The fastddpm options a diffusers scheduler config sets, with a warning for what has no equal here.

    Thresholding (Imagen's: s = clamp(quantile(|x0_hat|, dynamic_thresholding_ratio), 1,
    sample_max_value), x0_hat = clamp(x0_hat, -s, s) / s) is clip_denoised="dynamic" when the ratio
    is 0.995 and sample_max_value infinite, and plain clipping (True) when sample_max_value is 1;
    other values are read as "dynamic" with a warning (the ratio is 0.995 and s has no cap here).
    clip_sample_range other than 1 has no equal (fastddpm clips to [-1, 1]): clip_denoised=False,
    with a warning. variance_type "learned" and "fixed_large_log" have none either (a warning; the
    variance is left to each caller's default).
    """
    defaults = {"use_clipped_model_output": False}  # DDIMPipeline's default (eps from the model, not the clip)
    if "prediction_type" in config:
        prediction = canonical_prediction(config["prediction_type"])
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction_type {config['prediction_type']!r} has no fastddpm equal")
        defaults["prediction"] = prediction
    clip, difference = diffusers_clip(config)
    if clip is not None:
        defaults["clip_denoised"] = clip
    if difference is not None:
        warnings.warn(difference, stacklevel=3)
    variance = config.get("variance_type")
    if variance in DIFFUSERS_VARIANCES:
        defaults["variance"] = DIFFUSERS_VARIANCES[variance]
    elif variance is not None:
        warnings.warn(f"variance_type {variance!r} has no fastddpm equal: pass variance= where it matters",
                      stacklevel=3)
    if config.get("timestep_spacing") in SPACINGS:
        defaults["spacing"] = config["timestep_spacing"]
    for name in ("steps_offset", "set_alpha_to_one"):
        if name in config:
            defaults[name] = config[name]
    return defaults

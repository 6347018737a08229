"""Argument checks and seeds shared by the functional ops: clear errors naming the argument."""
import torch

from fastddpm._checks import check_choice, check_float, check_generator, check_like, check_schedule, check_timesteps
from fastddpm.backend import use_triton
from fastddpm.options import CLIP_OPTIONS, REDUCTIONS, VARIANCES, WEIGHTINGS


def check_reverse(model_output, x_t, t, schedule, variance, clip_denoised):
    """The reverse-process ops' arguments (the prediction: `check_prediction`); returns (t, whether the
    Triton kernels run)."""
    check_schedule(schedule)
    check_float(x_t, "x_t")
    check_choice(clip_denoised, "clip_denoised", CLIP_OPTIONS)
    channels = x_t.shape[1]
    if variance is None:  # DDIM: the variance half of a learned-range output is ignored
        out_channels = model_output.shape[1] if isinstance(model_output, torch.Tensor) and model_output.ndim > 1 else 0
        if out_channels not in (channels, 2 * channels):
            raise ValueError(f"model_output must have {channels} (or {2 * channels}) channels, got {out_channels}")
        check_like(model_output, "model_output", x_t, "x_t", (x_t.shape[0], out_channels, *x_t.shape[2:]))
    else:
        check_choice(variance, "variance", VARIANCES)
        out_channels = 2 * channels if variance == "learned_range" else channels
        if out_channels == channels and getattr(model_output, "shape", (0, 0))[1:2] == (2 * channels,):
            raise ValueError(f"model_output has {2 * channels} channels, twice x_t's {channels}: a model that "
                             f"learns its variance (improved-diffusion's learn_sigma) needs "
                             f"variance='learned_range', got {variance!r}")
        check_like(model_output, "model_output", x_t, "x_t", (x_t.shape[0], out_channels, *x_t.shape[2:]))
    triton_path = use_triton(x_t)
    return check_timesteps(t, "t", x_t, schedule, values=not triton_path), triton_path


def check_noise(noise, generator, x_t):
    check_generator(generator)
    if noise is not None:
        check_like(noise, "noise", x_t, "x_t")


def check_drawn_seed(seed, noise, like, triton_path):
    """`seed` picks the kernels' Philox stream for noise they draw: only without noise, on the kernels."""
    if seed is None:
        return None
    seed = check_seed(seed, like)
    if noise is not None or not triton_path:
        raise ValueError("seed selects the kernels' Philox stream for drawn noise: pass it without noise, "
                         "on the Triton backend (the reference draws with generator=)")
    return seed


def check_noise_or_seed(noise, seed, x0, triton_path):
    """The losses' noise: a tensor like x0, or q_sample's seed to regenerate it in the kernel."""
    if noise is None and seed is None:
        raise ValueError("noise is None: pass exactly one of noise (a tensor like x0) and seed (the 1-element int64 "
                         "seed given to q_sample, to regenerate its noise)")
    if noise is not None and seed is not None:
        raise ValueError("pass exactly one of noise and seed: either noise or seed (to regenerate q_sample's noise), "
                         "not both")
    if noise is not None:
        check_like(noise, "noise", x0, "x0")
        return None
    seed = check_seed(seed, x0)
    if not triton_path:
        raise ValueError("seed= regenerates the noise of q_sample's Triton kernel and needs the triton backend; "
                         "on the reference backend pass noise (q_sample(..., return_noise=True) returns it)")
    return seed


def check_seed(seed, like):
    """A Philox seed: a 1-element int64 tensor on like's device."""
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"seed must be a 1-element int64 tensor, got {getattr(seed, 'dtype', type(seed).__name__)}")
    if seed.device != like.device:
        raise ValueError(f"seed is on {seed.device} but the data is on {like.device}")
    return seed.reshape(1)


def check_loss_options(schedule, weighting, reduction):
    check_choice(reduction, "reduction", REDUCTIONS)
    if isinstance(weighting, torch.Tensor):
        if weighting.numel() != schedule.num_timesteps:
            raise ValueError(f"weighting tensor must have length T={schedule.num_timesteps}, got {weighting.numel()}")
    else:
        check_choice(weighting, "weighting", WEIGHTINGS)

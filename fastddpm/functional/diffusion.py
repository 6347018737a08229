"""The forward process and the reverse steps (docs/math.md sections 3-4)."""
import torch

from fastddpm import reference, torch_ops
from fastddpm._checks import (check_bool, check_eta, check_float, check_generator, check_like, check_prediction,
                              check_schedule, check_timesteps, draw_seed)
from fastddpm.backend import use_triton
from fastddpm.kernels import posterior as posterior_kernel
from fastddpm.kernels import q_sample as q_sample_kernel

from ._args import check_drawn_seed, check_noise, check_reverse


def q_sample(x0, t, noise, schedule, *, generator=None, seed=None, return_noise=False):
    """x_t = sqrt_ab[t] x0 + sqrt_1m_ab[t] noise.

    `noise=None` draws N(0, I) noise (inside the kernel, from a Philox `seed` drawn from
    `generator`, never written to memory unless `return_noise=True`, which returns
    (x_t, noise)). Pass `seed` (a 1-element int64 tensor) to draw a known stream again (Triton
    backend; the reference draws with `generator`).
    """
    check_schedule(schedule)
    check_float(x0, "x0")
    if noise is not None:
        check_like(noise, "noise", x0, "x0")
    check_generator(generator)
    triton_path = use_triton(x0)
    t = check_timesteps(t, "t", x0, schedule, values=not triton_path)
    seed = check_drawn_seed(seed, noise, x0, triton_path)
    if not triton_path:
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        ops = reference if x0.dtype == torch.float64 else torch_ops
        x_t = ops.q_sample(x0, t, noise, schedule)
        return (x_t, noise) if return_noise else x_t
    if noise is None and seed is None:
        seed = draw_seed(x0.device, generator)
    x_t, drawn = q_sample_kernel.q_sample(x0, t, noise, schedule.kernel_table(x0.device), seed,
                                          store_noise=return_noise)
    if return_noise:
        return x_t, (drawn if noise is None else noise)
    return x_t


def q_posterior(x0, x_t, t, schedule):
    """Mean, variance and log variance of q(x_{t-1} | x_t, x0); the variances are (B, 1, …, 1)."""
    check_schedule(schedule)
    check_float(x_t, "x_t")
    check_like(x0, "x0", x_t, "x_t")
    triton_path = use_triton(x_t)
    t = check_timesteps(t, "t", x_t, schedule, values=not triton_path)
    if triton_path:
        device = x_t.device
        return posterior_kernel.q_posterior(x0, x_t, t, schedule.kernel_table(device),
                                            schedule.prediction_table("x0", device))
    return reference.q_posterior(x0, x_t, t, schedule)


def p_mean_variance(model_output, x_t, t, schedule, *, prediction="eps", variance="fixed_small", clip_denoised=False):
    """(mean, variance, log_variance, x0_hat) of p(x_{t-1} | x_t); with variance="learned_range"
    the model output has 2C channels. clip_denoised: False, True (clip x0_hat to [-1, 1]) or "dynamic"."""
    prediction = check_prediction(prediction)
    t, triton_path = check_reverse(model_output, x_t, t, schedule, variance, clip_denoised)
    if triton_path:
        return posterior_kernel.p_mean_variance(model_output, x_t, t, *_tables(schedule, prediction, x_t),
                                                variance=variance, clip_denoised=clip_denoised)
    return reference.p_mean_variance(model_output, x_t, t, schedule, prediction=prediction, variance=variance,
                                     clip_denoised=clip_denoised)


def p_sample_step(model_output, x_t, t, schedule, *, noise=None, generator=None, prediction="eps",
                  variance="fixed_small", clip_denoised=False, seed=None, return_x0_hat=False):
    """One ancestral step x_t -> x_{t-1} (no noise where t = 0).

    `noise=None` draws z inside the kernel from a Philox `seed` (a 1-element int64 tensor; drawn
    from `generator` when not given; the reference backend draws with `generator` and rejects
    `seed`). `return_x0_hat=True` returns (x_{t-1}, x0_hat), x0_hat as used for the mean.
    """
    prediction = check_prediction(prediction)
    t, triton_path = check_reverse(model_output, x_t, t, schedule, variance, clip_denoised)
    check_noise(noise, generator, x_t)
    seed = check_drawn_seed(seed, noise, x_t, triton_path)
    options = dict(prediction=prediction, variance=variance, clip_denoised=clip_denoised,
                   return_x0_hat=return_x0_hat)
    if triton_path:
        if noise is None and seed is None:
            seed = draw_seed(x_t.device, generator)
        options.pop("prediction")
        return posterior_kernel.p_sample_step(model_output, x_t, t, *_tables(schedule, prediction, x_t), noise, seed,
                                              **options)
    if x_t.dtype != torch.float64:
        return torch_ops.p_sample_step(model_output, x_t, t, schedule, noise=noise, generator=generator, **options)
    options.pop("return_x0_hat")
    x_prev = reference.p_sample_step(model_output, x_t, t, schedule, noise=noise, generator=generator, **options)
    if not return_x0_hat:
        return x_prev
    return x_prev, reference.p_mean_variance(model_output, x_t, t, schedule, **options)[3]


def ddim_step(model_output, x_t, t, t_prev, schedule, *, eta=0.0, noise=None, generator=None, prediction="eps",
              clip_denoised=False, seed=None, return_x0_hat=False, use_clipped_model_output=True):
    """One DDIM step from t to t_prev (t_prev = -1: the final step to x0).

    `seed` and `return_x0_hat` as in `p_sample_step` (noise is drawn only for eta > 0). With a
    clipped x0_hat, eps_hat follows it (improved-diffusion; diffusers' use_clipped_model_output=True)
    unless use_clipped_model_output=False, which keeps the model's own eps (DDIMPipeline's default).
    """
    prediction = check_prediction(prediction)
    t, triton_path = check_reverse(model_output, x_t, t, schedule, None, clip_denoised)
    t_prev = check_timesteps(t_prev, "t_prev", x_t, schedule, allow_minus_one=True, values=not triton_path)
    check_eta(eta)
    check_bool(use_clipped_model_output, "use_clipped_model_output")
    check_noise(noise, generator, x_t)
    seed = check_drawn_seed(seed, noise, x_t, triton_path)
    options = dict(eta=eta, prediction=prediction, clip_denoised=clip_denoised, return_x0_hat=return_x0_hat,
                   use_clipped_model_output=use_clipped_model_output)
    if triton_path:
        if noise is None and seed is None and eta != 0:
            seed = draw_seed(x_t.device, generator)
        options.pop("prediction")
        return posterior_kernel.ddim_step(model_output, x_t, t, t_prev, *_tables(schedule, prediction, x_t), noise,
                                          seed, **options)
    if x_t.dtype != torch.float64:
        return torch_ops.ddim_step(model_output, x_t, t, t_prev, schedule, noise=noise, generator=generator, **options)
    options.pop("return_x0_hat")
    x_prev = reference.ddim_step(model_output, x_t, t, t_prev, schedule, noise=noise, generator=generator, **options)
    if not return_x0_hat:
        return x_prev
    x0_hat, _ = reference.x0_eps_from_output(model_output[:, :x_t.shape[1]], x_t, t, schedule, prediction,
                                             clip_denoised)
    return x_prev, x0_hat.to(x_t.dtype)


def _tables(schedule, prediction, like):
    """The schedule's float32 kernel table and `prediction`'s table on like's device."""
    return schedule.kernel_table(like.device), schedule.prediction_table(prediction, like.device)

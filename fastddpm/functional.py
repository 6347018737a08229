"""fastddpm.functional: the DDPM ops in the style of torch.nn.functional.

Tensors first, the schedule next, options keyword-only. `t` is an int64 tensor of shape
(B,): a timestep per sample. Each op validates its arguments, then runs a fused Triton
kernel (see fastddpm.backend) or the reference of fastddpm.reference.
"""
import torch

from . import reference
from ._checks import (check_choice, check_float, check_generator, check_like, check_schedule, check_timesteps,
                      draw_seed)
from .backend import use_triton
from .kernels import hybrid as hybrid_kernel
from .kernels import loss as loss_kernel
from .kernels import posterior as posterior_kernel
from .kernels import q_sample as q_sample_kernel
from .kernels import vlb as vlb_kernel
from .options import CLIP_OPTIONS, LOSS_TYPES, PREDICTIONS, REDUCTIONS, VARIANCES, WEIGHTINGS


__all__ = ["q_sample", "q_posterior", "p_mean_variance", "p_sample_step", "ddim_step", "diffusion_loss",
           "normal_kl", "discretized_gaussian_log_likelihood", "vb_terms_bpd", "prior_bpd", "hybrid_loss", "elbo_bpd"]


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
    seed = _check_drawn_seed(seed, noise, x0, triton_path)
    if not triton_path:
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = reference.q_sample(x0, t, noise, schedule)
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
        return posterior_kernel.q_posterior(x0, x_t, t, schedule.kernel_table(x_t.device))
    return reference.q_posterior(x0, x_t, t, schedule)


def p_mean_variance(model_output, x_t, t, schedule, *, prediction="eps", variance="fixed_small", clip_denoised=False):
    """(mean, variance, log_variance, x0_hat) of p(x_{t-1} | x_t); with variance="learned_range"
    the model output has 2C channels. clip_denoised: False, True (clip x0_hat to [-1, 1]) or "dynamic"."""
    t, triton_path = _check_reverse(model_output, x_t, t, schedule, prediction, variance, clip_denoised)
    options = dict(prediction=prediction, variance=variance, clip_denoised=clip_denoised)
    if triton_path:
        return posterior_kernel.p_mean_variance(model_output, x_t, t, schedule.kernel_table(x_t.device), **options)
    return reference.p_mean_variance(model_output, x_t, t, schedule, **options)


def p_sample_step(model_output, x_t, t, schedule, *, noise=None, generator=None, prediction="eps",
                  variance="fixed_small", clip_denoised=False, seed=None, return_x0_hat=False):
    """One ancestral step x_t -> x_{t-1} (no noise where t = 0).

    `noise=None` draws z inside the kernel from a Philox `seed` (a 1-element int64 tensor; drawn
    from `generator` when not given; the reference backend draws with `generator` and rejects
    `seed`). `return_x0_hat=True` returns (x_{t-1}, x0_hat), x0_hat as used for the mean.
    """
    t, triton_path = _check_reverse(model_output, x_t, t, schedule, prediction, variance, clip_denoised)
    _check_noise(noise, generator, x_t)
    seed = _check_drawn_seed(seed, noise, x_t, triton_path)
    options = dict(prediction=prediction, variance=variance, clip_denoised=clip_denoised,
                   return_x0_hat=return_x0_hat)
    if triton_path:
        if noise is None and seed is None:
            seed = draw_seed(x_t.device, generator)
        return posterior_kernel.p_sample_step(model_output, x_t, t, schedule.kernel_table(x_t.device), noise, seed,
                                              **options)
    from fastddpm.sampling import eager_p_sample_step  # the reference's math in fewer memory passes
    return eager_p_sample_step(model_output, x_t, t, schedule, noise=noise, generator=generator, **options)


def ddim_step(model_output, x_t, t, t_prev, schedule, *, eta=0.0, noise=None, generator=None, prediction="eps",
              clip_denoised=False, seed=None, return_x0_hat=False):
    """One DDIM step from t to t_prev (t_prev = -1: the final step to x0).

    `seed` and `return_x0_hat` as in `p_sample_step` (noise is drawn only for eta > 0).
    """
    t, triton_path = _check_reverse(model_output, x_t, t, schedule, prediction, None, clip_denoised)
    t_prev = check_timesteps(t_prev, "t_prev", x_t, schedule, allow_minus_one=True, values=not triton_path)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")
    _check_noise(noise, generator, x_t)
    seed = _check_drawn_seed(seed, noise, x_t, triton_path)
    options = dict(eta=eta, prediction=prediction, clip_denoised=clip_denoised, return_x0_hat=return_x0_hat)
    if triton_path:
        if noise is None and seed is None and eta != 0:
            seed = draw_seed(x_t.device, generator)
        return posterior_kernel.ddim_step(model_output, x_t, t, t_prev, schedule.kernel_table(x_t.device), noise,
                                          seed, **options)
    from fastddpm.sampling import eager_ddim_step  # the reference's math in fewer memory passes
    return eager_ddim_step(model_output, x_t, t, t_prev, schedule, noise=noise, generator=generator, **options)


def diffusion_loss(model_output, x0, noise, t, schedule, *, prediction="eps", weighting="simple", gamma=5.0,
                   reduction="mean", seed=None):
    """The weighted MSE of math.md section 5: mean over the batch of w[t_b] · mean((pred - target)²).

    reduction "none" returns the per-sample vector (float32, float64 for float64 inputs).
    Give the noise either as a tensor, or as `noise=None, seed=s` with `s` the seed given to
    `q_sample(x0, t, None, schedule, seed=s)`: the fused kernel then regenerates the very
    noise q-sample added (Triton's Philox stream), never stored. That needs the triton
    backend; on the reference backend pass the noise itself (`q_sample(..., return_noise=True)`).
    """
    check_schedule(schedule)
    check_float(x0, "x0")
    check_like(model_output, "model_output", x0, "x0")
    _check_loss_options(schedule, prediction, weighting, reduction)
    triton_path = use_triton(x0)
    t = check_timesteps(t, "t", x0, schedule, values=not triton_path)
    seed = _check_noise_or_seed(noise, seed, x0, triton_path)
    return checked_diffusion_loss(model_output, x0, noise, t, schedule, prediction, weighting, gamma, reduction,
                                  seed, triton_path)


def checked_diffusion_loss(model_output, x0, noise, t, schedule, prediction, weighting, gamma, reduction, seed,
                           triton_path):
    """`diffusion_loss` on validated arguments (`DiffusionLoss` calls it directly)."""
    options = dict(prediction=prediction, weighting=weighting, gamma=gamma, reduction=reduction)
    if not triton_path:
        from fastddpm.loss import eager_diffusion_loss  # the reference's math in PyTorch's fused MSE kernels
        return eager_diffusion_loss(model_output, x0, noise, t, schedule, **options)
    if torch.float64 in (model_output.dtype, x0.dtype, noise.dtype if noise is not None else None):
        return reference.diffusion_loss(model_output, x0, _drawn_noise(x0, t, noise, seed, schedule), t, schedule,
                                        **options)
    device = x0.device
    return loss_kernel.diffusion_loss(model_output, x0, noise, t, schedule.kernel_table(device),
                                      schedule.loss_weight_table(weighting, prediction, gamma, device), seed,
                                      prediction=prediction, reduction=reduction)


def _drawn_noise(x0, t, noise, seed, schedule):
    """The noise itself: given, or the float32 noise q-sample's kernel draws from `seed`."""
    if noise is not None:
        return noise
    return q_sample_kernel.q_sample(x0.float(), t, None, schedule.kernel_table(x0.device), seed,
                                    store_noise=True)[1]


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting)."""
    for name, x in (("mean1", mean1), ("logvar1", logvar1), ("mean2", mean2), ("logvar2", logvar2)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return reference.normal_kl(mean1, logvar1, mean2, logvar2)


def discretized_gaussian_log_likelihood(x, means, log_scales, *, tanh_cdf=False):
    """log p(x) in nats of x in [-1, 1] under a Gaussian discretized to 256 bins; log_scales = log std."""
    check_float(x, "x", min_ndim=1)
    check_like(means, "means", x, "x")
    check_float(log_scales, "log_scales", min_ndim=1)
    return reference.discretized_gaussian_log_likelihood(x, means, log_scales, tanh_cdf=tanh_cdf)


def vb_terms_bpd(model_output, x0, x_t, t, schedule, *, prediction="eps", variance="fixed_small",
                 clip_denoised=False, tanh_cdf=False):
    """Per sample, in bits/dim: the KL term L_{t-1} for t >= 1 and the decoder NLL L_0 for t = 0.

    Differentiable in model_output (the kernel recomputes the gradient in the backward).
    tanh_cdf=True: improved-diffusion's tanh approximation of the normal CDF in the decoder.
    clip_denoised="dynamic" (a per-sample quantile) runs the reference.
    """
    t, triton_path = _check_reverse(model_output, x_t, t, schedule, prediction, variance, clip_denoised)
    check_like(x0, "x0", x_t, "x_t")
    if not isinstance(tanh_cdf, bool):
        raise TypeError(f"tanh_cdf must be a bool, got {type(tanh_cdf).__name__}")
    return vb_terms_with_mse(model_output, x0, x_t, None, t, schedule, prediction=prediction, variance=variance,
                             clip_denoised=clip_denoised, tanh_cdf=tanh_cdf, triton_path=triton_path)[0]


def vb_terms_with_mse(model_output, x0, x_t, noise, t, schedule, *, prediction, variance, clip_denoised, tanh_cdf,
                      triton_path):
    """`vb_terms_bpd` on validated arguments, with the MSEs of x0_hat and eps_hat when `noise`
    is given (see `reference.vb_terms_with_mse`; `elbo_bpd` calls it). The kernel's float32 erf
    loses the decoder's far tails in float64, and dynamic thresholding is a per-sample
    quantile: both run the reference, the latter in float64 and returned in float32."""
    options = dict(prediction=prediction, variance=variance, clip_denoised=clip_denoised, tanh_cdf=tanh_cdf)
    if not triton_path or torch.float64 in (model_output.dtype, x0.dtype, x_t.dtype):
        return reference.vb_terms_with_mse(model_output, x0, x_t, noise, t, schedule, **options)
    if clip_denoised == "dynamic":
        as64 = (None if x is None else x.double() for x in (model_output, x0, x_t, noise))
        return tuple(None if x is None else x.float()
                     for x in reference.vb_terms_with_mse(*as64, t, schedule, **options))
    device = x_t.device
    return vlb_kernel.vb_terms_with_mse(model_output, x0, x_t, noise, t, schedule.kernel_table(device),
                                        schedule.prediction_table(prediction, device), variance=variance,
                                        clip_denoised=clip_denoised, tanh_cdf=tanh_cdf)


def prior_bpd(x0, schedule):
    """KL(q(x_T | x0) || N(0, I)) per sample, in bits/dim."""
    check_schedule(schedule)
    check_float(x0, "x0")
    return reference.prior_bpd(x0, schedule)


# -- checks shared by several ops ----------------------------------------------------------


def _check_reverse(model_output, x_t, t, schedule, prediction, variance, clip_denoised):
    """The reverse-process ops' arguments; returns (t, whether the Triton kernels run)."""
    check_schedule(schedule)
    check_float(x_t, "x_t")
    check_choice(prediction, "prediction", PREDICTIONS)
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
        check_like(model_output, "model_output", x_t, "x_t", (x_t.shape[0], out_channels, *x_t.shape[2:]))
    triton_path = use_triton(x_t)
    return check_timesteps(t, "t", x_t, schedule, values=not triton_path), triton_path


def _check_noise(noise, generator, x_t):
    check_generator(generator)
    if noise is not None:
        check_like(noise, "noise", x_t, "x_t")


def _check_drawn_seed(seed, noise, like, triton_path):
    """`seed` picks the kernels' Philox stream for noise they draw: only without noise, on the kernels."""
    if seed is None:
        return None
    seed = _check_seed(seed, like)
    if noise is not None or not triton_path:
        raise ValueError("seed selects the kernels' Philox stream for drawn noise: pass it without noise, "
                         "on the Triton backend (the reference draws with generator=)")
    return seed


def _check_noise_or_seed(noise, seed, x0, triton_path):
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
    seed = _check_seed(seed, x0)
    if not triton_path:
        raise ValueError("seed= regenerates the noise of q_sample's Triton kernel and needs the triton backend; "
                         "on the reference backend pass noise (q_sample(..., return_noise=True) returns it)")
    return seed


def _check_seed(seed, like):
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("seed must be a 1-element int64 tensor")
    if seed.device != like.device:
        raise ValueError(f"seed is on {seed.device} but x0 is on {like.device}")
    return seed.reshape(1)


def _check_loss_options(schedule, prediction, weighting, reduction):
    check_choice(prediction, "prediction", PREDICTIONS)
    check_choice(reduction, "reduction", REDUCTIONS)
    if isinstance(weighting, torch.Tensor):
        if weighting.numel() != schedule.num_timesteps:
            raise ValueError(f"weighting tensor must have length T={schedule.num_timesteps}, got {weighting.numel()}")
    else:
        check_choice(weighting, "weighting", WEIGHTINGS)


# -- training and evaluation on the variational bound (math.md section 6) -----------------

def hybrid_loss(model_output, x0, noise, t, schedule, *, prediction="eps", weighting="simple", gamma=5.0,
                vlb_weight=None, reduction="mean", seed=None, loss="hybrid", variance="learned_range",
                tanh_cdf=False, return_terms=False):
    """Training on the bound, per sample b (x_t = q_sample(x0, t, noise) is rebuilt, not passed):

    loss="hybrid" (improved DDPM; variance="learned_range", a 2C-channel output):
        w[t] · mean((out[:, :C] - target)²) + vlb_weight · vb_t, with the predicted mean detached
        inside vb_t so that it trains only the variance half out[:, C:];
    loss="kl" (improved-diffusion's RESCALED_KL, any variance): vlb_weight · vb_t.

    vlb_weight: default T / 1000 for "hybrid" (the paper's lambda = 0.001 on L_vlb), T for "kl".
    weighting/gamma: the MSE's weight table (see `diffusion_loss`). `noise=None` regenerates the
    noise in the kernel from `seed`, the 1-element int64 tensor q_sample drew it from (Triton
    backend only). reduction "none" gives the per-sample float32 vector (to multiply by importance
    weights). return_terms=True also returns {"mse": unweighted MSE, "vb": vb_t in bits/dim}, detached.
    The fused kernel computes the gradient in the forward pass; the backward only scales it.
    """
    check_schedule(schedule)
    check_float(x0, "x0")
    check_choice(loss, "loss", LOSS_TYPES)
    check_choice(variance, "variance", VARIANCES)
    if loss == "hybrid" and variance != "learned_range":
        raise ValueError(f"loss='hybrid' trains a learned variance: variance must be 'learned_range', got {variance!r}")
    channels = 2 * x0.shape[1] if variance == "learned_range" else x0.shape[1]
    check_like(model_output, "model_output", x0, "x0", (x0.shape[0], channels, *x0.shape[2:]))
    _check_loss_options(schedule, prediction, weighting, reduction)
    triton_path = use_triton(x0)
    t = check_timesteps(t, "t", x0, schedule, values=not triton_path)
    seed = _check_noise_or_seed(noise, seed, x0, triton_path)
    if vlb_weight is None:
        vlb_weight = schedule.num_timesteps / 1000.0 if loss == "hybrid" else float(schedule.num_timesteps)
    if isinstance(vlb_weight, bool) or not isinstance(vlb_weight, (int, float)) or not 0 <= vlb_weight < float("inf"):
        raise ValueError(f"vlb_weight must be a finite float >= 0 or None, got {vlb_weight!r}")
    for name, flag in (("tanh_cdf", tanh_cdf), ("return_terms", return_terms)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    options = dict(prediction=prediction, weighting=weighting, gamma=gamma, vlb_weight=vlb_weight,
                   reduction=reduction, loss=loss, variance=variance, tanh_cdf=tanh_cdf, return_terms=return_terms)
    if not triton_path:
        return reference.hybrid_loss(model_output, x0, noise, t, schedule, **options)
    if torch.float64 in (model_output.dtype, x0.dtype, noise.dtype if noise is not None else None):
        return reference.hybrid_loss(model_output, x0, _drawn_noise(x0, t, noise, seed, schedule), t, schedule,
                                     **options)
    device = x0.device
    return hybrid_kernel.hybrid_loss(model_output, x0, noise, t, schedule.kernel_table(device),
                                     schedule.prediction_table(prediction, device),
                                     schedule.loss_weight_table(weighting, prediction, gamma, device), seed,
                                     vlb_weight=vlb_weight, reduction=reduction, loss=loss, variance=variance,
                                     tanh_cdf=tanh_cdf, return_terms=return_terms)


def elbo_bpd(model, x0, schedule, *, prediction="eps", variance="fixed_small", clip_denoised=False, timesteps=None,
             progress=True, generator=None, model_kwargs=None, batch_timesteps=False, tanh_cdf=False):
    """The negative ELBO of each image in bits/dim: see `fastddpm.elbo.elbo_bpd`."""
    from .elbo import elbo_bpd as _elbo_bpd
    return _elbo_bpd(model, x0, schedule, prediction=prediction, variance=variance, clip_denoised=clip_denoised,
                     timesteps=timesteps, progress=progress, generator=generator, model_kwargs=model_kwargs,
                     batch_timesteps=batch_timesteps, tanh_cdf=tanh_cdf)

"""The variational bound's terms in bits per dimension (docs/math.md section 6)."""
import torch

from fastddpm import reference
from fastddpm._checks import check_bool, check_float, check_like, check_prediction, check_schedule
from fastddpm.kernels import vlb as vlb_kernel

from ._args import check_reverse


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
    prediction = check_prediction(prediction)
    return vb_terms_with_mse(model_output, x0, x_t, None, t, schedule, prediction=prediction, variance=variance,
                             clip_denoised=clip_denoised, tanh_cdf=tanh_cdf)[0]


def vb_terms_with_mse(model_output, x0, x_t, noise, t, schedule, *, prediction="eps", variance="fixed_small",
                      clip_denoised=False, tanh_cdf=False):
    """(`vb_terms_bpd`, the MSE of x0_hat against x0, the MSE of eps_hat against `noise`) per sample,
    in one pass: improved-diffusion's calc_bpd_loop statistics (`elbo_bpd` calls it); the MSEs are
    None without noise. The kernel's float32 erf loses the decoder's far tails in float64, and
    dynamic thresholding is a per-sample quantile: both run the reference, the latter in float64
    and returned in float32."""
    prediction = check_prediction(prediction)
    t, triton_path = check_reverse(model_output, x_t, t, schedule, variance, clip_denoised)
    check_like(x0, "x0", x_t, "x_t")
    if noise is not None:
        check_like(noise, "noise", x_t, "x_t")
    check_bool(tanh_cdf, "tanh_cdf")
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

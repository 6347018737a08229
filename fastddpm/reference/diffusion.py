"""The pure-PyTorch implementation of every formula of docs/math.md: the ground truth for the
kernels and the default path on CPU.

Inputs of any float dtype; the math runs in float64 for float64 inputs and in float32
otherwise (per-sample coefficients gathered from the float64 tables, then cast), and each
output is rounded once to the input dtype. No argument checking here: `fastddpm.functional`
validates, then calls this or a kernel.
"""
import math

import torch

from fastddpm.options import DYNAMIC_THRESHOLD_PERCENTILE



def compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gather(table, t, like):
    """table[t] as a (B, 1, …, 1) tensor broadcastable against `like`, in its compute dtype."""
    values = table.to(t.device)[t].to(compute_dtype(like))
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def upcast(x, like):
    """x in like's compute dtype."""
    return x.to(compute_dtype(like))


# -- forward process ------------------------------------------------------------------


def q_sample(x0, t, noise, schedule):
    """x_t = sqrt_ab[t] x0 + sqrt_1m_ab[t] eps (docs/math.md section 3)."""
    x_t = torch.addcmul(gather(schedule.sqrt_alphas_cumprod, t, x0) * upcast(x0, x0),
                        gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0), upcast(noise, x0))
    return x_t.to(x0.dtype)


def q_posterior(x0, x_t, t, schedule):
    """Mean, variance and log variance of q(x_{t-1} | x_t, x0); the variances are (B, 1, …, 1)."""
    mean = gather(schedule.posterior_mean_coef1, t, x_t) * upcast(x0, x_t) \
        + gather(schedule.posterior_mean_coef2, t, x_t) * upcast(x_t, x_t)
    variance = gather(schedule.posterior_variance, t, x_t)
    log_variance = gather(schedule.posterior_log_variance_clipped, t, x_t)
    return mean.to(x_t.dtype), variance.to(x_t.dtype), log_variance.to(x_t.dtype)


# -- conversions between eps, x0 and v --------------------------------------------------


def predict_x0_from_eps(x_t, t, eps, schedule):
    return gather(schedule.sqrt_recip_alphas_cumprod, t, x_t) * upcast(x_t, x_t) \
        - gather(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * upcast(eps, x_t)


def predict_eps_from_x0(x_t, t, x0, schedule):
    """(sqrt_recip_ab x_t - x0) / sqrt_recipm1_ab, written as (x_t - sqrt_ab x0) / sqrt_1m_ab: finite
    where ab = 0 (zero terminal SNR)."""
    return (upcast(x_t, x_t) - gather(schedule.sqrt_alphas_cumprod, t, x_t) * upcast(x0, x_t)) \
        / gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)


def predict_x0_from_v(x_t, t, v, schedule):
    return gather(schedule.sqrt_alphas_cumprod, t, x_t) * upcast(x_t, x_t) \
        - gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * upcast(v, x_t)


def predict_eps_from_v(x_t, t, v, schedule):
    return gather(schedule.sqrt_alphas_cumprod, t, x_t) * upcast(v, x_t) \
        + gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * upcast(x_t, x_t)


def v_target(x0, t, noise, schedule):
    """v = sqrt_ab eps - sqrt_1m_ab x0 (Salimans & Ho)."""
    return gather(schedule.sqrt_alphas_cumprod, t, x0) * upcast(noise, x0) \
        - gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * upcast(x0, x0)


def training_target(x0, t, noise, schedule, prediction):
    """a[t] eps + c[t] x0 for the given prediction (docs/math.md section 5), compute dtype."""
    if prediction == "eps":
        return upcast(noise, x0)
    if prediction == "x0":
        return upcast(x0, x0)
    return v_target(x0, t, noise, schedule)


def split_model_output(model_output, x_t, variance):
    """The mean part and (for learned_range) the variance part of a model output."""
    if variance == "learned_range":
        return model_output.chunk(2, dim=1)
    return model_output, None


def process_x0(x0_hat, clip_denoised):
    """Optional clip to [-1, 1] (True) or Imagen's dynamic thresholding ("dynamic")."""
    if clip_denoised == "dynamic":
        # A per-sample quantile: torch.quantile over the flattened sample (docs/math.md section 4).
        s = torch.quantile(x0_hat.abs().flatten(1), DYNAMIC_THRESHOLD_PERCENTILE, dim=1)
        s = s.clamp(min=1.0).reshape(-1, *([1] * (x0_hat.ndim - 1)))
        return x0_hat.clamp(-s, s) / s
    if clip_denoised:
        return x0_hat.clamp(-1, 1)
    return x0_hat


def x0_eps_from_output(model_output, x_t, t, schedule, prediction, clip_denoised=False):
    """x0_hat (processed) and eps_hat, in the compute dtype; eps_hat follows the processed x0_hat."""
    if prediction == "eps":
        x0_hat = predict_x0_from_eps(x_t, t, model_output, schedule)
    elif prediction == "x0":
        x0_hat = upcast(model_output, x_t)
    else:
        x0_hat = predict_x0_from_v(x_t, t, model_output, schedule)
    processed = process_x0(x0_hat, clip_denoised)
    if prediction == "eps" and processed is x0_hat:
        return x0_hat, upcast(model_output, x_t)
    if prediction == "v" and processed is x0_hat:
        return x0_hat, predict_eps_from_v(x_t, t, model_output, schedule)
    return processed, predict_eps_from_x0(x_t, t, processed, schedule)


# -- reverse process ----------------------------------------------------------------------


def model_log_variance(var_output, x_t, t, schedule, variance):
    """Log variance of p(x_{t-1} | x_t): (B, 1, …, 1) for fixed types, full shape for learned_range."""
    if variance == "fixed_small":
        return gather(schedule.posterior_log_variance_clipped, t, x_t)
    if variance == "fixed_large":
        return gather(schedule.fixed_large_log_variance, t, x_t)
    frac = (upcast(var_output, x_t) + 1) / 2
    return frac * gather(schedule.log_betas, t, x_t) \
        + (1 - frac) * gather(schedule.posterior_log_variance_clipped, t, x_t)


def _p_mean_log_variance(model_output, x_t, t, schedule, prediction, variance, clip_denoised):
    """Model mean, log variance and x0_hat in the compute dtype."""
    mean_output, var_output = split_model_output(model_output, x_t, variance)
    log_var = model_log_variance(var_output, x_t, t, schedule, variance)
    x0_hat, _ = x0_eps_from_output(mean_output, x_t, t, schedule, prediction, clip_denoised)
    mean = gather(schedule.posterior_mean_coef1, t, x_t) * x0_hat \
        + gather(schedule.posterior_mean_coef2, t, x_t) * upcast(x_t, x_t)
    return mean, log_var, x0_hat


def p_mean_variance(model_output, x_t, t, schedule, *, prediction="eps", variance="fixed_small", clip_denoised=False):
    """(mean, variance, log_variance, x0_hat) of the reverse step (docs/math.md section 4)."""
    mean, log_var, x0_hat = _p_mean_log_variance(model_output, x_t, t, schedule, prediction, variance, clip_denoised)
    dtype = x_t.dtype
    return mean.to(dtype), log_var.exp().to(dtype), log_var.to(dtype), x0_hat.to(dtype)


def p_sample_step(model_output, x_t, t, schedule, *, noise=None, generator=None, prediction="eps",
                  variance="fixed_small", clip_denoised=False):
    """x_{t-1} = mu + exp(0.5 log var) z, with no noise where t = 0."""
    mean, log_var, _ = _p_mean_log_variance(model_output, x_t, t, schedule, prediction, variance, clip_denoised)
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    nonzero = (t != 0).to(mean.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return (mean + nonzero * torch.exp(0.5 * log_var) * upcast(noise, x_t)).to(x_t.dtype)


def ddim_step(model_output, x_t, t, t_prev, schedule, *, eta=0.0, noise=None, generator=None, prediction="eps",
              clip_denoised=False, use_clipped_model_output=True):
    """DDIM from t to t_prev (t_prev = -1: the final step, ab_prev = 1); eps_hat follows a clipped
    x0_hat unless use_clipped_model_output=False (diffusers' DDIMPipeline keeps the model's eps)."""
    if model_output.shape[1] == 2 * x_t.shape[1]:
        model_output = model_output[:, : x_t.shape[1]]
    x0_hat, eps_hat = x0_eps_from_output(model_output, x_t, t, schedule, prediction, clip_denoised)
    if not use_clipped_model_output:
        eps_hat = x0_eps_from_output(model_output, x_t, t, schedule, prediction)[1]
    ab = gather(schedule.alphas_cumprod, t, x_t)
    ab_table = torch.cat([schedule.alphas_cumprod, schedule.alphas_cumprod.new_ones(1)])
    ab_prev = gather(ab_table, t_prev, x_t)  # index -1 is the appended 1
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
    x_prev = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps_hat
    if eta != 0:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        x_prev = x_prev + sigma * upcast(noise, x_t)
    return x_prev.to(x_t.dtype)


# -- training loss ----------------------------------------------------------------------


def reduce_per_sample(per_sample, reduction):
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def diffusion_loss(model_output, x0, noise, t, schedule, *, prediction="eps", weighting="simple", gamma=5.0,
                   reduction="mean"):
    """L_b = w[t_b] mean((pred - target)²), reduced over the batch (docs/math.md section 5).

    The result is float32 (float64 for float64 inputs) whatever the prediction's dtype.
    """
    target = training_target(x0, t, noise, schedule, prediction)
    squared = (upcast(model_output, x0) - target) ** 2
    weights = schedule.loss_weights(weighting, prediction, gamma).to(t.device)[t].to(target.dtype)
    per_sample = weights * squared.flatten(1).mean(1)
    return reduce_per_sample(per_sample, reduction)


# -- the ELBO ---------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def approx_standard_normal_cdf(x):
    """improved-diffusion's tanh approximation of the normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales, *, tanh_cdf=False):
    """log p(x) of a Gaussian discretized to 256 bins on [-1, 1], elementwise, in nats.

    `log_scales` is the log standard deviation (0.5 · log variance), as in improved-diffusion.
    """
    cdf = approx_standard_normal_cdf if tanh_cdf else standard_normal_cdf
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_minus = cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_cdf_delta))


def vb_terms_bpd(model_output, x0, x_t, t, schedule, *, prediction="eps", variance="fixed_small",
                 clip_denoised=False, tanh_cdf=False):
    """Per sample, in bits per dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t >= 1,
    the decoder NLL -log p(x0 | x_1) for t = 0 (docs/math.md section 6)."""
    true_mean, _, true_log_var = q_posterior(upcast(x0, x_t), upcast(x_t, x_t), t, schedule)
    mean, log_var, _ = _p_mean_log_variance(upcast(model_output, x_t), upcast(x_t, x_t), t, schedule,
                                            prediction, variance, clip_denoised)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(
        upcast(x0, x_t), mean, 0.5 * log_var, tanh_cdf=tanh_cdf).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl)


def vb_terms_with_mse(model_output, x0, x_t, noise, t, schedule, *, prediction="eps", variance="fixed_small",
                      clip_denoised=False, tanh_cdf=False):
    """(vb_terms_bpd, the MSE of x0_hat against x0, the MSE of eps_hat against the noise) per
    sample: improved-diffusion's calc_bpd_loop statistics; the MSEs are None without noise."""
    vb = vb_terms_bpd(model_output, x0, x_t, t, schedule, prediction=prediction, variance=variance,
                      clip_denoised=clip_denoised, tanh_cdf=tanh_cdf)
    if noise is None:
        return vb, None, None
    mean_output, _ = split_model_output(model_output, x_t, variance)
    x0_hat, eps_hat = x0_eps_from_output(mean_output, x_t, t, schedule, prediction, clip_denoised)
    x0_mse = (x0_hat - upcast(x0, x_t)).square().flatten(1).mean(1)
    eps_mse = (eps_hat - upcast(noise, x_t)).square().flatten(1).mean(1)
    return vb, x0_mse, eps_mse


def prior_bpd(x0, schedule):
    """KL(q(x_T | x0) || N(0, I)) per sample, in bits per dim."""
    T = schedule.num_timesteps
    t = torch.full((x0.shape[0],), T - 1, dtype=torch.long, device=x0.device)
    x = upcast(x0, x0)
    mean = gather(schedule.sqrt_alphas_cumprod, t, x) * x
    log_var = gather((1.0 - schedule.alphas_cumprod).log(), t, x)
    kl = normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))
    return kl.flatten(1).mean(1) / math.log(2.0)


def hybrid_loss(model_output, x0, noise, t, schedule, *, prediction="eps", weighting="simple", gamma=5.0,
                vlb_weight=None, reduction="mean", loss="hybrid", variance="learned_range", tanh_cdf=False,
                return_terms=False):
    """Training on the bound (docs/math.md section 6), per sample b:

    loss="hybrid" (improved DDPM, variance="learned_range"): w[t] mean((out - target)²) +
    vlb_weight · vb_t, the vb term computed with the mean half detached, so that it trains only
    the variance half; loss="kl" (improved-diffusion's RESCALED_KL): vlb_weight · vb_t, any
    variance type. vlb_weight defaults to T / 1000 (hybrid) or T (kl). x_t is q_sample(x0, t,
    noise). With return_terms, also {"mse": unweighted MSE of the mean half, "vb": vb_t}, detached.
    """
    T = schedule.num_timesteps
    if vlb_weight is None:
        vlb_weight = T / 1000.0 if loss == "hybrid" else float(T)
    x_t = q_sample(x0, t, noise, schedule)
    mean_output, var_output = split_model_output(model_output, x_t, variance)
    mse = diffusion_loss(mean_output, x0, noise, t, schedule, prediction=prediction, reduction="none")
    if loss == "hybrid":
        frozen = torch.cat([mean_output.detach(), var_output], dim=1)
        vb = vb_terms_bpd(frozen, x0, x_t, t, schedule, prediction=prediction, variance=variance, tanh_cdf=tanh_cdf)
        weights = schedule.loss_weights(weighting, prediction, gamma).to(t.device)[t].to(mse.dtype)
        per_sample = weights * mse + vlb_weight * vb
    else:
        vb = vb_terms_bpd(model_output, x0, x_t, t, schedule, prediction=prediction, variance=variance,
                          tanh_cdf=tanh_cdf)
        per_sample = vlb_weight * vb
    per_sample = reduce_per_sample(per_sample, reduction)
    if return_terms:
        return per_sample, {"mse": mse.detach(), "vb": vb.detach()}
    return per_sample

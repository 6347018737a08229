"""The PyTorch path of the hot ops (backend "torch", and CPU tensors under "auto"): the reference's
formulas (docs/math.md sections 3-5) with the fewest memory passes eager PyTorch allows.

Float32 and half inputs only (fastddpm.functional sends float64 to fastddpm.reference): math in
float32, each output rounded once to its input's dtype. Per-sample coefficients come from one
gather of the schedule's float32 kernel and prediction tables, the tables the kernels read. No
argument checks: fastddpm.functional validates.
"""
import torch

from .reference import process_x0, reduce_per_sample
from .schedule import KERNEL_ROWS, PREDICTION_ROWS

SQRT_AB, SQRT_1M_AB, COEF1, COEF2, LOG_VAR_CLIPPED, LOG_BETAS, AB = (KERNEL_ROWS.index(name) for name in (
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
    "posterior_log_variance_clipped", "log_betas", "alphas_cumprod"))
FIXED_LOG_VARIANCE = {"fixed_small": LOG_VAR_CLIPPED, "fixed_large": KERNEL_ROWS.index("fixed_large_log_variance")}
X0_XT, X0_OUT, EPS_XT, EPS_OUT, TARGET_EPS, TARGET_X0 = range(len(PREDICTION_ROWS))
# ATen's reduction codes: aten::mse_loss called directly (F.mse_loss's broadcast_tensors adds an op
# and two autograd views per call for shapes the callers have already matched).
NO_REDUCTION, MEAN_REDUCTION = 0, 1


def gathered(table, t, like):
    """Every row of a float32 (R, T) table at t, as (R, B, 1, …, 1): one gather for all coefficients."""
    return table.index_select(1, t).view(table.shape[0], -1, *([1] * (like.ndim - 1)))


def q_sample(x0, t, noise, schedule):
    """x_t = sqrt_ab[t] x0 + sqrt_1m_ab[t] noise, built in place in the scaled x0 (one temporary);
    fastest with the noise already in float32."""
    rows = gathered(schedule.kernel_table(x0.device), t, x0)
    if x0.dtype == torch.float32:
        return (x0 * rows[SQRT_AB]).addcmul_(noise, rows[SQRT_1M_AB])
    return x0.float().mul_(rows[SQRT_AB]).addcmul_(noise, rows[SQRT_1M_AB]).to(x0.dtype)


def diffusion_loss(model_output, x0, noise, t, schedule, *, prediction, weighting, gamma, reduction):
    """w[t] · mean((pred - target)²) per sample, reduced: one weight for all is the mean MSE
    (one kernel); per-sample weights take diffusers' min-SNR form (the MSE without reduction,
    then the per-sample mean). The loss is float32."""
    if prediction == "eps":
        target = noise.float()
    elif prediction == "x0":
        target = x0.float()
    else:
        rows = gathered(schedule.prediction_table(prediction, x0.device), t, x0)
        target = torch.addcmul(rows[TARGET_X0] * x0.float(), rows[TARGET_EPS], noise.float())
    pred = model_output.float()
    if isinstance(weighting, str) and weighting == "simple" and reduction != "none":
        loss = torch.ops.aten.mse_loss(pred, target, MEAN_REDUCTION)  # the mean of the per-sample means
        return loss * x0.shape[0] if reduction == "sum" else loss
    weights = schedule.loss_weight_table(weighting, prediction, gamma, t.device)
    per_sample = torch.ops.aten.mse_loss(pred, target, NO_REDUCTION).flatten(1).mean(1)
    return reduce_per_sample(weights.index_select(0, t) * per_sample, reduction)


def denoised(out, x, t, schedule, prediction, clip_denoised, need_eps):
    """(x0_hat processed, eps_hat or None) in float32, as reference.x0_eps_from_output; eps_hat
    follows a processed x0_hat as (x_t - sqrt_ab x0_hat) / sqrt_1m_ab, finite where ab = 0."""
    rows = gathered(schedule.prediction_table(prediction, x.device), t, x)
    x0 = out if prediction == "x0" else torch.addcmul(rows[X0_XT] * x, rows[X0_OUT], out)
    if clip_denoised is True:
        x0 = x0.clamp(-1, 1) if x0 is out else x0.clamp_(-1, 1)
    elif clip_denoised == "dynamic":
        x0 = process_x0(x0, "dynamic")
    if not need_eps:
        return x0, None
    if not clip_denoised:
        return x0, out if prediction == "eps" else torch.addcmul(rows[EPS_XT] * x, rows[EPS_OUT], out)
    table = gathered(schedule.kernel_table(x.device), t, x)
    return x0, torch.addcmul(x, table[SQRT_AB], x0, value=-1).div_(table[SQRT_1M_AB])


def p_sample_step(model_output, x_t, t, schedule, *, noise, generator, prediction, variance, clip_denoised,
                  return_x0_hat):
    """x_{t-1} = coef1 x0_hat + coef2 x_t + [t > 0] exp(log_var / 2) z (and x0_hat)."""
    rows = gathered(schedule.kernel_table(x_t.device), t, x_t)
    channels = x_t.shape[1]
    mean_output = model_output[:, :channels] if variance == "learned_range" else model_output
    x = x_t.float()
    x0_hat, _ = denoised(mean_output.float(), x, t, schedule, prediction, clip_denoised, need_eps=False)
    x_prev = torch.addcmul(rows[COEF2] * x, rows[COEF1], x0_hat)
    if variance == "learned_range":
        frac = (model_output[:, channels:].float() + 1) / 2
        log_var = torch.lerp(rows[LOG_VAR_CLIPPED], rows[LOG_BETAS], frac)
    else:
        log_var = rows[FIXED_LOG_VARIANCE[variance]]
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.ndim - 1)))
    x_prev = x_prev.addcmul_(nonzero * torch.exp(0.5 * log_var), noise.float()).to(x_t.dtype)
    return (x_prev, _own(x0_hat, mean_output, x_t.dtype)) if return_x0_hat else x_prev


def ddim_step(model_output, x_t, t, t_prev, schedule, *, eta, noise, generator, prediction, clip_denoised,
              return_x0_hat, use_clipped_model_output=True):
    """x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma²) eps_hat + sigma z (and x0_hat)."""
    channels = x_t.shape[1]
    if model_output.shape[1] == 2 * channels:
        model_output = model_output[:, :channels]
    x = x_t.float()
    x0_hat, eps_hat = denoised(model_output.float(), x, t, schedule, prediction,
                               clip_denoised if use_clipped_model_output else False, need_eps=True)
    if not use_clipped_model_output and clip_denoised:
        x0_hat = denoised(model_output.float(), x, t, schedule, prediction, clip_denoised, need_eps=False)[0]
    table = schedule.kernel_table(x_t.device)
    ab = gathered(table, t, x_t)[AB]
    # t_prev = -1 is the last step: ab_prev = 1
    ab_prev = torch.where(t_prev >= 0, table[AB].index_select(0, t_prev.clamp(min=0)), 1.0).reshape(ab.shape)
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
    x_prev = (ab_prev.sqrt() * x0_hat).addcmul_((1 - ab_prev - sigma ** 2).clamp(min=0).sqrt(), eps_hat)
    if eta != 0:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        x_prev = x_prev.addcmul_(sigma, noise.float())
    x_prev = x_prev.to(x_t.dtype)
    return (x_prev, _own(x0_hat, model_output, x_t.dtype)) if return_x0_hat else x_prev


def _own(x0_hat, model_output, dtype):
    """x0_hat in `dtype`, never the caller's model output itself (x0 prediction, no clipping)."""
    return x0_hat.to(dtype, copy=x0_hat is model_output)

"""Fused reverse process (docs/math.md section 4): the posterior mean, p_mean_variance, the DDPM
ancestral step and the DDIM step, each one pass over the batch, coefficients gathered at t from the
schedule's kernel and prediction tables.

Bytes per element: read x_t and the model output, write x_{t-1}: 3N with z drawn in the kernel (the
floor), 4N for learned_range (the variance half is read too); +N to read a given noise, +N to write
x0_hat. Dynamic thresholding (clip_denoised="dynamic") needs a per-sample quantile of |x0_hat|: a
first pass writes x0_hat in float32, torch.quantile takes its 0.995 quantile (as the reference), and
the step reads that scale. Matches reference.q_posterior, p_mean_variance, p_sample_step, ddim_step.
"""
import torch
import triton
import triton.language as tl

from fastddpm.options import DYNAMIC_THRESHOLD_PERCENTILE

from ._common import (AB, CHECKED, COEF1, COEF2, EPS_OUT, EPS_XT, FIXED_LOG_VARIANCE_ROWS, LOG_BETAS, LOG_VAR_CLIPPED,
                      POSTERIOR_VARIANCE, SQRT_1M_AB, SQRT_AB, X0_OUT, X0_XT, channel_sizes, eager, kernel_layout,
                      launch_config, like_layout, load_timestep, model_output_offsets, sample_numel, sample_offsets,
                      load_noise)
from ._launch import launch


CLIP_IDS = {"none": 0, "clip": 1, "dynamic": 2}


# -- device functions ---------------------------------------------------------------------


@triton.jit
def denoise(x, out, table_ptr, pred_table_ptr, scale_ptr, sample, t, T, CLIP: tl.constexpr,
            EPS_FROM_OUTPUT: tl.constexpr):
    """x0_hat = x0_xt x_t + x0_out out and eps_hat = eps_xt x_t + eps_out out, the coefficients of the
    schedule's prediction table at t; x0_hat clipped (CLIP 1 to [-1, 1], CLIP 2 by the per-sample
    scale s, to [-s, s] / s), then eps_hat follows it as (x_t - sqrt_ab x0_hat) / sqrt_1m_ab (finite
    where ab = 0), or with EPS_FROM_OUTPUT stays the model output's."""
    x0 = tl.load(pred_table_ptr + X0_XT * T + t) * x + tl.load(pred_table_ptr + X0_OUT * T + t) * out
    if CLIP == 0 or EPS_FROM_OUTPUT:
        eps = tl.load(pred_table_ptr + EPS_XT * T + t) * x + tl.load(pred_table_ptr + EPS_OUT * T + t) * out
    if CLIP == 1:
        x0 = tl.clamp(x0, -1.0, 1.0)
    elif CLIP == 2:
        scale = tl.load(scale_ptr + sample)
        x0 = tl.clamp(x0, -scale, scale) / scale
    if CLIP != 0 and not EPS_FROM_OUTPUT:
        eps = (x - tl.load(table_ptr + SQRT_AB * T + t) * x0) / tl.load(table_ptr + SQRT_1M_AB * T + t)
    return x0, eps


# -- kernels --------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["variance_row"])
def p_sample_kernel(out_ptr, x_ptr, noise_ptr, seed_ptr, t_ptr, table_ptr, pred_table_ptr, scale_ptr,
                    x_prev_ptr, x0_ptr, log_var_ptr, var_ptr,
                    D, T, C, HW, variance_row,
                    CLIP: tl.constexpr, LEARNED_RANGE: tl.constexpr, ADD_NOISE: tl.constexpr,
                    DRAW_NOISE: tl.constexpr, STORE_X0: tl.constexpr, STORE_VARIANCE: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """mean = coef1 x0_hat + coef2 x_t (ADD_NOISE False: p_mean_variance, q_posterior) or the DDPM step
    x_{t-1} = mean + [t > 0] exp(log_var / 2) z (ADD_NOISE True); log_var from table row `variance_row`
    or learned_range's frac log_betas + (1 - frac) log_var_clipped, frac = (v + 1) / 2."""
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    t = load_timestep(t_ptr, sample, T)
    if ADD_NOISE:  # drawn first: Box-Muller's registers are free again before the step's loads (no spill)
        z = load_noise(noise_ptr, seed_ptr, sample, offs, mask, base, D, C, HW, DRAW_NOISE, CHANNELS_LAST, BLOCK)
    out_offs, variance_shift = model_output_offsets(sample, offs, D, C, LEARNED_RANGE, CHANNELS_LAST)
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    out = tl.load(out_ptr + out_offs, mask=mask).to(tl.float32)
    x0, _ = denoise(x, out, table_ptr, pred_table_ptr, scale_ptr, sample, t, T, CLIP, False)
    mean = tl.load(table_ptr + COEF1 * T + t) * x0 + tl.load(table_ptr + COEF2 * T + t) * x
    if LEARNED_RANGE:
        frac = (tl.load(out_ptr + out_offs + variance_shift, mask=mask).to(tl.float32) + 1.0) / 2.0
        log_var = frac * tl.load(table_ptr + LOG_BETAS * T + t) \
            + (1.0 - frac) * tl.load(table_ptr + LOG_VAR_CLIPPED * T + t)
    else:
        log_var = tl.load(table_ptr + variance_row * T + t)
    if STORE_VARIANCE:
        tl.store(log_var_ptr + base + offs, log_var.to(log_var_ptr.dtype.element_ty), mask=mask)
        tl.store(var_ptr + base + offs, tl.exp(log_var).to(var_ptr.dtype.element_ty), mask=mask)
    if ADD_NOISE:
        mean += tl.where(t != 0, tl.exp(0.5 * log_var), 0.0) * z
    tl.store(x_prev_ptr + base + offs, mean.to(x_prev_ptr.dtype.element_ty), mask=mask)
    if STORE_X0:
        tl.store(x0_ptr + base + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ddim_kernel(out_ptr, x_ptr, noise_ptr, seed_ptr, t_ptr, t_prev_ptr, table_ptr, pred_table_ptr, scale_ptr,
                x_prev_ptr, x0_ptr, D, T, C, HW, eta,
                CLIP: tl.constexpr, EPS_FROM_OUTPUT: tl.constexpr, WIDE_OUTPUT: tl.constexpr,
                ADD_NOISE: tl.constexpr, DRAW_NOISE: tl.constexpr, STORE_X0: tl.constexpr,
                CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """One DDIM step from t to t_prev (per sample); a 2C-channel output's variance half is skipped.

    sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev),
    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma²) eps_hat + sigma z."""
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    t = load_timestep(t_ptr, sample, T)
    t_prev = tl.load(t_prev_ptr + sample)
    tl.device_assert((t_prev >= -1) & (t_prev < T), "t_prev must lie in [-1, T): -1 for the last step")
    t_prev = tl.minimum(t_prev, T - 1)
    out_offs, _ = model_output_offsets(sample, offs, D, C, WIDE_OUTPUT, CHANNELS_LAST)
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    out = tl.load(out_ptr + out_offs, mask=mask).to(tl.float32)
    x0, eps = denoise(x, out, table_ptr, pred_table_ptr, scale_ptr, sample, t, T, CLIP, EPS_FROM_OUTPUT)
    if ADD_NOISE:  # drawn here, between the loads and the step's math: no spill on Triton 3.2-3.9
        z = load_noise(noise_ptr, seed_ptr, sample, offs, mask, base, D, C, HW, DRAW_NOISE, CHANNELS_LAST, BLOCK)
    ab = tl.load(table_ptr + AB * T + t)
    ab_prev = tl.where(t_prev >= 0, tl.load(table_ptr + AB * T + tl.maximum(t_prev, 0)), 1.0)
    sigma = eta * tl.sqrt_rn((1.0 - ab_prev) / (1.0 - ab)) * tl.sqrt_rn(1.0 - ab / ab_prev)
    x_prev = tl.sqrt_rn(ab_prev) * x0 + tl.sqrt_rn(tl.maximum(1.0 - ab_prev - sigma * sigma, 0.0)) * eps
    if ADD_NOISE:
        x_prev += sigma * z
    tl.store(x_prev_ptr + base + offs, x_prev.to(x_prev_ptr.dtype.element_ty), mask=mask)
    if STORE_X0:
        tl.store(x0_ptr + base + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


# -- launchers (kernel-layout tensors, see _common.kernel_layout) ----------------------------


def step_launch_config(x):
    """Over 4 warps (512 float32 or 1024 bfloat16 elements): ptxas spills a few bytes of these
    kernels over 8 warps on some Triton versions (3.9: p_sample, channels_last float32)."""
    return launch_config(x, num_warps=4)


def _empty(like, wanted, dtype=None):
    return torch.empty_like(like, dtype=dtype) if wanted else like.new_empty(0)


def p_sample_forward(model_output, x_t, t, table, pred_table, noise, seed, scale, variance, clip, channels_last,
                     add_noise, store_x0, store_variance=False, x0_dtype=None):
    """Launch p_sample_kernel. Returns (x_{t-1} or the mean, x0_hat or empty, and the full-shape learned
    log variance and variance, or empties)."""
    learned = variance == "learned_range"
    store_variance = store_variance and learned
    out = torch.empty_like(x_t)
    x0_hat = _empty(x_t, store_x0, x0_dtype)
    log_var, var = _empty(x_t, store_variance), _empty(x_t, store_variance)
    draw = add_noise and noise is None
    grid, block, num_warps = step_launch_config(x_t)
    C, HW = channel_sizes(x_t, channels_last)
    launch(
        p_sample_kernel, grid,
        model_output, x_t, x_t if noise is None else noise, t if seed is None else seed, t, table, pred_table,
        x_t if scale is None else scale, out, x0_hat if store_x0 else out,
        log_var if store_variance else out, var if store_variance else out,
        sample_numel(x_t), table.shape[1], C, HW, FIXED_LOG_VARIANCE_ROWS[variance],
        CLIP=CLIP_IDS[clip], LEARNED_RANGE=learned, ADD_NOISE=add_noise, DRAW_NOISE=draw, STORE_X0=store_x0,
        STORE_VARIANCE=store_variance, CHANNELS_LAST=channels_last, BLOCK=block, num_warps=num_warps, **CHECKED)
    return out, x0_hat, log_var, var


def ddim_forward(model_output, x_t, t, t_prev, table, pred_table, noise, seed, scale, eta, clip, channels_last,
                 store_x0, eps_from_output=False):
    """Launch ddim_kernel. Returns (x_prev, x0_hat or empty); noise is added only for eta > 0."""
    out = torch.empty_like(x_t)
    x0_hat = _empty(x_t, store_x0)
    add_noise = eta != 0
    grid, block, num_warps = step_launch_config(x_t)
    C, HW = channel_sizes(x_t, channels_last)
    launch(
        ddim_kernel, grid,
        model_output, x_t, x_t if noise is None else noise, t if seed is None else seed, t, t_prev, table, pred_table,
        x_t if scale is None else scale, out, x0_hat if store_x0 else out,
        sample_numel(x_t), table.shape[1], C, HW, float(eta),
        CLIP=CLIP_IDS[clip], EPS_FROM_OUTPUT=eps_from_output, WIDE_OUTPUT=model_output.shape[1] == 2 * x_t.shape[1],
        ADD_NOISE=add_noise,
        DRAW_NOISE=add_noise and noise is None, STORE_X0=store_x0, CHANNELS_LAST=channels_last,
        BLOCK=block, num_warps=num_warps, **CHECKED)
    return out, x0_hat


def dynamic_scale(model_output, x_t, t, table, pred_table, channels_last):
    """Imagen's per-sample threshold s = max(quantile_0.995(|x0_hat|), 1), shape (B,), float32.

    A first pass of p_sample_kernel writes the unclipped x0_hat in float32; the quantile is
    torch.quantile, as in the reference (a sort: this costs more than the step itself).
    """
    variance = "learned_range" if model_output.shape[1] == 2 * x_t.shape[1] else "fixed_small"
    _, x0_hat, _, _ = p_sample_forward(model_output, x_t, t, table, pred_table, None, None, None, variance, "none",
                                       channels_last, add_noise=False, store_x0=True, x0_dtype=torch.float32)
    s = torch.quantile(x0_hat.abs().flatten(1), DYNAMIC_THRESHOLD_PERCENTILE, dim=1)
    return s.clamp(min=1.0).contiguous()


def _scale(clip, model_output, x_t, t, table, pred_table, channels_last):
    return dynamic_scale(model_output, x_t, t, table, pred_table, channels_last) if clip == "dynamic" else None


# -- custom ops ----------------------------------------------------------------------------


def _q_posterior_mean(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                      x0_table: torch.Tensor, channels_last: bool) -> torch.Tensor:
    # coef1 x0 + coef2 x_t is the model mean of an x0 prediction (x0_table: its prediction table), unclipped
    return p_sample_forward(x0, x_t, t, table, x0_table, None, None, None, "fixed_small", "none", channels_last,
                            add_noise=False, store_x0=False)[0]


q_posterior_mean_op = torch.library.custom_op("fastddpm::q_posterior_mean", _q_posterior_mean, mutates_args=())


@q_posterior_mean_op.register_fake
def _(x0, x_t, t, table, x0_table, channels_last):
    return torch.empty_like(x_t)


def _q_posterior_setup(ctx, inputs, output):
    _, x_t, t, table, _, _ = inputs
    ctx.save_for_backward(t, table)


def _q_posterior_backward(ctx, grad_mean):
    t, table = ctx.saved_tensors
    grad_x0 = grad_mean * _gather(table, COEF1, t, grad_mean).to(grad_mean.dtype)
    grad_x_t = grad_mean * _gather(table, COEF2, t, grad_mean).to(grad_mean.dtype)
    return grad_x0, grad_x_t, None, None, None, None


q_posterior_mean_op.register_autograd(_q_posterior_backward, setup_context=_q_posterior_setup)


def _p_mean_variance(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                     pred_table: torch.Tensor, variance: str, clip: str,
                     channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = _scale(clip, model_output, x_t, t, table, pred_table, channels_last)
    return p_sample_forward(model_output, x_t, t, table, pred_table, None, None, scale, variance, clip, channels_last,
                            add_noise=False, store_x0=True, store_variance=True)


p_mean_variance_op = torch.library.custom_op("fastddpm::p_mean_variance", _p_mean_variance, mutates_args=())


@p_mean_variance_op.register_fake
def _(model_output, x_t, t, table, pred_table, variance, clip, channels_last):
    learned = variance == "learned_range"
    return torch.empty_like(x_t), torch.empty_like(x_t), _empty(x_t, learned), _empty(x_t, learned)


def _p_mean_variance_setup(ctx, inputs, output):
    model_output, x_t, t, table, pred_table, variance, clip, _ = inputs
    ctx.options = variance, clip
    ctx.save_for_backward(model_output, x_t, t, table, pred_table, output[3])


def _p_mean_variance_backward(ctx, grad_mean, grad_x0, grad_log_var, grad_var):
    """mean = coef1 x0_hat + coef2 x_t and x0_hat = clip(a x_t + b out) are linear in (out, x_t)
    up to the clip mask; the learned log variance is linear in the variance half v."""
    model_output, x_t, t, table, pred_table, var = ctx.saved_tensors
    variance, clip = ctx.options
    if clip == "dynamic":
        raise RuntimeError("p_mean_variance: no gradient through clip_denoised='dynamic' (a per-sample "
                           "quantile); use clip_denoised=True or False")

    def gather(row):
        return _gather(table, row, t, x_t)

    a, b = _gather(pred_table, X0_XT, t, x_t), _gather(pred_table, X0_OUT, t, x_t)
    channels = x_t.shape[1]
    x = x_t.float()
    grad_mean = grad_mean.float()
    grad_x0_hat = gather(COEF1) * grad_mean + grad_x0.float()
    if clip == "clip":
        x0_hat = a * x + b * model_output[:, :channels].float()
        grad_x0_hat = grad_x0_hat * (x0_hat.abs() <= 1)
    grad_out = b * grad_x0_hat
    grad_x_t = a * grad_x0_hat + gather(COEF2) * grad_mean
    if variance == "learned_range":
        dlog_var_dv = 0.5 * (gather(LOG_BETAS) - gather(LOG_VAR_CLIPPED))
        grad_v = (grad_log_var.float() + grad_var.float() * var.float()) * dlog_var_dv
        grad_out = torch.cat([grad_out, grad_v], dim=1)
    return (grad_out.to(model_output.dtype), grad_x_t.to(x_t.dtype)) + (None,) * 6


p_mean_variance_op.register_autograd(_p_mean_variance_backward, setup_context=_p_mean_variance_setup)


def _p_sample_step(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                   pred_table: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor | None, variance: str,
                   clip: str, channels_last: bool, store_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _scale(clip, model_output, x_t, t, table, pred_table, channels_last)
    x_prev, x0_hat, _, _ = p_sample_forward(model_output, x_t, t, table, pred_table, noise, seed, scale, variance,
                                            clip, channels_last, add_noise=True, store_x0=store_x0)
    return x_prev, x0_hat


p_sample_step_op = torch.library.custom_op("fastddpm::p_sample_step", _p_sample_step, mutates_args=())


@p_sample_step_op.register_fake
def _(model_output, x_t, t, table, pred_table, noise, seed, variance, clip, channels_last, store_x0):
    return torch.empty_like(x_t), _empty(x_t, store_x0)


def _ddim_step(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
               table: torch.Tensor, pred_table: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor | None,
               eta: float, clip: str, channels_last: bool, store_x0: bool,
               eps_from_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _scale(clip, model_output, x_t, t, table, pred_table, channels_last)
    return ddim_forward(model_output, x_t, t, t_prev, table, pred_table, noise, seed, scale, eta, clip,
                        channels_last, store_x0, eps_from_output)


ddim_step_op = torch.library.custom_op("fastddpm::ddim_step", _ddim_step, mutates_args=())


@ddim_step_op.register_fake
def _(model_output, x_t, t, t_prev, table, pred_table, noise, seed, eta, clip, channels_last, store_x0,
      eps_from_output):
    return torch.empty_like(x_t), _empty(x_t, store_x0)


# -- entry points of fastddpm.functional (validated inputs; the schedule's kernel table and the
# prediction's table, seeds given) ------------------------------------------------------------
#
# Eager calls that need no autograd run the ops' implementations directly; under torch.compile, or
# with gradients, they go through the custom ops (about 11 µs more host time a call).


def _gather(table, row, t, like):
    """table[row][t] as a (B, 1, …, 1) float32 tensor; `row` an int or a row constant."""
    return table[getattr(row, "value", row)][t].reshape(-1, *([1] * (like.ndim - 1)))


def _clip_name(clip_denoised):
    if clip_denoised == "dynamic":
        return "dynamic"
    return "clip" if clip_denoised else "none"


def q_posterior(x0, x_t, t, table, x0_table):
    """(mean, variance, log_variance) of q(x_{t-1} | x_t, x0); the variances are (B, 1, …, 1) gathers.
    x0_table: the schedule's prediction table of an x0 prediction (the mean is that model mean)."""
    x_t, channels_last = kernel_layout(x_t)
    x0 = like_layout(x0, channels_last)
    mean = (_q_posterior_mean if eager(x0, x_t) else q_posterior_mean_op)(x0, x_t, t, table, x0_table, channels_last)
    return (mean, _gather(table, POSTERIOR_VARIANCE, t, x_t).to(x_t.dtype),
            _gather(table, LOG_VAR_CLIPPED, t, x_t).to(x_t.dtype))


def p_mean_variance(model_output, x_t, t, table, pred_table, *, variance, clip_denoised):
    """(mean, variance, log_variance, x0_hat); the variances are full-shape for learned_range, else (B, 1, …, 1)."""
    x_t, channels_last = kernel_layout(x_t)
    model_output = like_layout(model_output, channels_last)
    op = _p_mean_variance if eager(model_output, x_t) else p_mean_variance_op
    mean, x0_hat, log_var, var = op(model_output, x_t, t, table, pred_table, variance, _clip_name(clip_denoised),
                                    channels_last)
    if variance != "learned_range":
        log_var = _gather(table, FIXED_LOG_VARIANCE_ROWS[variance], t, x_t)
        var, log_var = log_var.exp().to(x_t.dtype), log_var.to(x_t.dtype)
    return mean, var, log_var, x0_hat


def p_sample_step(model_output, x_t, t, table, pred_table, noise, seed, *, variance, clip_denoised,
                  return_x0_hat=False):
    """x_{t-1} (and x0_hat with return_x0_hat); z drawn in the kernel from `seed` when `noise` is None."""
    x_t, channels_last = kernel_layout(x_t)
    model_output, noise = like_layout(model_output, channels_last), like_layout(noise, channels_last)
    op = _p_sample_step if eager(model_output, x_t, noise) else p_sample_step_op
    x_prev, x0_hat = op(model_output, x_t, t, table, pred_table, noise, seed, variance, _clip_name(clip_denoised),
                        channels_last, return_x0_hat)
    return (x_prev, x0_hat) if return_x0_hat else x_prev


def ddim_step(model_output, x_t, t, t_prev, table, pred_table, noise, seed, *, eta, clip_denoised,
              use_clipped_model_output=True, return_x0_hat=False):
    """x_prev (and x0_hat with return_x0_hat); for eta > 0, z drawn in the kernel from `seed` when `noise` is None.
    use_clipped_model_output=False: eps_hat from the model output even where x0_hat is clipped."""
    x_t, channels_last = kernel_layout(x_t)
    model_output = like_layout(model_output, channels_last)
    noise = like_layout(noise, channels_last) if eta != 0 else None
    op = _ddim_step if eager(model_output, x_t, noise) else ddim_step_op
    x_prev, x0_hat = op(model_output, x_t, t, t_prev, table, pred_table, noise, seed, float(eta),
                        _clip_name(clip_denoised), channels_last, return_x0_hat, not use_clipped_model_output)
    return (x_prev, x0_hat) if return_x0_hat else x_prev

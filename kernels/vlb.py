"""Fused variational-bound terms in bits per dimension (docs/math.md section 6).

Per sample b with timestep t, in one pass over the model output, x0 and x_t:

    t >= 1:  L_{t-1} = mean normal_kl(q_mean, posterior_log_variance_clipped[t], mu, log_var) / log 2
    t  = 0:  L_0     = -mean log p(x0 | mu, log_var) / log 2     (256-bin discretized Gaussian)

with mu = coef1 x0_hat + coef2 x_t, x0_hat = a[t] x_t + c[t] output for every prediction
(coefficient pairs gathered from `prediction_table`), and log_var fixed_small, fixed_large
or learned_range (the second C channels of a 2C-channel output). Optionally the same pass
returns x0_hat's and eps_hat's mean squared errors (improved-diffusion's calc_bpd_loop), and
with COMPUTE_GRAD it writes d L / d output instead (the backward, recomputed from the inputs).

Bytes per element of x0 (N): read x_t and x0 (2N) and the output (1N, 2N for learned_range),
plus 1N for the noise when the MSEs are asked for; the backward also writes the gradient.
Per-sample sums: each program stores one float32 partial into a (stats, B, blocks) buffer,
summed afterwards in a fixed order: deterministic, no atomics.

Matches `reference.vb_terms_bpd`. The decoder's normal CDF is exact: `tl.math.erf` near the
centre and, in the upper tail, erfc from a Chebyshev fit (fractional error < 1.2e-7, Press et
al., Numerical Recipes section 6.2), so that bin masses far out in a tail keep their relative
accuracy in float32 (1 - Phi(x) computed from erf is 0 beyond x = 5.4). A bin's mass is
computed on the tail side of the mean, where it is a difference of two small numbers.
`tanh_cdf=True` uses improved-diffusion's approximation 0.5 (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))).
"""
import math

import torch
import triton
import triton.language as tl


from ._common import (CHECKED, COEF1, COEF2, EPS_OUT, EPS_XT, FIXED_LOG_VARIANCE_ROWS, LOG_BETAS, LOG_VAR_CLIPPED,
                      SQRT_1M_AB, SQRT_AB, X0_OUT, X0_XT, eager, kernel_layout, launch_config, like_layout,
                      load_model_output, load_timestep, model_output_offsets, sample_numel, sample_offsets)
from ._launch import launch

HALF_BIN = tl.constexpr(1.0 / 255.0)
LOG_MASS_FLOOR = tl.constexpr(1e-12)
INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
TANH_CUBIC = tl.constexpr(0.044715)
INV_LN2 = tl.constexpr(1.0 / math.log(2.0))
LN2 = math.log(2.0)

# -- device functions shared with kernels/hybrid.py ------------------------------------------


@triton.jit
def upper_tail(x, TANH_CDF: tl.constexpr):
    """P(Z > x) = 1 - Phi(x), accurate relative to its value in the upper tail."""
    if TANH_CDF:
        # 1 - 0.5 (1 + tanh(y)) = 1 / (1 + exp(2y))
        y = SQRT_2_OVER_PI * (x + TANH_CUBIC * x * x * x)
        tail = 1.0 / (1.0 + tl.exp(tl.minimum(2.0 * y, 80.0)))  # capped: no inf, and 1 / (1 + e^80) is below the clamp
    else:
        z = tl.abs(x) * INV_SQRT2
        k = 1.0 / (1.0 + 0.5 * z)
        poly = k * (1.00002368 + k * (0.37409196 + k * (0.09678418 + k * (-0.18628806 + k * (
            0.27886807 + k * (-1.13520398 + k * (1.48851587 + k * (-0.82215223 + k * 0.17087277))))))))
        half_erfc = 0.5 * k * tl.exp(-z * z - 1.26551223 + poly)
        tail = tl.where(x > 1.0, half_erfc, 0.5 - 0.5 * tl.math.erf(x * INV_SQRT2))
    return tail


@triton.jit
def cdf_density(x, TANH_CDF: tl.constexpr):
    """d Phi / dx of the CDF in use (the normal pdf, or the tanh approximation's derivative)."""
    if TANH_CDF:
        density = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * x * x) * 2.0 \
            * upper_tail(x, TANH_CDF) * upper_tail(-x, TANH_CDF)
    else:
        density = INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    return density


@triton.jit
def decoder_nll(x0, mean, log_var, TANH_CDF: tl.constexpr):
    """-log p(x0) in nats under the 256-bin discretized Gaussian, and its derivatives in mean and log_var.

    The mass is Q(lo) - Q(hi), Q = upper_tail, lo/hi = s (sign c - h, sign c + h), c = x0 - mean,
    s = exp(-log_var / 2): sign c = sign(c) in the interior (the bin's mirror image on the tail
    side), +1 at the top edge (x0 > 0.999: 1 - Phi(s(c - h)), hi = inf) and -1 at the bottom
    edge (x0 < -0.999: Phi(s(c + h)), hi = inf). d lo / d log_var = -lo / 2, d lo / d mean = -sign s.
    """
    inv_std = tl.exp(-0.5 * log_var)
    centered = x0 - mean
    top = x0 > 0.999
    bottom = x0 < -0.999
    edge = top | bottom
    sign = tl.where(top, 1.0, tl.where(bottom, -1.0, tl.where(centered >= 0.0, 1.0, -1.0)))
    lo = inv_std * (sign * centered - HALF_BIN)
    hi = inv_std * (sign * centered + HALF_BIN)
    mass = upper_tail(lo, TANH_CDF) - tl.where(edge, 0.0, upper_tail(hi, TANH_CDF))
    density_lo = cdf_density(lo, TANH_CDF)
    density_hi = tl.where(edge, 0.0, cdf_density(hi, TANH_CDF))
    kept = mass >= LOG_MASS_FLOOR  # the clamp at 1e-12 passes no gradient below it
    inv_mass = tl.where(kept, 1.0 / tl.maximum(mass, LOG_MASS_FLOOR), 0.0)
    nll = -tl.log(tl.maximum(mass, LOG_MASS_FLOOR))
    d_mean = -sign * inv_std * (density_lo - density_hi) * inv_mass
    d_log_var = -0.5 * (lo * density_lo - hi * density_hi) * inv_mass
    return nll, d_mean, d_log_var


@triton.jit
def gaussian_kl(mean_diff, true_log_var, log_var):
    """normal_kl(true mean, true_log_var, model mean, log_var) in nats, with mean_diff = true - model,
    and its derivatives in the model mean and log_var.

    exp(-d) - 1 + d (d = log_var - true_log_var) by its series for small d: the direct form
    cancels in float32 and could come out negative.
    """
    d = log_var - true_log_var
    ratio = tl.exp(-d)
    series = d * d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0 - d * (1.0 / 120.0))))
    excess = tl.where(tl.abs(d) < 0.1, series, ratio - 1.0 + d)
    scaled_sq = mean_diff * mean_diff * tl.exp(-log_var)
    kl = 0.5 * (excess + scaled_sq)
    d_mean = -mean_diff * tl.exp(-log_var)
    d_log_var = 0.5 * (1.0 - ratio - scaled_sq)
    return kl, d_mean, d_log_var


@triton.jit
def vb_element(x0, x_t, mean_out, var_out, t, T, table_ptr, pred_table_ptr, fixed_log_var_row,
               LEARNED: tl.constexpr, CLIP: tl.constexpr, TANH_CDF: tl.constexpr):
    """Per element: the vb term in nats (KL for t >= 1, decoder NLL for t = 0), its derivatives in
    the mean output and the variance output, and x0_hat (clipped if CLIP)."""
    x0_xt = tl.load(pred_table_ptr + X0_XT * T + t)
    x0_out = tl.load(pred_table_ptr + X0_OUT * T + t)
    coef1 = tl.load(table_ptr + COEF1 * T + t)
    coef2 = tl.load(table_ptr + COEF2 * T + t)
    true_log_var = tl.load(table_ptr + LOG_VAR_CLIPPED * T + t)
    x0_hat = x0_xt * x_t + x0_out * mean_out
    d_x0_hat = x0_out + tl.zeros_like(x0_hat)  # d x0_hat / d mean_out
    if CLIP:
        d_x0_hat = tl.where((x0_hat >= -1.0) & (x0_hat <= 1.0), d_x0_hat, 0.0)
        x0_hat = tl.minimum(tl.maximum(x0_hat, -1.0), 1.0)
    if LEARNED:
        # log var = frac log(betas) + (1 - frac) log(posterior variance), frac = (v + 1) / 2
        half_span = 0.5 * (tl.load(table_ptr + LOG_BETAS * T + t) - true_log_var)
        log_var = true_log_var + (var_out + 1.0) * half_span
    else:
        half_span = 0.0
        log_var = tl.load(table_ptr + fixed_log_var_row * T + t) + tl.zeros_like(x0_hat)
    if t == 0:
        term, d_mean, d_log_var = decoder_nll(x0, coef1 * x0_hat + coef2 * x_t, log_var, TANH_CDF)
    else:
        term, d_mean, d_log_var = gaussian_kl(coef1 * (x0 - x0_hat), true_log_var, log_var)
    return term, d_mean * coef1 * d_x0_hat, d_log_var * half_span, x0_hat


# -- the evaluation kernel --------------------------------------------------------------------


@triton.jit
def vb_terms_kernel(out_ptr, x0_ptr, x_t_ptr, noise_ptr, t_ptr, table_ptr, pred_table_ptr, partial_ptr,
                    grad_scale_ptr, grad_ptr,
                    D, T, C, n_blocks, fixed_log_var_row,
                    LEARNED: tl.constexpr, CLIP: tl.constexpr, TANH_CDF: tl.constexpr, WITH_MSE: tl.constexpr,
                    COMPUTE_GRAD: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    t = load_timestep(t_ptr, sample, T)
    out_offs, variance_shift = model_output_offsets(sample, offs, D, C, LEARNED, CHANNELS_LAST)
    x0 = tl.load(x0_ptr + base + offs, mask=mask).to(tl.float32)
    x_t = tl.load(x_t_ptr + base + offs, mask=mask).to(tl.float32)
    mean_out, var_out = load_model_output(out_ptr, out_offs, variance_shift, mask, LEARNED)
    term, d_mean_out, d_var_out, x0_hat = vb_element(x0, x_t, mean_out, var_out, t, T, table_ptr, pred_table_ptr,
                                                     fixed_log_var_row, LEARNED, CLIP, TANH_CDF)
    if COMPUTE_GRAD:
        # d (mean over the sample of term / log 2) / d output, times the incoming per-sample gradient
        scale = tl.load(grad_scale_ptr + sample) * INV_LN2 / D
        tl.store(grad_ptr + out_offs, (scale * d_mean_out).to(grad_ptr.dtype.element_ty), mask=mask)
        if LEARNED:
            tl.store(grad_ptr + out_offs + variance_shift, (scale * d_var_out).to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        # partial sums of the per-sample means (the 1/D and the nats-to-bits 1/log 2 folded in)
        partial = partial_ptr + sample * n_blocks + tl.program_id(0)
        tl.store(partial, tl.sum(tl.where(mask, term, 0.0), axis=0) * INV_LN2 / D)
        if WITH_MSE:
            noise = tl.load(noise_ptr + base + offs, mask=mask).to(tl.float32)
            if CLIP:
                # eps_hat follows the clipped x0_hat: (x_t - sqrt_ab x0_hat) / sqrt_1m_ab, finite where ab = 0
                eps_hat = (x_t - tl.load(table_ptr + SQRT_AB * T + t) * x0_hat) / tl.load(table_ptr + SQRT_1M_AB * T + t)
            else:
                eps_hat = tl.load(pred_table_ptr + EPS_XT * T + t) * x_t \
                    + tl.load(pred_table_ptr + EPS_OUT * T + t) * mean_out
            x0_err = tl.where(mask, x0_hat - x0, 0.0)
            eps_err = tl.where(mask, eps_hat - noise, 0.0)
            stride = tl.num_programs(1) * n_blocks
            tl.store(partial + stride, tl.sum(x0_err * x0_err, axis=0) / D)
            tl.store(partial + 2 * stride, tl.sum(eps_err * eps_err, axis=0) / D)


def _launch(model_output, x0, x_t, noise, t, table, pred_table, grad_scale, learned, fixed_log_var_row, clip,
            tanh_cdf, channels_last):
    """Shared launcher: with grad_scale=None returns (vb (B,), MSEs (2 or 0, B)), else the gradient."""
    grid, block, num_warps = launch_config(x0)
    batch, per_sample = x0.shape[0], sample_numel(x0)
    channels = x0.shape[1] if channels_last else 1
    with_mse = noise is not None
    compute_grad = grad_scale is not None
    partials = torch.empty((3 if with_mse else 1, batch, grid[0]), device=x0.device, dtype=torch.float32)
    grad = torch.empty_like(model_output) if compute_grad else partials
    launch(
        vb_terms_kernel, grid,
        model_output, x0, x_t, noise if with_mse else x0, t, table, pred_table, partials,
        grad_scale if compute_grad else partials, grad,
        per_sample, table.shape[1], channels, grid[0], fixed_log_var_row,
        LEARNED=learned, CLIP=clip, TANH_CDF=tanh_cdf, WITH_MSE=with_mse, COMPUTE_GRAD=compute_grad,
        CHANNELS_LAST=channels_last, BLOCK=block, num_warps=num_warps, **CHECKED)
    if compute_grad:
        return grad
    # vb in bits/dim (B,) and the two MSEs (2 or 0, B), separate tensors (a custom op's outputs never alias)
    return partials[0].sum(1), partials[1:].sum(2)


def vb_terms_forward(model_output, x0, x_t, noise, t, table, pred_table, learned, fixed_log_var_row, clip,
                     tanh_cdf, channels_last):
    """(vb in bits/dim (B,), stats (2, B): x0_hat's and eps_hat's MSE, (0, B) without noise)."""
    return _launch(model_output, x0, x_t, noise, t, table, pred_table, None, learned, fixed_log_var_row, clip,
                   tanh_cdf, channels_last)


@torch.library.custom_op("fastddpm::vb_terms_bpd_backward", mutates_args=())
def vb_terms_backward(model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      table: torch.Tensor, pred_table: torch.Tensor, grad_vb: torch.Tensor, learned: bool,
                      fixed_log_var_row: int, clip: bool, tanh_cdf: bool, channels_last: bool) -> torch.Tensor:
    """d (sum_b grad_vb[b] vb[b]) / d model_output, recomputed from the inputs."""
    return _launch(model_output, x0, x_t, None, t, table, pred_table, grad_vb.to(torch.float32).contiguous(),
                   learned, fixed_log_var_row, clip, tanh_cdf, channels_last)


@vb_terms_backward.register_fake
def _(model_output, x0, x_t, t, table, pred_table, grad_vb, learned, fixed_log_var_row, clip, tanh_cdf, channels_last):
    return torch.empty_like(model_output)


@torch.library.custom_op("fastddpm::vb_terms_bpd", mutates_args=())
def vb_terms_op(model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor | None,
                t: torch.Tensor, table: torch.Tensor, pred_table: torch.Tensor, learned: bool, fixed_log_var_row: int,
                clip: bool, tanh_cdf: bool, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return vb_terms_forward(model_output, x0, x_t, noise, t, table, pred_table, learned, fixed_log_var_row, clip,
                            tanh_cdf, channels_last)


@vb_terms_op.register_fake
def _(model_output, x0, x_t, noise, t, table, pred_table, learned, fixed_log_var_row, clip, tanh_cdf, channels_last):
    batch = x0.shape[0]
    return x0.new_empty((batch,), dtype=torch.float32), \
        x0.new_empty((2 if noise is not None else 0, batch), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    model_output, x0, x_t, _, t, table, pred_table, *flags = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the statistics
    ctx.save_for_backward(model_output, x0, x_t, t, table, pred_table)
    ctx.flags = flags


def _backward(ctx, grad_vb, grad_stats):
    # Differentiable in the model output only; the MSE statistics carry no gradient.
    if grad_vb is None:
        return (None,) * 12
    model_output, x0, x_t, t, table, pred_table = ctx.saved_tensors
    grad = vb_terms_backward(model_output, x0, x_t, t, table, pred_table, grad_vb, *ctx.flags)
    return grad, None, None, None, None, None, None, None, None, None, None, None


vb_terms_op.register_autograd(_backward, setup_context=_setup_context)


def vb_terms_with_mse(model_output, x0, x_t, noise, t, table, pred_table, *, variance, clip_denoised, tanh_cdf):
    """(vb bits/dim, x0_hat MSE, eps_hat MSE) per sample, float32: the three statistics of
    improved-diffusion's calc_bpd_loop in one pass; `noise=None` skips the MSEs (None). Validated
    float32 / half tensors, clip_denoised False or True; `pred_table` the schedule's prediction table."""
    model_output, channels_last = kernel_layout(model_output)
    channels_last = channels_last and model_output.ndim == 4
    x0, x_t, noise = (like_layout(x, channels_last) for x in (x0, x_t, noise))
    args = (model_output, x0, x_t, noise, t, table, pred_table, variance == "learned_range",
            FIXED_LOG_VARIANCE_ROWS[variance], bool(clip_denoised), bool(tanh_cdf), channels_last)
    vb, stats = vb_terms_forward(*args) if eager(model_output) else vb_terms_op(*args)
    if noise is None:
        return vb, None, None
    return vb, stats[0], stats[1]

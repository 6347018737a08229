"""Fused training on the variational bound: improved DDPM's hybrid loss and the rescaled KL,
forward and gradient in one pass (docs/math.md sections 5 and 6).

Per sample b with timestep t, the output split into a mean half `out` and (learned_range) a
variance half `v`, x_t = sqrt_ab x0 + sqrt_1m_ab eps rebuilt in the kernel (rounded once to
x0's dtype, as q_sample stored it), eps read or regenerated from q_sample's Philox seed:

    hybrid:  L_b = w[t] mean((out - target)^2) + vlb_weight · vb_t(stop_grad(out), v)
    kl:      L_b = vlb_weight · vb_t(out, v)

vb_t is the bits/dim term of kernels/vlb.py (KL for t >= 1, decoder NLL for t = 0); the
unweighted MSE of the mean half is returned in both cases, as a statistic. The gradient is
written in the same pass: in the hybrid loss, the mean half's gradient comes from the MSE
only, `2 w[t] (out - target) / D`, and the variance half's from the vb term,
`vlb_weight / (D log 2) · d term / d log_var · (log betas[t] - log posterior var[t]) / 2`, where
for t = 0, with c = x0 - mu, s = exp(-log_var / 2), a = s (c + 1/255), b = s (c - 1/255),
d log(Phi(a) - Phi(b)) / d log_var = -(a phi(a) - b phi(b)) / (2 (Phi(a) - Phi(b))) (one-sided at
the edges; zero where the mass is clamped at 1e-12). The backward only scales it by the
incoming per-sample gradient.

Bytes per element of x0 (N): forward reads the output (2N for learned_range), x0 (1N) and the
noise (1N, 0 when regenerated) and writes the gradient (2N): 5N-6N; the backward's scaling
reads and writes the gradient (4N). Per-sample sums go through a (2, B, blocks) float32
buffer of per-program partials: deterministic, no atomics.

Matches `reference.hybrid_loss` (its autograd gives the reference gradient).
"""
import torch
import triton
import triton.language as tl

from ._common import (CHECKED, FIXED_LOG_VARIANCE_ROWS, SQRT_1M_AB, SQRT_AB, TARGET_EPS, TARGET_X0, channel_sizes,
                      kernel_layout, launch_config, like_layout, load_model_output, load_noise, load_timestep,
                      model_output_offsets, needs_grad, sample_numel, sample_offsets)
from ._launch import launch
from .vlb import INV_LN2, LN2, vb_element



@triton.jit
def vlb_loss_kernel(out_ptr, x0_ptr, noise_ptr, t_ptr, seed_ptr, table_ptr, pred_table_ptr, mse_weight_ptr,
                    partial_ptr, grad_ptr, vlb_weight,
                    D, T, C, HW, n_blocks, fixed_log_var_row,
                    HYBRID: tl.constexpr, LEARNED: tl.constexpr, DRAW_NOISE: tl.constexpr, TANH_CDF: tl.constexpr,
                    COMPUTE_GRAD: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    t = load_timestep(t_ptr, sample, T)
    x0 = tl.load(x0_ptr + base + offs, mask=mask).to(tl.float32)
    eps = load_noise(noise_ptr, seed_ptr, sample, offs, mask, base, D, C, HW, DRAW_NOISE, CHANNELS_LAST, BLOCK)
    # the x_t the model saw: q_sample's, rounded once to x0's dtype
    x_t = tl.load(table_ptr + SQRT_AB * T + t) * x0 + tl.load(table_ptr + SQRT_1M_AB * T + t) * eps
    x_t = x_t.to(x0_ptr.dtype.element_ty).to(tl.float32)
    out_offs, variance_shift = model_output_offsets(sample, offs, D, C, LEARNED, CHANNELS_LAST)
    mean_out, var_out = load_model_output(out_ptr, out_offs, variance_shift, mask, LEARNED)
    term, d_mean_out, d_var_out, _ = vb_element(x0, x_t, mean_out, var_out, t, T, table_ptr, pred_table_ptr,
                                                fixed_log_var_row, LEARNED, False, TANH_CDF)
    vb_scale = vlb_weight * INV_LN2 / D  # a Python float argument: float32 in the kernel
    partial = partial_ptr + sample * n_blocks + tl.program_id(0)
    tl.store(partial, tl.sum(tl.where(mask, term, 0.0), axis=0))
    target = tl.load(pred_table_ptr + TARGET_EPS * T + t) * eps + tl.load(pred_table_ptr + TARGET_X0 * T + t) * x0
    err = tl.where(mask, mean_out - target, 0.0)
    tl.store(partial + tl.num_programs(1) * n_blocks, tl.sum(err * err, axis=0))
    if HYBRID:
        grad_mean = (2.0 * tl.load(mse_weight_ptr + t) / D) * err  # the vb term sees a detached mean
    else:
        grad_mean = vb_scale * d_mean_out
    if COMPUTE_GRAD:
        tl.store(grad_ptr + out_offs, grad_mean.to(grad_ptr.dtype.element_ty), mask=mask)
        if LEARNED:
            tl.store(grad_ptr + out_offs + variance_shift, (vb_scale * d_var_out).to(grad_ptr.dtype.element_ty), mask=mask)


def hybrid_launch_config(x0):
    """launch_config, 1 warp for 2-byte types: 8-16 spill bytes at 2 or more warps on Triton 3.3 and 3.6."""
    return launch_config(x0, num_warps=1 if x0.element_size() == 2 else None)


def vlb_loss_forward(model_output, x0, noise, t, table, pred_table, mse_weights, seed, vlb_weight, hybrid, learned,
                     fixed_log_var_row, tanh_cdf, channels_last, compute_grad):
    """Launch on kernel-layout tensors. Returns per-sample (loss, unweighted MSE, vb bits/dim) and the
    gradient of sum_b loss_b w.r.t. the model output (empty unless compute_grad)."""
    grid, block, num_warps = hybrid_launch_config(x0)
    per_sample = sample_numel(x0)
    C, HW = channel_sizes(x0, channels_last)
    partials = torch.empty((2, x0.shape[0], grid[0]), device=x0.device, dtype=torch.float32)
    grad = torch.empty_like(model_output) if compute_grad else model_output.new_empty(0)
    draw = noise is None
    launch(
        vlb_loss_kernel, grid,
        model_output, x0, x0 if draw else noise, t, seed, table, pred_table, mse_weights, partials,
        grad if compute_grad else partials, float(vlb_weight),
        per_sample, table.shape[1], C, HW, grid[0], fixed_log_var_row,
        HYBRID=hybrid, LEARNED=learned, DRAW_NOISE=draw, TANH_CDF=tanh_cdf, COMPUTE_GRAD=compute_grad,
        CHANNELS_LAST=channels_last, BLOCK=block, num_warps=num_warps, **CHECKED)
    sums = partials.sum(2)
    vb = sums[0] / (per_sample * LN2)
    mse = sums[1] / per_sample
    loss = vlb_weight * vb + (mse_weights[t] * mse if hybrid else 0.0)
    return loss, mse, vb, grad


@torch.library.custom_op("fastddpm::vlb_loss", mutates_args=())
def vlb_loss_op(model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | None, t: torch.Tensor,
                table: torch.Tensor, pred_table: torch.Tensor, mse_weights: torch.Tensor, seed: torch.Tensor,
                vlb_weight: float, hybrid: bool, learned: bool, fixed_log_var_row: int, tanh_cdf: bool,
                channels_last: bool, compute_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return vlb_loss_forward(model_output, x0, noise, t, table, pred_table, mse_weights, seed, vlb_weight, hybrid,
                            learned, fixed_log_var_row, tanh_cdf, channels_last, compute_grad)


@vlb_loss_op.register_fake
def _(model_output, x0, noise, t, table, pred_table, mse_weights, seed, vlb_weight, hybrid, learned,
      fixed_log_var_row, tanh_cdf, channels_last, compute_grad):
    per_sample = x0.new_empty((x0.shape[0],), dtype=torch.float32)
    grad = torch.empty_like(model_output) if compute_grad else model_output.new_empty(0)
    return per_sample, torch.empty_like(per_sample), torch.empty_like(per_sample), grad


def _setup_context(ctx, inputs, output):
    _, mse, vb, grad = output
    ctx.mark_non_differentiable(mse, vb, grad)
    ctx.compute_grad = inputs[-1]
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, grad_mse, grad_vb, grad_grad):
    # The gradient was computed in the forward pass; the MSE and vb outputs are statistics.
    if grad_loss is None:
        return (None,) * 15
    if not ctx.compute_grad:
        raise RuntimeError("vlb_loss ran without its gradient (model_output did not require grad)")
    (grad,) = ctx.saved_tensors
    scale = grad_loss.reshape(-1, *([1] * (grad.ndim - 1))).to(grad.dtype)
    return (grad * scale,) + (None,) * 14


vlb_loss_op.register_autograd(_backward, setup_context=_setup_context)


def hybrid_loss(model_output, x0, noise, t, table, pred_table, mse_weights, seed, *, vlb_weight, reduction, loss,
                variance, tanh_cdf, return_terms):
    """The kernel path of `fastddpm.functional.hybrid_loss` on validated float32 / half tensors:
    `table`, `pred_table` and `mse_weights` the schedule's kernel, prediction and loss-weight tables."""
    model_output, channels_last = kernel_layout(model_output)
    channels_last = channels_last and model_output.ndim == 4
    x0, noise = like_layout(x0, channels_last), like_layout(noise, channels_last)
    compute_grad = needs_grad(model_output)
    per_sample, mse, vb, _ = vlb_loss_op(
        model_output, x0, noise, t, table, pred_table, mse_weights, seed if seed is not None else t.new_empty(0),
        float(vlb_weight), loss == "hybrid", variance == "learned_range", FIXED_LOG_VARIANCE_ROWS[variance],
        bool(tanh_cdf), channels_last, compute_grad)
    if reduction == "mean":
        per_sample = per_sample.mean()
    elif reduction == "sum":
        per_sample = per_sample.sum()
    if return_terms:
        return per_sample, {"mse": mse.detach(), "vb": vb.detach()}
    return per_sample

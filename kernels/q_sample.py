"""Fused q-sample (math.md section 3): x_t = sqrt_ab[t] x0 + sqrt_1m_ab[t] eps.

Bytes per element: read x0, read eps or draw it in the kernel, write x_t (2N with drawn
noise, the floor), plus N if the drawn noise is asked for. Matches `reference.q_sample`.
"""
import torch
import triton
import triton.language as tl


from ._common import SQRT_1M_AB, SQRT_AB, channel_sizes, launch_config, sample_offsets, standard_normal



@triton.jit
def q_sample_kernel(x0_ptr, noise_ptr, out_ptr, noise_out_ptr, t_ptr, table_ptr, seed_ptr,
                    D, T, C, HW,
                    DRAW_NOISE: tl.constexpr, STORE_NOISE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    BLOCK: tl.constexpr):
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    t = tl.load(t_ptr + sample)
    sqrt_ab = tl.load(table_ptr + SQRT_AB * T + t)
    sqrt_1m_ab = tl.load(table_ptr + SQRT_1M_AB * T + t)
    x0 = tl.load(x0_ptr + base + offs, mask=mask).to(tl.float32)
    if DRAW_NOISE:
        eps = standard_normal(seed_ptr, sample, offs, D, C, HW, CHANNELS_LAST, BLOCK)
        if STORE_NOISE:
            tl.store(noise_out_ptr + base + offs, eps.to(noise_out_ptr.dtype.element_ty), mask=mask)
    else:
        eps = tl.load(noise_ptr + base + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + base + offs, (sqrt_ab * x0 + sqrt_1m_ab * eps).to(out_ptr.dtype.element_ty), mask=mask)


def q_sample_forward(x0, t, noise, table, seed, channels_last, store_noise):
    """Launch on kernel-layout tensors (see _common.kernel_layout). Returns (x_t, drawn noise or empty)."""
    out = torch.empty_like(x0)
    draw = noise is None
    noise_out = torch.empty_like(x0) if draw and store_noise else x0.new_empty(0)
    grid, block, num_warps = launch_config(x0)
    C, HW = channel_sizes(x0, channels_last)
    q_sample_kernel[grid](
        x0, x0 if draw else noise, out, noise_out if noise_out.numel() else out, t, table, seed,
        x0[0].numel(), table.shape[1], C, HW,
        DRAW_NOISE=draw, STORE_NOISE=draw and store_noise, CHANNELS_LAST=channels_last,
        BLOCK=block, num_warps=num_warps)
    return out, noise_out


@torch.library.custom_op("fastddpm::q_sample", mutates_args=())
def q_sample_op(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None, table: torch.Tensor,
                seed: torch.Tensor, channels_last: bool, store_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return q_sample_forward(x0, t, noise, table, seed, channels_last, store_noise)


@q_sample_op.register_fake
def _(x0, t, noise, table, seed, channels_last, store_noise):
    stored = noise is None and store_noise
    return torch.empty_like(x0), torch.empty_like(x0) if stored else x0.new_empty(0)


def _setup_context(ctx, inputs, output):
    x0, t, noise, table, *_ = inputs
    ctx.save_for_backward(t, table)
    ctx.noise_given = noise is not None


def _backward(ctx, grad_x_t, grad_noise_out):
    t, table = ctx.saved_tensors
    shape = (-1,) + (1,) * (grad_x_t.ndim - 1)
    grad_x0 = grad_x_t * table[SQRT_AB.value][t].reshape(shape).to(grad_x_t.dtype)
    grad_noise = grad_x_t * table[SQRT_1M_AB.value][t].reshape(shape).to(grad_x_t.dtype) if ctx.noise_given else None
    return grad_x0, None, grad_noise, None, None, None, None


q_sample_op.register_autograd(_backward, setup_context=_setup_context)

"""Fused q-sample (docs/math.md section 3): x_t = sqrt_ab[t] x0 + sqrt_1m_ab[t] eps.

Bytes per element: read x0, read eps or draw it in the kernel, write x_t (2N with drawn noise,
the floor), plus N if the drawn noise is asked for. With DRAW_T the timesteps come from the
same launch: `t_ptr` holds (seed, r_0 … r_{B-1}), one `torch.randint` of uniform non-negative
int64s, t_b = r_b mod T is written out (8 bytes a sample) and the seed is its first element,
so a training step draws t and its noise seed in one RNG launch. Matches `reference.q_sample`.
"""
import torch
import triton
import triton.language as tl

from ._common import (CHECKED, SQRT_1M_AB, SQRT_AB, channel_sizes, eager, kernel_layout, launch_config, like_layout,
                      load_noise, load_timestep, needs_grad, sample_numel, sample_offsets)
from ._launch import launch


@triton.jit
def q_sample_kernel(x0_ptr, noise_ptr, out_ptr, noise_out_ptr, t_ptr, t_out_ptr, table_ptr, seed_ptr,
                    D, T, C, HW,
                    DRAW_NOISE: tl.constexpr, STORE_NOISE: tl.constexpr, DRAW_T: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """x_t = sqrt_ab[t] x0 + sqrt_1m_ab[t] eps, eps read or drawn from Philox (seed, sample, index)."""
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    if DRAW_T:
        t = tl.load(t_ptr + 1 + sample) % T  # uniform on [0, T) up to a bias below 2**-50
        if tl.program_id(0) == 0:
            tl.store(t_out_ptr + sample, t)
    else:
        t = load_timestep(t_ptr, sample, T)
    sqrt_ab = tl.load(table_ptr + SQRT_AB * T + t)
    sqrt_1m_ab = tl.load(table_ptr + SQRT_1M_AB * T + t)
    x0 = tl.load(x0_ptr + base + offs, mask=mask).to(tl.float32)
    eps = load_noise(noise_ptr, seed_ptr, sample, offs, mask, base, D, C, HW, DRAW_NOISE, CHANNELS_LAST, BLOCK)
    if STORE_NOISE:  # drawn noise only (the launcher sets it so)
        tl.store(noise_out_ptr + base + offs, eps.to(noise_out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base + offs, (sqrt_ab * x0 + sqrt_1m_ab * eps).to(out_ptr.dtype.element_ty), mask=mask)


def q_sample_forward(x0, t, noise, table, seed, channels_last, store_noise, draw_t=False):
    """Launch on kernel-layout tensors (see _common.kernel_layout). `draw_t`: t is the (B + 1,)
    randint tensor described above, used as the seed too. Returns (x_t, drawn noise or None,
    the drawn t or None)."""
    out = torch.empty_like(x0)
    draw = noise is None
    noise_out = torch.empty_like(x0) if draw and store_noise else None
    t_out = torch.empty(x0.shape[0], dtype=torch.int64, device=x0.device) if draw_t else None
    grid, block, num_warps = launch_config(x0)
    C, HW = channel_sizes(x0, channels_last)
    launch(
        q_sample_kernel, grid,
        x0, x0 if draw else noise, out, out if noise_out is None else noise_out, t, t if t_out is None else t_out,
        table, seed if draw and not draw_t else t,
        sample_numel(x0), table.shape[1], C, HW,
        DRAW_NOISE=draw, STORE_NOISE=noise_out is not None, DRAW_T=draw_t, CHANNELS_LAST=channels_last,
        BLOCK=block, num_warps=num_warps, **CHECKED)
    return out, noise_out, t_out


def _input_grads(grad_x_t, t, table, needs_input_grad):
    """dx_t/dx0 = sqrt_ab[t] and dx_t/dnoise = sqrt_1m_ab[t] times grad_x_t, each where it is needed."""
    def scaled(row):
        return grad_x_t * table[row.value][t].reshape((-1,) + (1,) * (grad_x_t.ndim - 1)).to(grad_x_t.dtype)

    return (scaled(SQRT_AB) if needs_input_grad[0] else None), (scaled(SQRT_1M_AB) if needs_input_grad[2] else None)


class _QSample(torch.autograd.Function):
    """The eager path with gradients: x_t is linear in x0 and the noise."""

    @staticmethod
    def forward(ctx, x0, t, noise, table, seed, channels_last, store_noise):
        ctx.save_for_backward(t, table)
        out, noise_out, _ = q_sample_forward(x0, t, noise, table, seed, channels_last, store_noise)
        if noise_out is not None:
            ctx.mark_non_differentiable(noise_out)
        return out, noise_out

    @staticmethod
    def backward(ctx, grad_x_t, _grad_noise_out):
        grad_x0, grad_noise = _input_grads(grad_x_t, *ctx.saved_tensors, ctx.needs_input_grad)
        return grad_x0, None, grad_noise, None, None, None, None


@torch.library.custom_op("fastddpm::q_sample", mutates_args=())
def q_sample_op(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None, table: torch.Tensor,
                seed: torch.Tensor | None, channels_last: bool, store_noise: bool,
                draw_t: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, noise_out, t_out = q_sample_forward(x0, t, noise, table, seed, channels_last, store_noise, draw_t)
    return out, x0.new_empty(0) if noise_out is None else noise_out, t.new_empty(0) if t_out is None else t_out


@q_sample_op.register_fake
def _(x0, t, noise, table, seed, channels_last, store_noise, draw_t):
    stored = noise is None and store_noise
    t_out = t.new_empty(x0.shape[:1]) if draw_t else t.new_empty(0)
    return torch.empty_like(x0), torch.empty_like(x0) if stored else x0.new_empty(0), t_out


def _setup_context(ctx, inputs, output):
    x0, t, noise, table, *_ = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(t, table)


def _backward(ctx, grad_x_t, _grad_noise_out, _grad_t):
    if grad_x_t is None:
        return (None,) * 8
    grad_x0, grad_noise = _input_grads(grad_x_t, *ctx.saved_tensors, ctx.needs_input_grad)
    return grad_x0, None, grad_noise, None, None, None, None, None


q_sample_op.register_autograd(_backward, setup_context=_setup_context)


def q_sample(x0, t, noise, table, seed, *, store_noise=False):
    """x_t (and the drawn noise, or None) for validated float32 / half tensors; `noise=None`
    draws it in the kernel from `seed` (a 1-element int64 tensor). x_t keeps x0's layout."""
    x0, channels_last = kernel_layout(x0)
    noise = like_layout(noise, channels_last)
    if torch.compiler.is_compiling():
        x_t, noise_out, _ = q_sample_op(x0, t, noise, table, seed, channels_last, store_noise, False)
        return x_t, noise_out if noise is None and store_noise else None
    if needs_grad(x0, noise):
        return _QSample.apply(x0, t, noise, table, seed, channels_last, store_noise)
    return q_sample_forward(x0, t, noise, table, seed, channels_last, store_noise)[:2]


def q_sample_drawing_t(x0, random, table):
    """(x_t, t) for a training step: t_b = random[1 + b] mod T and the noise seed random[0],
    `random` a (B + 1,) tensor of uniform non-negative int64s (see the module docstring)."""
    x0, channels_last = kernel_layout(x0)
    if not eager(x0):
        x_t, _, t = q_sample_op(x0, random, None, table, None, channels_last, False, True)
    else:
        x_t, _, t = q_sample_forward(x0, random, None, table, None, channels_last, False, True)
    return x_t, t

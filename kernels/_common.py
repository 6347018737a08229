"""Launch helpers and device functions shared by the kernels.

Every elementwise kernel runs on a (cdiv(D, BLOCK), B) grid, D the elements per sample:
program (i, b) covers elements [i*BLOCK, (i+1)*BLOCK) of sample b, so per-sample
coefficients are one scalar load per program and the memory of each sample is one dense
block (contiguous, or channels_last for 4-D tensors: see `kernel_layout`).
"""
import os

import torch
import triton
import triton.language as tl

from fastddpm.schedule import KERNEL_ROWS

MAX_BATCH = 65535  # grid axis 1 limit

# Rows of the schedule's kernel table (`NoiseSchedule.kernel_table`), as constants the kernels can read.
SQRT_AB = tl.constexpr(KERNEL_ROWS.index("sqrt_alphas_cumprod"))
SQRT_1M_AB = tl.constexpr(KERNEL_ROWS.index("sqrt_one_minus_alphas_cumprod"))
SQRT_RECIP_AB = tl.constexpr(KERNEL_ROWS.index("sqrt_recip_alphas_cumprod"))
SQRT_RECIPM1_AB = tl.constexpr(KERNEL_ROWS.index("sqrt_recipm1_alphas_cumprod"))
COEF1 = tl.constexpr(KERNEL_ROWS.index("posterior_mean_coef1"))
COEF2 = tl.constexpr(KERNEL_ROWS.index("posterior_mean_coef2"))
POSTERIOR_VARIANCE = tl.constexpr(KERNEL_ROWS.index("posterior_variance"))
LOG_VAR_CLIPPED = tl.constexpr(KERNEL_ROWS.index("posterior_log_variance_clipped"))
LOG_BETAS = tl.constexpr(KERNEL_ROWS.index("log_betas"))
AB = tl.constexpr(KERNEL_ROWS.index("alphas_cumprod"))
FIXED_LARGE_LOG_VAR = tl.constexpr(KERNEL_ROWS.index("fixed_large_log_variance"))


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_layout(x):
    """(tensor, channels_last): `x` itself if each sample is one dense block, else one copy."""
    if x.is_contiguous():
        return x, False
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def like_layout(x, channels_last):
    """`x` with the memory layout of the tensor it is paired with (a copy only if it differs)."""
    if x is None:
        return None
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def launch_config(x, num_warps=None):
    """Grid, BLOCK and num_warps for an elementwise pass over x of shape (B, ...): one 16-byte access
    per tensor a thread (4 float32 or 8 bfloat16/float16 elements), by default over 8 warps for
    4-byte types and 1 for 2-byte ones. The largest programs ptxas builds without spills for every
    kernel on Triton 3.2-3.9 (scripts/triton_versions.sh): 8 float32 elements a thread, or 8 bfloat16
    over more warps, spill 8-40 bytes beside the in-kernel noise on some of those versions."""
    batch, per_sample = x.shape[0], x[0].numel()
    if batch > MAX_BATCH:
        raise ValueError(f"batch size {batch} exceeds {MAX_BATCH}, the kernels' grid limit: split the batch")
    if per_sample >= 2 ** 31:
        raise ValueError(f"{per_sample} elements per sample: the kernels index a sample with int32 (< 2**31)")
    per_thread = 16 // x.dtype.itemsize
    warps = num_warps or (8 if per_thread <= 4 else 1)
    block = min(32 * warps * per_thread, max(32 * per_thread, triton.next_power_of_2(per_sample)))
    return (triton.cdiv(per_sample, block), batch), block, block // (32 * per_thread)


def channel_sizes(x, channels_last):
    """(C, H*W) for channels_last tensors, else (1, 1): all the logical index needs."""
    if channels_last:
        return x.shape[1], x.shape[2] * x.shape[3]
    return 1, 1


@triton.jit
def sample_offsets(D, BLOCK: tl.constexpr):
    """This program's sample b, element offsets within the sample, mask and flat base offset."""
    sample = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return sample, offs, offs < D, sample.to(tl.int64) * D


@triton.jit
def model_output_offsets(sample, offs, D, C, WIDE_OUTPUT: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Flat offsets of the first C channels of the model output for x_t's offsets `offs`, and the
    distance from there to the variance half when the output has 2C channels (WIDE_OUTPUT).

    Contiguous: a sample is a 2D block, the variance half starts at +D. channels_last: memory
    (h, w, c) with 2C channels, so x_t's position hw*C + c is hw*2C + c and the variance is at +C.
    """
    if WIDE_OUTPUT:
        base = sample.to(tl.int64) * (2 * D)
        if CHANNELS_LAST:
            out_offs = base + (offs // C) * (2 * C) + offs % C
            variance_shift = C
        else:
            out_offs = base + offs
            variance_shift = D
    else:
        out_offs = sample.to(tl.int64) * D + offs
        variance_shift = 0
    return out_offs, variance_shift


@triton.jit
def load_model_output(out_ptr, out_offs, variance_shift, mask, LEARNED: tl.constexpr):
    """The mean part of a model output in float32 and, for a 2C-channel output, its variance part
    (the mean part again otherwise); offsets from `model_output_offsets`."""
    mean_out = tl.load(out_ptr + out_offs, mask=mask).to(tl.float32)
    if LEARNED:
        var_out = tl.load(out_ptr + out_offs + variance_shift, mask=mask).to(tl.float32)
    else:
        var_out = mean_out
    return mean_out, var_out


@triton.jit
def standard_normal(seed_ptr, sample, offs, D, C, HW, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """N(0, 1) noise for element `offs` of `sample`, keyed on (seed, logical element index).

    Element j of sample b takes component j % 4 of Philox's randn4x at counter b*ceil(D/4) + j//4,
    so the noise does not depend on dtype or memory layout, and a contiguous block draws four
    normals per Philox call. For channels_last memory, offs are memory positions (h, w, c)
    and are mapped back to the logical index c*HW + hw.
    """
    seed = tl.load(seed_ptr)
    groups = (D + 3) // 4
    if CHANNELS_LAST:
        logical = (offs % C) * HW + offs // C
        counter = sample.to(tl.int64) * groups + logical // 4
        n0, n1, n2, n3 = tl.randn4x(seed, counter)
        lane = logical % 4
        z = tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))
    else:
        first_group = tl.program_id(0) * (BLOCK // 4)
        counter = sample.to(tl.int64) * groups + first_group + tl.arange(0, BLOCK // 4)
        n0, n1, n2, n3 = tl.randn4x(seed, counter)
        # join stacks on a new last axis, so row g of join(join(n0, n2), join(n1, n3)) reads n0 n1 n2 n3
        z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])
    return z

"""Launch helpers and device functions shared by the kernels.

Every elementwise kernel runs on a (cdiv(D, BLOCK), B) grid, D the elements per sample:
program (i, b) covers elements [i*BLOCK, (i+1)*BLOCK) of sample b, so per-sample
coefficients are one scalar load per program and the memory of each sample is one dense
block (contiguous, or channels_last for 4-D tensors: see `kernel_layout`).
"""
import dataclasses
import functools
import math
import os

import torch
import triton
import triton.language as tl

from fastddpm.schedule import KERNEL_ROWS, PREDICTION_ROWS, device_with_index

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
# the row of each variance type's fixed log variance (learned_range: the lower end of its range)
FIXED_LOG_VARIANCE_ROWS = {"fixed_small": LOG_VAR_CLIPPED.value, "fixed_large": FIXED_LARGE_LOG_VAR.value,
                           "learned_range": LOG_VAR_CLIPPED.value}

# Rows of the schedule's prediction table (`NoiseSchedule.prediction_table`, PREDICTION_ROWS).
X0_XT, X0_OUT, EPS_XT, EPS_OUT, TARGET_EPS, TARGET_X0 = (tl.constexpr(PREDICTION_ROWS.index(name)) for name in (
    "x0_xt", "x0_out", "eps_xt", "eps_out", "target_eps", "target_x0"))


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _checked_launch_options():
    """Launch options that keep the kernels' `tl.device_assert` range checks of t: debug on,
    integer-overflow sanitizing (which debug would also turn on, where Triton has it) off."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # a Triton without the NVIDIA backend: nothing to launch there
        return {"debug": True}
    fields = {field.name for field in dataclasses.fields(CUDAOptions)}
    return {"debug": True, **({"sanitize_overflow": False} if "sanitize_overflow" in fields else {})}


def _enable_interpreter_asserts():
    """Triton's interpreter builds every kernel without debug, so `tl.device_assert` would
    never fire there: turn asserts on, overflow sanitizing off (as CHECKED does on GPUs)."""
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    fields = {field.name for field in dataclasses.fields(options)}
    changes = {name: value for name, value in (("debug", True), ("sanitize_overflow", False)) if name in fields}
    interpreter.interpreter_builder.options = dataclasses.replace(options, **changes)


def _squeeze_interpreter_index():
    """Triton 3.2-3.6's interpreter reads a tensor used as a loop bound (`finish_reduction`'s
    loops to tl.num_programs) as int() of a one-element array, which NumPy 2.4 rejects; 3.7
    squeezes the array first. Do as 3.7 does."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patch_squeezed(tensor, *scope):
        patch(tensor, *scope)
        index = lambda self: int(self.handle.data.squeeze())  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patch_squeezed


# Every kernel that gathers by a caller's timestep is launched with these options. The
# interpreter takes no such launch options (Triton 3.2 rejects them): it gets its asserts here.
if interpreting():
    _enable_interpreter_asserts()
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7):
        _squeeze_interpreter_index()
    CHECKED = {}
else:
    CHECKED = _checked_launch_options()


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
    per tensor a thread (4 float32 or 8 bfloat16/float16 elements), over 8 warps unless told. The
    largest programs ptxas builds without spills for every kernel on Triton 3.2-3.9
    (scripts/triton_versions.sh): 8 float32 elements a thread spill 8-40 bytes beside the in-kernel
    noise on some of those versions; the loss kernels take fewer warps for 2-byte types."""
    return _launch_config(x.shape, x.dtype, num_warps)


@functools.lru_cache(maxsize=1024)  # computed once a shape: host time per call
def _launch_config(shape, dtype, num_warps):
    batch, per_sample = shape[0], math.prod(shape[1:])
    if batch > MAX_BATCH:
        raise ValueError(f"batch size {batch} exceeds {MAX_BATCH}, the kernels' grid limit: split the batch")
    if per_sample >= 2 ** 31:
        raise ValueError(f"{per_sample} elements per sample: the kernels index a sample with int32 (< 2**31)")
    per_thread = 16 // dtype.itemsize
    # plain ints, not triton.cdiv / next_power_of_2 (Python functions under Triton 3.9): host time
    block = min(32 * (num_warps or 8) * per_thread, max(32 * per_thread, 1 << (per_sample - 1).bit_length()))
    return ((per_sample + block - 1) // block, batch), block, block // (32 * per_thread)


def sample_numel(x):
    """Elements per sample of a (B, ...) tensor with B >= 1 (no view, unlike x[0].numel())."""
    return x.numel() // x.shape[0]


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
def load_timestep(t_ptr, sample, T):
    """t of `sample`, checked where it is loaded: out of [0, T) a device assert names t (kernels
    launched with CHECKED), and the index is clamped so that nothing is read out of bounds."""
    t = tl.load(t_ptr + sample)
    tl.device_assert((t >= 0) & (t < T), "t must lie in [0, T): one timestep index per sample")
    return tl.minimum(tl.maximum(t, 0), T - 1)


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
def load_noise(noise_ptr, seed_ptr, sample, offs, mask, base, D, C, HW,
               DRAW_NOISE: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """N(0, 1) noise: drawn from the Philox seed (`standard_normal`, q-sample's stream) or read from `noise`."""
    if DRAW_NOISE:
        z = standard_normal(seed_ptr, sample, offs, D, C, HW, CHANNELS_LAST, BLOCK)
    else:
        z = tl.load(noise_ptr + base + offs, mask=mask).to(tl.float32)
    return z


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


# -- reductions over the whole grid, finished by the last program ------------------------------

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
FINISH_ROWS = tl.constexpr(256)  # samples summed at once by the finishing program
_COUNTER_SLOTS, _SLOT_INTS = 64, 4  # slots 16 bytes apart: every slot pointer has the same alignment
_counters = {}


def reduction_counter(device):
    """A zeroed int32 arrival counter for `finish_reduction`, which leaves it at zero again.

    One slot of a ring per device, taken in turn, so that launches in flight at once on
    different streams do not share a counter; allocated on first use (so once, outside any
    CUDA graph capture, for the devices the schedules build their tables on). A launch that
    raises (an assert under Triton's interpreter; on a GPU a failed kernel ends the context)
    leaves its slot part-counted: its launcher zeroes it again then."""
    device = device_with_index(device)
    ring = _counters.get(device)
    if ring is None:
        slots = torch.zeros(_COUNTER_SLOTS, _SLOT_INTS, dtype=torch.int32, device=device)
        ring = _counters[device] = [[slot[:1] for slot in slots], 0]
    views, turn = ring
    ring[1] = (turn + 1) % _COUNTER_SLOTS
    return views[turn]


@triton.jit
def finish_reduction(partial_ptr, out_ptr, counter_ptr, PER_SAMPLE: tl.constexpr):
    """After each program of the (blocks, B) grid has stored its float32 partial at
    partial_ptr[sample * blocks + block]: the last program to arrive sums them in a fixed order
    (deterministic, whoever arrives last) into out, the B per-sample sums (PER_SAMPLE) or their
    total, and resets the counter. One launch for a reduction that would otherwise take another."""
    tl.debug_barrier()  # every thread's part of this program's partial is stored before it counts in
    blocks = tl.num_programs(0)
    samples = tl.num_programs(1)
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if arrived == blocks * samples - 1:
        total = 0.0
        for start in range(0, samples, FINISH_ROWS):
            rows = start + tl.arange(0, FINISH_ROWS)
            acc = tl.zeros([FINISH_ROWS], dtype=tl.float32)
            for block in range(0, blocks):
                # .cg: from L2, where the other programs' partials are, never a stale L1 line
                acc += tl.load(partial_ptr + rows.to(tl.int64) * blocks + block, mask=rows < samples, other=0.0,
                               cache_modifier=".cg")
            if PER_SAMPLE:
                tl.store(out_ptr + rows, acc, mask=rows < samples)
            else:
                total += tl.sum(acc, axis=0)
        if not PER_SAMPLE:
            tl.store(out_ptr, total)
        tl.atomic_xchg(counter_ptr, 0)


def needs_grad(*tensors):
    """True where autograd records a gradient for any of `tensors` (None allowed)."""
    if torch.is_grad_enabled():
        for x in tensors:  # a loop, not any() over a generator: host time
            if x is not None and x.requires_grad:
                return True
    return False


def eager(*tensors):
    """True where a call may launch its kernel directly, skipping its custom op: eager mode (not
    traced by torch.compile) with no gradient to record for any of `tensors` (None allowed)."""
    return not torch.compiler.is_compiling() and not needs_grad(*tensors)

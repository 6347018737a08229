"""Fused diffusion training loss (math.md section 5), its gradient computed in the same pass.

Per sample b: L_b = w[t_b] · mean((pred - target)²), target = a[t] eps + c[t] x0 with
(a, c) = (1, 0) for eps, (0, 1) for x0, (sqrt_ab, -sqrt_1m_ab) for v, gathered from the
kernel table; w from `schedule.loss_weight_table` (any weighting, or a user table). The
reduction over the batch ("mean", "sum" or "none") is done in the op, deterministically:
each program writes its partial sum to a float32 (B, n_blocks) buffer, then one fixed-shape
`torch.sum` (no float atomics).

The gradient dL/dpred = 2 w (pred - target) / (D · B for "mean", D otherwise) is written in
the forward pass (Liger-Kernel's fused cross entropy trick); the backward only scales it by
grad_output in place, and each program of that pass returns at once where its grad_output
is exactly 1 (the usual `loss.backward()`), a decision made on the device, no host sync.

Bytes per element (N = one full tensor), eps prediction with the noise regenerated from
q-sample's seed (`standard_normal`, bit-identical to what q-sample added): forward reads pred
and writes grad (2N, the floor of math.md section 7); a given noise tensor adds 1N; x0 and v
targets add 1N to read x0; the x0 target reads no noise. Backward: 0N when grad_output is 1,
else 2N (read and rewrite grad). Recomputing in backward instead would cost 3N for eps
(forward 1N, backward 2N): writing the gradient early wins whenever grad_output is 1, and
costs 1N more otherwise (loss scaling, gradient accumulation). Under torch.compile the
backward is traced, so the scaling is a plain multiply (2N) that Inductor may fuse into the
model's next backward op.

The precomputed gradient is handed over to autograd by the first backward, so a second
backward through the same graph (retain_graph=True) raises a clear error. Float64 inputs
go to `reference.diffusion_loss` (float64 loss, as the reference); the kernel accumulates
float32 for float32, bfloat16 and float16 preds, the loss is float32 and the gradient has
pred's dtype. Matches `reference.diffusion_loss`.
"""
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from fastddpm import reference

from ._common import (SQRT_1M_AB, SQRT_AB, channel_sizes, kernel_layout, launch_config, like_layout, sample_offsets,
                      standard_normal)


# Which of eps and x0 each prediction's target reads: (uses eps, uses x0).
TARGET_TERMS = {"eps": (True, False), "x0": (False, True), "v": (True, True)}
SECOND_BACKWARD_MESSAGE = (
    "the fused diffusion_loss hands its precomputed gradient to the first backward; backward through "
    "it twice (retain_graph=True) is not supported: compute the loss again, or use set_backend('reference')")


@triton.jit
def diffusion_loss_kernel(pred_ptr, x0_ptr, noise_ptr, grad_ptr, partial_ptr, t_ptr, table_ptr, weight_ptr, seed_ptr,
                          D, T, C, HW,
                          USE_EPS: tl.constexpr, USE_X0: tl.constexpr, DRAW_NOISE: tl.constexpr,
                          STORE_GRAD: tl.constexpr, MEAN_OVER_BATCH: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                          BLOCK: tl.constexpr):
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    t = tl.load(t_ptr + sample)
    weight = tl.load(weight_ptr + t)
    pred = tl.load(pred_ptr + base + offs, mask=mask).to(tl.float32)
    if USE_EPS:
        if DRAW_NOISE:
            eps = standard_normal(seed_ptr, sample, offs, D, C, HW, CHANNELS_LAST, BLOCK)
        else:
            eps = tl.load(noise_ptr + base + offs, mask=mask).to(tl.float32)
    if USE_X0:
        x0 = tl.load(x0_ptr + base + offs, mask=mask).to(tl.float32)
    if USE_EPS and USE_X0:  # v = sqrt_ab eps - sqrt_1m_ab x0
        target = tl.load(table_ptr + SQRT_AB * T + t) * eps - tl.load(table_ptr + SQRT_1M_AB * T + t) * x0
    elif USE_EPS:
        target = eps
    else:
        target = x0
    diff = tl.where(mask, pred - target, 0.0)
    weight_per_element = weight / D
    tl.store(partial_ptr + sample * tl.num_programs(0) + tl.program_id(0),
             weight_per_element * tl.sum(diff * diff, axis=0))
    if STORE_GRAD:
        grad_scale = 2.0 * weight_per_element
        if MEAN_OVER_BATCH:
            grad_scale = grad_scale / tl.num_programs(1)
        tl.store(grad_ptr + base + offs, (grad_scale * diff).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_grad_kernel(grad_ptr, grad_output_ptr, D, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    """grad *= grad_output (a scalar, or one value per sample), in place; nothing to do where it is 1."""
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    if PER_SAMPLE:
        scale = tl.load(grad_output_ptr + sample).to(tl.float32)
    else:
        scale = tl.load(grad_output_ptr).to(tl.float32)
    if scale != 1.0:
        grad = tl.load(grad_ptr + base + offs, mask=mask).to(tl.float32)
        tl.store(grad_ptr + base + offs, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def diffusion_loss_forward(pred, x0, noise, t, table, weights, seed, prediction, reduction, channels_last,
                           store_grad):
    """Launch on kernel-layout tensors (x0 and noise in pred's layout, or None where the target
    does not read them). Returns (loss, grad or an empty tensor)."""
    use_eps, use_x0 = TARGET_TERMS[prediction]
    draw = use_eps and noise is None
    grad = torch.empty_like(pred) if store_grad else pred.new_empty(0)
    grid, block, num_warps = launch_config(pred)
    partials = torch.empty(grid[1], grid[0], device=pred.device, dtype=torch.float32)
    C, HW = channel_sizes(pred, channels_last)
    diffusion_loss_kernel[grid](
        pred, x0 if use_x0 else pred, noise if use_eps and not draw else pred, grad if store_grad else pred,
        partials, t, table, weights, seed,
        pred[0].numel(), table.shape[1], C, HW,
        USE_EPS=use_eps, USE_X0=use_x0, DRAW_NOISE=draw, STORE_GRAD=store_grad,
        MEAN_OVER_BATCH=reduction == "mean", CHANNELS_LAST=channels_last, BLOCK=block, num_warps=num_warps)
    if reduction == "none":
        return partials.sum(1), grad
    loss = partials.sum()
    return (loss / grid[1] if reduction == "mean" else loss), grad


def scale_grad_(grad, grad_output):
    """Launch the in-place scaling of the stored gradient by grad_output (shape () or (B,))."""
    grid, block, num_warps = launch_config(grad)
    scale_grad_kernel[grid](grad, grad_output.contiguous(), grad[0].numel(), PER_SAMPLE=grad_output.ndim == 1,
                            BLOCK=block, num_warps=num_warps)


@torch.library.custom_op("fastddpm::diffusion_loss", mutates_args=())
def diffusion_loss_op(pred: torch.Tensor, x0: torch.Tensor | None, noise: torch.Tensor | None, t: torch.Tensor,
                      table: torch.Tensor, weights: torch.Tensor, seed: torch.Tensor, prediction: str,
                      reduction: str, channels_last: bool, store_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return diffusion_loss_forward(pred, x0, noise, t, table, weights, seed, prediction, reduction, channels_last,
                                  store_grad)


@diffusion_loss_op.register_fake
def _(pred, x0, noise, t, table, weights, seed, prediction, reduction, channels_last, store_grad):
    loss = pred.new_empty(pred.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    return loss, torch.empty_like(pred) if store_grad else pred.new_empty(0)


@torch.library.custom_op("fastddpm::diffusion_loss_scale_grad_", mutates_args=("grad",))
def scale_grad_op(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    scale_grad_(grad, grad_output)


@scale_grad_op.register_fake
def _(grad, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    pred, x0, noise, t, table, *_, prediction, _reduction, _channels_last, _store_grad = inputs
    _loss, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.grad_handed_over = False  # the first backward owns grad (see SECOND_BACKWARD_MESSAGE)
    ctx.prediction = prediction
    ctx.x0_given, ctx.noise_given = x0 is not None, noise is not None
    ctx.save_for_backward(grad, t, table)


def _backward(ctx, grad_loss, _grad_of_grad):
    if ctx.grad_handed_over:
        raise RuntimeError(SECOND_BACKWARD_MESSAGE)
    ctx.grad_handed_over = True
    grad, t, table = ctx.saved_tensors
    shape = (-1,) + (1,) * (grad.ndim - 1)
    if is_fake(grad):
        # Traced by torch.compile: a plain multiply that Inductor can fuse into what follows
        # (an in-place op on a saved output would also break AOTAutograd's partitioner).
        grad = (grad * grad_loss.reshape(shape)).to(grad.dtype)
    else:
        torch.ops.fastddpm.diffusion_loss_scale_grad_(grad, grad_loss)
    grad_x0 = grad_noise = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # target = a eps + c x0, so dL/dx0 = -c dL/dpred and dL/dnoise = -a dL/dpred
        v = ctx.prediction == "v"
        a = table[SQRT_AB.value][t].reshape(shape) if v else 1.0
        c = -table[SQRT_1M_AB.value][t].reshape(shape) if v else 1.0
        if ctx.x0_given and ctx.needs_input_grad[1]:
            grad_x0 = -c * grad
        if ctx.noise_given and ctx.needs_input_grad[2]:
            grad_noise = -a * grad
    return grad, grad_x0, grad_noise, None, None, None, None, None, None, None, None


diffusion_loss_op.register_autograd(_backward, setup_context=_setup_context)


def diffusion_loss(model_output, x0, noise, t, schedule, *, prediction="eps", weighting="simple", gamma=5.0,
                   reduction="mean", seed=None):
    """The fused loss on validated arguments (see `fastddpm.functional.diffusion_loss`).

    `noise=None` regenerates q-sample's noise in the kernel from `seed` (a 1-element int64
    tensor). Float64 inputs run `reference.diffusion_loss` (with the seeded noise drawn once).
    """
    use_eps, use_x0 = TARGET_TERMS[prediction]
    if torch.float64 in (model_output.dtype, x0.dtype, noise.dtype if noise is not None else None):
        if noise is None:
            x0_layout, channels_last = kernel_layout(x0)
            _, noise = torch.ops.fastddpm.q_sample(x0_layout, t, None, schedule.kernel_table(x0.device), seed,
                                                   channels_last, True)
        return reference.diffusion_loss(model_output, x0, noise, t, schedule, prediction=prediction,
                                         weighting=weighting, gamma=gamma, reduction=reduction)
    pred, channels_last = kernel_layout(model_output)
    inputs = (model_output, x0 if use_x0 else None, noise if use_eps else None)
    store_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    draw = use_eps and noise is None
    loss, _ = torch.ops.fastddpm.diffusion_loss(
        pred, like_layout(inputs[1], channels_last), like_layout(inputs[2], channels_last), t,
        schedule.kernel_table(pred.device), schedule.loss_weight_table(weighting, prediction, gamma, pred.device),
        seed if draw else pred.new_empty(0, dtype=torch.int64), prediction, reduction, channels_last, store_grad)
    return loss

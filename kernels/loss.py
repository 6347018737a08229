"""Fused diffusion training loss (docs/math.md section 5), its gradient and its batch reduction in one launch.

Per sample b: L_b = w[t] · mean((pred - target)²), target = a[t] eps + c[t] x0 with (a, c) =
(1, 0) for eps, (0, 1) for x0, (sqrt_ab, -sqrt_1m_ab) for v, gathered from the kernel table; w
from `NoiseSchedule.loss_weight_table` (any weighting, or a user table). Each program stores
its weighted partial sum (the 1/D of the per-sample mean and the 1/B of the batch mean folded
in); the last program to finish sums the partials in a fixed order (`finish_reduction`): the
"mean", "sum" or "none" result with no second launch and no float atomics.

The gradient dL/dpred = 2 w (pred - target) / (D · B for "mean", D otherwise) is written in the
same pass (Liger-Kernel's fused cross entropy trick); the backward scales it by grad_output in
place, each program returning at once where grad_output is exactly 1 (the usual
`loss.backward()`), decided on the device with no host sync.

Bytes per element (N = one full tensor), eps prediction with the noise regenerated from
q-sample's seed (`standard_normal`, bit-identical to what q-sample added): read pred, write grad
(2N, the floor of docs/math.md section 7); a given noise tensor adds 1N; x0 and v targets add 1N to
read x0; the x0 target reads no noise. Backward: 0N when grad_output is 1, else 2N.

Two ways in, the same kernels: eager calls go through a plain `torch.autograd.Function` (the
least host time per call); under torch.compile the `fastddpm::diffusion_loss` custom op, whose
traced backward is a plain multiply that Inductor can fuse. A second backward through the same
graph (retain_graph=True) recomputes the gradient, since the first one handed its buffer over.
Float32, bfloat16 and float16 inputs (float64 goes to the reference in `fastddpm.functional`):
float32 accumulation, a float32 loss, the gradient in pred's dtype. Matches `reference.diffusion_loss`.
"""
import torch
import triton
import triton.language as tl

from ._common import (CHECKED, REDUCTIONS, SQRT_1M_AB, SQRT_AB, channel_sizes, finish_reduction, kernel_layout,
                      launch_config, like_layout, load_noise, load_timestep, needs_grad, reduction_counter, sample_numel,
                      sample_offsets)
from ._launch import launch

# Which of eps and x0 each prediction's target reads: (uses eps, uses x0).
TARGET_TERMS = {"eps": (True, False), "x0": (False, True), "v": (True, True)}


@triton.jit
def diffusion_loss_kernel(pred_ptr, x0_ptr, noise_ptr, grad_ptr, partial_ptr, counter_ptr, loss_ptr, t_ptr,
                          table_ptr, weight_ptr, seed_ptr, D, T, C, HW,
                          USE_EPS: tl.constexpr, USE_X0: tl.constexpr, DRAW_NOISE: tl.constexpr,
                          STORE_GRAD: tl.constexpr, REDUCTION: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                          BLOCK: tl.constexpr):
    """L_b = w[t_b] mean((pred - (a eps + c x0))²), reduced over the batch; grad = dL/dpred."""
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    t = load_timestep(t_ptr, sample, T)
    weight = tl.load(weight_ptr + t) / D
    if REDUCTION == 1:  # the batch mean
        weight = weight / tl.num_programs(1)
    pred = tl.load(pred_ptr + base + offs, mask=mask).to(tl.float32)
    if USE_EPS:
        eps = load_noise(noise_ptr, seed_ptr, sample, offs, mask, base, D, C, HW, DRAW_NOISE, CHANNELS_LAST, BLOCK)
    if USE_X0:
        x0 = tl.load(x0_ptr + base + offs, mask=mask).to(tl.float32)
    if USE_EPS and USE_X0:  # v = sqrt_ab eps - sqrt_1m_ab x0
        target = tl.load(table_ptr + SQRT_AB * T + t) * eps - tl.load(table_ptr + SQRT_1M_AB * T + t) * x0
    elif USE_EPS:
        target = eps
    else:
        target = x0
    diff = tl.where(mask, pred - target, 0.0)
    tl.store(partial_ptr + sample * tl.num_programs(0) + tl.program_id(0), weight * tl.sum(diff * diff, axis=0))
    if STORE_GRAD:
        tl.store(grad_ptr + base + offs, (2.0 * weight * diff).to(grad_ptr.dtype.element_ty), mask=mask)
    finish_reduction(partial_ptr, loss_ptr, counter_ptr, REDUCTION == 0)


@triton.jit
def scale_grad_kernel(grad_ptr, grad_output_ptr, grad_output_stride, D, BLOCK: tl.constexpr):
    """grad *= grad_output[sample * stride] (stride 0: a scalar), in place; nothing to do where it is 1."""
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    scale = tl.load(grad_output_ptr + sample * grad_output_stride).to(tl.float32)
    if scale != 1.0:
        grad = tl.load(grad_ptr + base + offs, mask=mask).to(tl.float32)
        tl.store(grad_ptr + base + offs, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def diffusion_loss_forward(pred, x0, noise, t, table, weights, seed, prediction, reduction, channels_last,
                           store_grad):
    """Launch on kernel-layout tensors (x0 and noise in pred's layout, or None where the target
    does not read them; seed used only when the noise is regenerated). Returns (loss, grad or None)."""
    use_eps, use_x0 = TARGET_TERMS[prediction]
    draw = use_eps and noise is None
    grid, block, num_warps = loss_launch_config(pred)
    grad = torch.empty_like(pred) if store_grad else None
    partials = torch.empty(grid[0] * grid[1], device=pred.device, dtype=torch.float32)
    loss = torch.empty(grid[1] if reduction == "none" else (), device=pred.device, dtype=torch.float32)
    C, HW = channel_sizes(pred, channels_last)
    counter = reduction_counter(pred.device)
    try:
        launch(diffusion_loss_kernel, grid,
               pred, x0 if use_x0 else pred, pred if draw or not use_eps else noise, pred if grad is None else grad,
               partials, counter, loss, t, table, weights, seed if draw else t,
               sample_numel(pred), table.shape[1], C, HW,
               USE_EPS=use_eps, USE_X0=use_x0, DRAW_NOISE=draw, STORE_GRAD=store_grad,
               REDUCTION=REDUCTIONS[reduction], CHANNELS_LAST=channels_last, BLOCK=block, num_warps=num_warps,
               **CHECKED)
    except BaseException:
        counter.zero_()  # an interrupted launch leaves the slot part-counted (see reduction_counter)
        raise
    return loss, grad


def loss_launch_config(pred):
    """launch_config over 4 warps (512 float32 or 1024 bfloat16 elements a program): at 8 warps ptxas
    spills 8 bytes beside the in-kernel noise and the finishing branch (Triton 3.2 float32, 3.9
    bfloat16), at 2 on 3.2 and 3.9 too; 4 is clean on 3.2-3.9, and programs of this size keep the
    per-program loads (t, weight, seed, partial, counter) under 1% of the bytes."""
    return launch_config(pred, num_warps=4)


def scale_grad_(grad, grad_output):
    """Scale the stored gradient by grad_output (shape () or (B,), any stride: no copy) in place."""
    grid, block, num_warps = launch_config(grad)
    launch(scale_grad_kernel, grid, grad, grad_output, grad_output.stride(0) if grad_output.ndim else 0,
           sample_numel(grad), BLOCK=block, num_warps=num_warps)


def _target_grads(grad, prediction, t, table, needs_x0, needs_noise):
    """dL/dx0 and dL/dnoise from dL/dpred: target = a eps + c x0, so they are -c and -a times it."""
    v = prediction == "v"
    shape = (-1,) + (1,) * (grad.ndim - 1)
    grad_x0 = -(-table[SQRT_1M_AB.value][t].reshape(shape) if v else 1.0) * grad if needs_x0 else None
    grad_noise = -(table[SQRT_AB.value][t].reshape(shape) if v else 1.0) * grad if needs_noise else None
    return grad_x0, grad_noise


class _DiffusionLoss(torch.autograd.Function):
    """The eager path: the kernel in forward, the in-place scaling of its gradient in backward."""

    @staticmethod
    def forward(ctx, pred, x0, noise, rest):
        """rest: (t, table, weights, seed, prediction, reduction, channels_last), what no gradient reaches;
        one argument, so that autograd looks at four instead of ten (host time)."""
        loss, ctx.grad = diffusion_loss_forward(pred, x0, noise, *rest, True)
        ctx.rest = rest
        if x0 is None and noise is None:  # the usual eps target: saving the Nones costs 3 µs
            ctx.save_for_backward(pred)
        else:
            ctx.save_for_backward(pred, x0, noise)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None  # handed over to autograd, which may keep it as pred.grad
        if grad is None:  # a second backward through the graph (retain_graph=True): recompute
            pred, x0, noise = (*ctx.saved_tensors, None, None)[:3]  # pred alone where x0 and noise are None
            grad = diffusion_loss_forward(pred, x0, noise, *ctx.rest, True)[1]
        scale_grad_(grad, grad_loss)
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return grad, None, None, None
        t, table, _, _, prediction, _, _ = ctx.rest
        grad_x0, grad_noise = _target_grads(grad, prediction, t, table, ctx.needs_input_grad[1],
                                            ctx.needs_input_grad[2])
        return grad, grad_x0, grad_noise, None


@torch.library.custom_op("fastddpm::diffusion_loss", mutates_args=())
def diffusion_loss_op(pred: torch.Tensor, x0: torch.Tensor | None, noise: torch.Tensor | None, t: torch.Tensor,
                      table: torch.Tensor, weights: torch.Tensor, seed: torch.Tensor | None, prediction: str,
                      reduction: str, channels_last: bool, store_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = diffusion_loss_forward(pred, x0, noise, t, table, weights, seed, prediction, reduction,
                                        channels_last, store_grad)
    return loss, pred.new_empty(0) if grad is None else grad


@diffusion_loss_op.register_fake
def _(pred, x0, noise, t, table, weights, seed, prediction, reduction, channels_last, store_grad):
    loss = pred.new_empty(pred.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    return loss, torch.empty_like(pred) if store_grad else pred.new_empty(0)


def _setup_context(ctx, inputs, output):
    pred, x0, noise, t, table, *_, prediction, _reduction, _channels_last, _store_grad = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the `grad` output
    ctx.prediction = prediction
    ctx.save_for_backward(output[1], t, table)


def _backward(ctx, grad_loss, _grad_of_grad):
    grad, t, table = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError("diffusion_loss ran without its gradient (store_grad=False)")
    # out of place: traced by torch.compile, a multiply that Inductor fuses into what follows
    grad = (grad * grad_loss.reshape((-1,) + (1,) * (grad.ndim - 1))).to(grad.dtype)
    grad_x0, grad_noise = _target_grads(grad, ctx.prediction, t, table, ctx.needs_input_grad[1],
                                        ctx.needs_input_grad[2])
    return grad, grad_x0, grad_noise, None, None, None, None, None, None, None, None


diffusion_loss_op.register_autograd(_backward, setup_context=_setup_context)


def diffusion_loss(model_output, x0, noise, t, table, weights, seed, *, prediction, reduction):
    """The fused loss of validated float32 / half tensors (see `fastddpm.functional.diffusion_loss`).

    `noise=None` regenerates q-sample's noise in the kernel from `seed` (a 1-element int64
    tensor); `table` and `weights` are the schedule's float32 kernel and loss-weight tables."""
    use_eps, use_x0 = TARGET_TERMS[prediction]
    pred, channels_last = kernel_layout(model_output)
    x0 = like_layout(x0, channels_last) if use_x0 else None
    noise = like_layout(noise, channels_last) if use_eps else None
    if torch.compiler.is_compiling():
        return diffusion_loss_op(pred, x0, noise, t, table, weights, seed, prediction, reduction, channels_last,
                                 needs_grad(pred, x0, noise))[0]
    if not needs_grad(pred, x0, noise):
        return diffusion_loss_forward(pred, x0, noise, t, table, weights, seed, prediction, reduction, channels_last,
                                      False)[0]
    return _DiffusionLoss.apply(pred, x0, noise, (t, table, weights, seed, prediction, reduction, channels_last))

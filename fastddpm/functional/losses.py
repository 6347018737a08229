"""The training losses (docs/math.md sections 5-6): the weighted MSE and training on the bound."""
import torch

from fastddpm import reference, torch_ops
from fastddpm._checks import (check_bool, check_choice, check_float, check_like, check_prediction, check_schedule,
                              check_timesteps, draw_seed)
from fastddpm.backend import use_triton
from fastddpm.kernels import hybrid as hybrid_kernel
from fastddpm.kernels import loss as loss_kernel
from fastddpm.kernels import q_sample as q_sample_kernel
from fastddpm.options import LOSS_TYPES, VARIANCES

from ._args import check_loss_options, check_noise_or_seed


def diffusion_loss(model_output, x0, noise, t, schedule, *, prediction="eps", weighting="simple", gamma=5.0,
                   reduction="mean", seed=None):
    """The weighted MSE of docs/math.md section 5: mean over the batch of w[t_b] · mean((pred - target)²).

    reduction "none" returns the per-sample vector (float32, float64 for float64 inputs).
    Give the noise either as a tensor, or as `noise=None, seed=s` with `s` the seed given to
    `q_sample(x0, t, None, schedule, seed=s)`: the fused kernel then regenerates the very
    noise q-sample added (Triton's Philox stream), never stored. That needs the triton
    backend; on the reference backend pass the noise itself (`q_sample(..., return_noise=True)`).
    """
    prediction = check_prediction(prediction)
    check_schedule(schedule)
    check_float(x0, "x0")
    check_like(model_output, "model_output", x0, "x0")
    check_loss_options(schedule, weighting, reduction)
    triton_path = use_triton(x0)
    t = check_timesteps(t, "t", x0, schedule, values=not triton_path)
    seed = check_noise_or_seed(noise, seed, x0, triton_path)
    return checked_diffusion_loss(model_output, x0, noise, t, schedule, prediction, weighting, gamma, reduction,
                                  seed, triton_path)


def checked_diffusion_loss(model_output, x0, noise, t, schedule, prediction, weighting, gamma, reduction, seed,
                           triton_path):
    """`diffusion_loss` on validated arguments (`DiffusionLoss` calls it directly): float64 on the
    reference, else the kernel or the PyTorch path."""
    if torch.float64 in (model_output.dtype, x0.dtype, noise.dtype if noise is not None else None):
        noise = noise if not triton_path else drawn_noise(x0, t, noise, seed, schedule)
        return reference.diffusion_loss(model_output, x0, noise, t, schedule, prediction=prediction,
                                        weighting=weighting, gamma=gamma, reduction=reduction)
    if not triton_path:
        return torch_ops.diffusion_loss(model_output, x0, noise, t, schedule, prediction=prediction,
                                        weighting=weighting, gamma=gamma, reduction=reduction)
    device = x0.device
    return loss_kernel.diffusion_loss(model_output, x0, noise, t, schedule.kernel_table(device),
                                      schedule.loss_weight_table(weighting, prediction, gamma, device), seed,
                                      prediction=prediction, reduction=reduction)


def training_noise(x0, schedule, t=None, generator=None):
    """(x_t, t, seed, noise) of a training step on validated x0: t drawn uniformly unless given
    (valid by construction: not checked). On the kernels, one RNG launch draws the noise seed and
    t together, q-sample draws the noise from the seed and the loss regenerates it (noise None);
    on the PyTorch path the noise is torch.randn's, held in float32 for half x0 (seed None)."""
    device = x0.device
    if use_triton(x0):
        random = draw_seed(device, generator, count=x0.shape[0] + 1 if t is None else 1)
        table = schedule.kernel_table(device)
        if t is None:
            x_t, t = q_sample_kernel.q_sample_drawing_t(x0, random, table)
        else:
            x_t = q_sample_kernel.q_sample(x0, t, None, table, random)[0]
        return x_t, t, random[:1], None
    if t is None:  # the kernels' t for the same draw
        t = draw_seed(device, generator, count=x0.shape[0] + 1)[1:] % schedule.num_timesteps
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    if x0.dtype == torch.float64:
        return reference.q_sample(x0, t, noise, schedule), t, None, noise
    noise = noise.float()  # read by q-sample and the loss: one cast for half x0, not two
    return torch_ops.q_sample(x0, t, noise, schedule), t, None, noise


def drawn_noise(x0, t, noise, seed, schedule):
    """The noise itself: given, or the float32 noise q-sample's kernel draws from `seed`."""
    if noise is not None:
        return noise
    return q_sample_kernel.q_sample(x0.float(), t, None, schedule.kernel_table(x0.device), seed,
                                    store_noise=True)[1]


def hybrid_loss(model_output, x0, noise, t, schedule, *, prediction="eps", weighting="simple", gamma=5.0,
                vlb_weight=None, reduction="mean", seed=None, loss="hybrid", variance="learned_range",
                tanh_cdf=False, return_terms=False):
    """Training on the bound, per sample b (x_t = q_sample(x0, t, noise) is rebuilt, not passed):

    loss="hybrid" (improved DDPM; variance="learned_range", a 2C-channel output):
        w[t] · mean((out[:, :C] - target)²) + vlb_weight · vb_t, with the predicted mean detached
        inside vb_t so that it trains only the variance half out[:, C:];
    loss="kl" (improved-diffusion's RESCALED_KL, any variance): vlb_weight · vb_t.

    vlb_weight: default T / 1000 for "hybrid" (the paper's lambda = 0.001 on L_vlb), T for "kl".
    weighting/gamma: the MSE's weight table (see `diffusion_loss`). `noise=None` regenerates the
    noise in the kernel from `seed`, the 1-element int64 tensor q_sample drew it from (Triton
    backend only). reduction "none" gives the per-sample float32 vector (to multiply by importance
    weights). return_terms=True also returns {"mse": unweighted MSE, "vb": vb_t in bits/dim}, detached.
    The fused kernel computes the gradient in the forward pass; the backward only scales it.
    """
    prediction = check_prediction(prediction)
    check_schedule(schedule)
    check_float(x0, "x0")
    check_choice(loss, "loss", LOSS_TYPES)
    check_choice(variance, "variance", VARIANCES)
    if loss == "hybrid" and variance != "learned_range":
        raise ValueError(f"loss='hybrid' trains a learned variance: variance must be 'learned_range', got {variance!r}")
    channels = 2 * x0.shape[1] if variance == "learned_range" else x0.shape[1]
    check_like(model_output, "model_output", x0, "x0", (x0.shape[0], channels, *x0.shape[2:]))
    check_loss_options(schedule, weighting, reduction)
    triton_path = use_triton(x0)
    t = check_timesteps(t, "t", x0, schedule, values=not triton_path)
    seed = check_noise_or_seed(noise, seed, x0, triton_path)
    if vlb_weight is None:
        vlb_weight = schedule.num_timesteps / 1000.0 if loss == "hybrid" else float(schedule.num_timesteps)
    if isinstance(vlb_weight, bool) or not isinstance(vlb_weight, (int, float)) or not 0 <= vlb_weight < float("inf"):
        raise ValueError(f"vlb_weight must be a finite float >= 0 or None, got {vlb_weight!r}")
    check_bool(tanh_cdf, "tanh_cdf")
    check_bool(return_terms, "return_terms")
    options = dict(prediction=prediction, weighting=weighting, gamma=gamma, vlb_weight=vlb_weight,
                   reduction=reduction, loss=loss, variance=variance, tanh_cdf=tanh_cdf, return_terms=return_terms)
    if not triton_path:
        return reference.hybrid_loss(model_output, x0, noise, t, schedule, **options)
    if torch.float64 in (model_output.dtype, x0.dtype, noise.dtype if noise is not None else None):
        return reference.hybrid_loss(model_output, x0, drawn_noise(x0, t, noise, seed, schedule), t, schedule,
                                     **options)
    device = x0.device
    return hybrid_kernel.hybrid_loss(model_output, x0, noise, t, schedule.kernel_table(device),
                                     schedule.prediction_table(prediction, device),
                                     schedule.loss_weight_table(weighting, prediction, gamma, device), seed,
                                     vlb_weight=vlb_weight, reduction=reduction, loss=loss, variance=variance,
                                     tanh_cdf=tanh_cdf, return_terms=return_terms)

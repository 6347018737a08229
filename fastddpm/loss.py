"""DiffusionLoss: one DDPM training loss call, noise drawn in the kernel and never stored."""
from typing import NamedTuple

import torch
from torch import nn

from . import functional, reference
from ._checks import check_choice, check_float, check_generator, check_like, check_schedule, draw_seed
from .backend import use_triton
from .elbo import LossSecondMomentSampler
from .kernels import q_sample as q_sample_kernel
from .options import PREDICTIONS, REDUCTIONS, TIMESTEP_SAMPLERS, VARIANCES, WEIGHTINGS
from .schedule import KERNEL_ROWS

SQRT_AB_ROW = KERNEL_ROWS.index("sqrt_alphas_cumprod")
SQRT_1M_AB_ROW = KERNEL_ROWS.index("sqrt_one_minus_alphas_cumprod")
HALF_DTYPES = (torch.bfloat16, torch.float16)
# ATen's reduction codes. The loss calls aten::mse_loss itself: F.mse_loss's broadcast_tensors
# adds an op and two autograd views per call for shapes the callers have already matched.
NO_REDUCTION, MEAN_REDUCTION = 0, 1


class NoiseState(NamedTuple):
    """What `DiffusionLoss.loss` needs of the noising step: t, and the noise's seed (triton
    backend: the loss kernel regenerates the noise) or the noise itself (reference backend;
    drawn in x0's dtype, held in float32 for half inputs)."""
    t: torch.Tensor
    seed: torch.Tensor | None
    noise: torch.Tensor | None
    importance_weights: torch.Tensor | None = None  # 1 / (T p_t) when t is importance-sampled


class DiffusionLoss(nn.Module):
    """The DDPM training loss of math.md section 5, noise included.

    `loss = loss_fn(model, x0, **model_kwargs)` draws t uniformly and a noise seed (from
    `generator` if given, else the global RNG, so `torch.manual_seed` makes runs
    reproducible), computes x_t with the noise drawn inside the q-sample kernel, calls
    `model(x_t, t, **model_kwargs)` and returns the fused loss, which regenerates the same
    noise from the seed: no noise tensor is ever written (4 full-tensor passes per step on
    the triton backend: read x0, write x_t, read pred, write grad). On the reference backend
    (CPU under "auto") the same calls materialise the noise and run `eager_diffusion_loss`.
    Under torch.compile(fullgraph=True) leave `generator` None (Dynamo cannot trace one):
    the global RNG then gives the same graph every step.

    For loops that call the model themselves::

        x_t, t, state = loss_fn.noise(x0)
        loss = loss_fn.loss(model(x_t, t), x0, state)

    Training on the bound (improved DDPM): `variance="learned_range"` makes the model output
    2C channels and the loss the hybrid `L_simple + vlb_weight · vb_t` (mean detached inside
    vb_t; vlb_weight defaults to T/1000); `loss_type="kl"` is improved-diffusion's rescaled KL
    (vb_t · T) for any variance. `timestep_sampler="loss-second-moment"` (or a
    `LossSecondMomentSampler`) draws t by importance and weights each sample by 1/(T p_t); its
    update is a collective under torch.distributed, so keep it out of compiled regions.

    Args:
        schedule: a NoiseSchedule (kept as `.schedule`).
        prediction: what the model predicts: "eps", "x0" or "v".
        weighting: "simple", "vlb", "snr", "min_snr", "p2", or a tensor of length T.
        gamma: the min-SNR clip (Hang et al.: 5).
        reduction: "mean" (default), "sum" or "none" (the per-sample losses).
        variance: "fixed_small" (default), "fixed_large" or "learned_range".
        loss_type: "mse" (default; "hybrid" with a learned variance) or "kl".
        vlb_weight: the weight of vb_t in the hybrid or KL loss (None: T/1000 or T).
        timestep_sampler: "uniform" (default), "loss-second-moment" or a LossSecondMomentSampler.
    """

    def __init__(self, schedule, prediction="eps", weighting="simple", gamma=5.0, reduction="mean", *,
                 variance="fixed_small", loss_type="mse", vlb_weight=None, timestep_sampler="uniform"):
        super().__init__()
        check_schedule(schedule)
        check_choice(prediction, "prediction", PREDICTIONS)
        check_choice(reduction, "reduction", REDUCTIONS)
        check_choice(variance, "variance", VARIANCES)
        check_choice(loss_type, "loss_type", ("mse", "kl"))
        if isinstance(timestep_sampler, str):
            check_choice(timestep_sampler, "timestep_sampler", TIMESTEP_SAMPLERS)
            timestep_sampler = None if timestep_sampler == "uniform" else LossSecondMomentSampler(schedule)
        elif not isinstance(timestep_sampler, LossSecondMomentSampler):
            raise TypeError("timestep_sampler must be 'uniform', 'loss-second-moment' or a LossSecondMomentSampler, "
                            f"got {type(timestep_sampler).__name__}")
        if isinstance(weighting, torch.Tensor):
            # validated and made a float64 CPU table once, not at every call
            weighting = schedule.loss_weights(weighting)
        else:
            check_choice(weighting, "weighting", WEIGHTINGS)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ValueError(f"gamma must be a number > 0, got {gamma!r}")
        self.schedule = schedule
        self.prediction = prediction
        self.weighting = weighting
        self.gamma = float(gamma)
        self.reduction = reduction
        self.variance = variance
        # the bound enters through hybrid_loss: a learned variance, or the KL objective
        self.bound_loss = "kl" if loss_type == "kl" else ("hybrid" if variance == "learned_range" else None)
        self.vlb_weight = vlb_weight
        self.timestep_sampler = timestep_sampler

    def forward(self, model, x0, *, generator=None, **model_kwargs):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_t, t, **model_kwargs), got {type(model).__name__}")
        x_t, t, state = self.noise(x0, generator=generator)
        return self.loss(model(x_t, t, **model_kwargs), x0, state)

    def noise(self, x0, *, generator=None):
        """(x_t, t, state): t drawn uniformly on x0's device, x_t = q_sample(x0, t, fresh noise).

        One RNG launch draws the noise seed and the uniform t together (see
        `kernels/q_sample.py`); t is valid by construction and not checked again."""
        check_float(x0, "x0")
        check_generator(generator)
        device = x0.device
        if self.timestep_sampler is None:
            random = draw_seed(device, generator, count=x0.shape[0] + 1)
            weights = None
        else:
            t, weights = self.timestep_sampler.sample(x0.shape[0], generator=generator)
            t, weights = t.to(device), weights.to(device)
        if use_triton(x0):
            table = self.schedule.kernel_table(device)
            if weights is None:
                x_t, t = q_sample_kernel.q_sample_drawing_t(x0, random, table)
                return x_t, t, NoiseState(t, random[:1], None)
            seed = draw_seed(device, generator)
            return q_sample_kernel.q_sample(x0, t, None, table, seed)[0], t, NoiseState(t, seed, None, weights)
        if weights is None:
            t = random[1:] % self.schedule.num_timesteps  # the kernel path's t for the same draw
        # The noise the reference draws (in x0's dtype), kept in the compute dtype where q-sample
        # and the loss both read it (half inputs: one cast, not two).
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        if x0.dtype in HALF_DTYPES:
            noise = noise.float()
        return eager_q_sample(x0, t, noise, self.schedule), t, NoiseState(t, None, noise, weights)

    def loss(self, model_output, x0, state):
        """The loss of `model_output` for the x_t that `noise(x0)` returned with `state`."""
        if not isinstance(state, NoiseState):
            raise TypeError(f"state must be the NoiseState returned by DiffusionLoss.noise, got {type(state).__name__}")
        weighted = state.importance_weights is not None
        reduction = "none" if weighted else self.reduction
        if self.bound_loss is None:
            # t and the noise come from `noise` (valid by construction): check only what the caller gives here
            check_float(x0, "x0")
            check_like(model_output, "model_output", x0, "x0")
            triton_path = state.noise is None
            losses = functional.checked_diffusion_loss(model_output, x0, state.noise, state.t, self.schedule,
                                                       self.prediction, self.weighting, self.gamma, reduction,
                                                       state.seed, triton_path)
        else:
            losses = functional.hybrid_loss(model_output, x0, state.noise, state.t, self.schedule,
                                            prediction=self.prediction, weighting=self.weighting, gamma=self.gamma,
                                            reduction=reduction, seed=state.seed, vlb_weight=self.vlb_weight,
                                            loss=self.bound_loss, variance=self.variance)
        if not weighted:
            return losses
        self.timestep_sampler.update(state.t, losses.detach())
        return reference.reduce_per_sample(losses * state.importance_weights, self.reduction)

    def extra_repr(self):
        weighting = "tensor" if isinstance(self.weighting, torch.Tensor) else repr(self.weighting)
        return (f"T={self.schedule.num_timesteps}, prediction={self.prediction!r}, weighting={weighting}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}, variance={self.variance!r}, "
                f"bound_loss={self.bound_loss!r}, timestep_sampler={type(self.timestep_sampler).__name__}")


def eager_diffusion_loss(model_output, x0, noise, t, schedule, *, prediction="eps", weighting="simple", gamma=5.0,
                         reduction="mean"):
    """`reference.diffusion_loss` through PyTorch's fused MSE kernels: the CPU path of
    `functional.diffusion_loss`, with the memory passes of the eager peers (the mean MSE for
    one weight for all; for per-sample weights, diffusers' min-SNR form, the MSE without
    reduction then the per-sample mean) and coefficients and weights gathered from the
    schedule's cached float32 tables. No argument checks: the callers validate (same shapes
    and device). Same dtypes as the reference: float64 math and loss for float64 inputs, else float32.
    """
    target = _training_target(x0, t, noise, schedule, prediction)
    pred = model_output if model_output.dtype == target.dtype else model_output.to(target.dtype)
    if isinstance(weighting, str) and weighting == "simple" and reduction != "none":
        loss = torch.ops.aten.mse_loss(pred, target, MEAN_REDUCTION)  # the mean of the per-sample means
        return loss * x0.shape[0] if reduction == "sum" else loss
    if target.dtype == torch.float64:
        weights = schedule.loss_weights(weighting, prediction, gamma).to(t.device)
    else:
        weights = schedule.loss_weight_table(weighting, prediction, gamma, t.device)
    per_sample = torch.ops.aten.mse_loss(pred, target, NO_REDUCTION).flatten(1).mean(1)
    return reference.reduce_per_sample(weights.index_select(0, t) * per_sample, reduction)


def eager_q_sample(x0, t, noise, schedule):
    """`reference.q_sample` (x_t = sqrt_ab[t] x0 + sqrt_1m_ab[t] noise) for valid t, with the
    coefficients of the cached float32 kernel table (float64 tables for float64 inputs) and
    one temporary: x_t is built in place in the scaled x0 (plus the casts of half inputs).
    Fastest with the noise already in the compute dtype (float32 for half inputs)."""
    sqrt_ab, sqrt_1m_ab = _forward_coefficients(x0, t, schedule)
    if x0.dtype == sqrt_ab.dtype:
        return (x0 * sqrt_ab).addcmul_(noise, sqrt_1m_ab)
    return x0.to(sqrt_ab.dtype).mul_(sqrt_ab).addcmul_(noise, sqrt_1m_ab).to(x0.dtype)


def _forward_coefficients(x0, t, schedule):
    """(sqrt_ab[t], sqrt_1m_ab[t]) as (B, 1, …, 1) tensors in x0's compute dtype."""
    if x0.dtype == torch.float64:
        return (reference.gather(schedule.sqrt_alphas_cumprod, t, x0),
                reference.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0))
    rows = schedule.kernel_table(x0.device).index_select(1, t).view(len(KERNEL_ROWS), -1, *([1] * (x0.ndim - 1)))
    return rows[SQRT_AB_ROW], rows[SQRT_1M_AB_ROW]


def _training_target(x0, t, noise, schedule, prediction):
    """`reference.training_target`: eps, x0 or v = sqrt_ab eps - sqrt_1m_ab x0, in the compute dtype."""
    compute = reference.compute_dtype(x0)
    if prediction == "eps":
        return noise if noise.dtype == compute else noise.to(compute)
    if prediction == "x0":
        return x0.to(compute)
    sqrt_ab, sqrt_1m_ab = _forward_coefficients(x0, t, schedule)
    return sqrt_ab * noise.to(compute) - sqrt_1m_ab * x0.to(compute)

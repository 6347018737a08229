"""DiffusionLoss: one DDPM training loss call, a thin module over `functional.diffusion_loss` and
`functional.hybrid_loss`; on the kernels the noise is drawn in q-sample and never stored."""
import math
import warnings
from typing import NamedTuple

import torch
from torch import nn

from . import functional, reference
from ._checks import (check_bool, check_choice, check_float, check_generator, check_like, check_model,
                      check_model_dtype, check_prediction, check_schedule, model_output, schedule_default)
from .options import REDUCTIONS, TIMESTEP_SAMPLERS, VARIANCES, WEIGHTINGS
from .resample import LossSecondMomentSampler


class NoiseState(NamedTuple):
    """What `DiffusionLoss.loss` needs of the noising step: t, and the noise's seed (triton
    backend: the loss kernel regenerates the noise) or the noise itself (reference backend;
    drawn in x0's dtype, held in float32 for half inputs)."""
    t: torch.Tensor
    seed: torch.Tensor | None
    noise: torch.Tensor | None
    importance_weights: torch.Tensor | None = None  # 1 / (T p_t) when t is importance-sampled


class DiffusionLoss(nn.Module):
    """The DDPM training loss of docs/math.md section 5, noise included.

    `loss = loss_fn(model, x0, **model_kwargs)` draws t uniformly and a noise seed (from
    `generator` if given, else the global RNG, so `torch.manual_seed` makes runs
    reproducible), computes x_t with the noise drawn inside the q-sample kernel, calls
    `model(x_t, t, **model_kwargs)` and returns the fused loss, which regenerates the same
    noise from the seed: no noise tensor is ever written (4 full-tensor passes per step on
    the triton backend: read x0, write x_t, read pred, write grad). On the PyTorch path
    (CPU under "auto") the same calls materialise the noise. The model may return a tensor, a
    diffusers output's `.sample`, a tuple or a dict with "sample". `loss.backward()` may run twice
    (retain_graph=True) on every backend: the kernel hands its precomputed gradient to the first
    backward and recomputes it for a second. `state_dict()` holds the importance sampler's history.
    Under torch.compile(fullgraph=True) leave `generator` None (Dynamo cannot trace one):
    the global RNG then gives the same graph every step. x0: float data in [-1, 1] (uint8 is
    refused, values far outside [-1, 1] warned about once); float64 x0 runs the float64 reference
    and needs a float64 model (a float32 one is refused before it runs).

    Self-conditioning (Chen et al. 2022, as denoising-diffusion-pytorch): with
    `self_condition=True` the model is called as `model(x_t, t, x_self_cond, **model_kwargs)`,
    x_self_cond None for half the batches and, for the other half (a coin per call), the x0_hat of
    a first call `model(x_t, t, None)` under no_grad; `sample(..., self_condition=True)` passes the
    previous step's x0_hat.

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
        prediction: what the model predicts: "eps", "x0" or "v" (or diffusers' "epsilon", "sample",
            "v_prediction"); None: the schedule's default (from a diffusers config), else "eps".
        weighting: "simple", "vlb", "snr", "min_snr", "p2", or a tensor of length T.
        gamma: the min-SNR clip (Hang et al.: 5).
        reduction: "mean" (default), "sum" or "none" (the per-sample losses).
        variance: "fixed_small", "fixed_large" or "learned_range"; None: the schedule's default, else
            "fixed_small".
        loss_type: "mse" (default; "hybrid" with a learned variance) or "kl".
        vlb_weight: the weight of vb_t in the hybrid or KL loss (None: T/1000 or T).
        timestep_sampler: "uniform" (default), "loss-second-moment" or a LossSecondMomentSampler.
        self_condition: call the model with x_self_cond (see above).
    """

    def __init__(self, schedule, prediction=None, weighting="simple", gamma=5.0, reduction="mean", *,
                 variance=None, loss_type="mse", vlb_weight=None, timestep_sampler="uniform", self_condition=False):
        super().__init__()
        check_schedule(schedule)
        prediction = check_prediction(schedule_default(prediction, "prediction", schedule, "eps"))
        variance = schedule_default(variance, "variance", schedule, "fixed_small")
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
        check_bool(self_condition, "self_condition")
        self.schedule = schedule
        self.prediction = prediction
        self.weighting = weighting
        self.gamma = float(gamma)
        self.reduction = reduction
        self.variance = variance
        self.loss_type = loss_type  # with a learned variance, "mse" is improved DDPM's hybrid loss
        self.vlb_weight = vlb_weight
        self.timestep_sampler = timestep_sampler
        self.self_condition = self_condition
        self._range_checked = False

    @classmethod
    def from_lucidrains(cls, schedule, objective="pred_v", min_snr_loss_weight=False, min_snr_gamma=5, *,
                        self_condition=False, reduction="mean"):
        """denoising-diffusion-pytorch's GaussianDiffusion loss: the MSE of `objective` ("pred_noise",
        "pred_x0", "pred_v") weighted by clipped_snr / snr, clipped_snr or clipped_snr / (snr + 1)
        with clipped_snr = min(snr, min_snr_gamma) or snr: our min-SNR weights with gamma
        min_snr_gamma or infinity."""
        gamma = min_snr_gamma if min_snr_loss_weight else math.inf
        return cls(schedule, objective, "min_snr", gamma, reduction, self_condition=self_condition)

    def forward(self, model, x0, *, generator=None, **model_kwargs):
        check_model(model)
        if isinstance(x0, torch.Tensor) and x0.dtype == torch.float64:
            check_model_dtype(model, x0.dtype, "x0")
        x_t, t, state = self.noise(x0, generator=generator)
        if not self.self_condition:
            return self.loss(model_output(model(x_t, t, **model_kwargs)), x0, state)
        x_self_cond = None
        if self._coin(generator):
            with torch.no_grad():
                first = model_output(model(x_t, t, None, **model_kwargs))
                x_self_cond = functional.p_mean_variance(first, x_t, t, self.schedule, prediction=self.prediction,
                                                         variance=self.variance)[3]
        return self.loss(model_output(model(x_t, t, x_self_cond, **model_kwargs)), x0, state)

    @staticmethod
    def _coin(generator):
        """True with probability 1/2, drawn on the CPU (no device sync) unless `generator` is a device's."""
        if generator is None or generator.device.type == "cpu":
            return bool(torch.rand((), generator=generator) < 0.5)
        return bool(torch.rand((), generator=generator, device=generator.device) < 0.5)

    def _check_data(self, x0):
        """x0 is float data in [-1, 1]: uint8 images are refused with the scaling to use, values far
        outside [-1, 1] warned about once (the first call's one host sync)."""
        if isinstance(x0, torch.Tensor) and x0.dtype == torch.uint8:
            raise TypeError("x0 must be float images scaled to [-1, 1], got uint8: pass x0.float() / 127.5 - 1")
        check_float(x0, "x0")
        if not self._range_checked:
            self._range_checked = True
            if float(x0.detach().abs().amax()) > 1.5:
                warnings.warn("x0 has values far outside [-1, 1] (images in [0, 255] or [0, 1]?): DDPM schedules "
                              "assume data scaled to [-1, 1]", stacklevel=3)

    def noise(self, x0, *, generator=None):
        """(x_t, t, state): t drawn (uniformly, or by the importance sampler) on x0's device and
        x_t = q_sample(x0, t, fresh noise); t is valid by construction and not checked again."""
        self._check_data(x0)
        check_generator(generator)
        t = weights = None
        if self.timestep_sampler is not None:
            t, weights = self.timestep_sampler.sample(x0.shape[0], generator=generator)
            t, weights = t.to(x0.device), weights.to(x0.device)
        x_t, t, seed, noise = functional.training_noise(x0, self.schedule, t, generator)
        return x_t, t, NoiseState(t, seed, noise, weights)

    def loss(self, model_output, x0, state):
        """The loss of `model_output` for the x_t that `noise(x0)` returned with `state`."""
        if not isinstance(state, NoiseState):
            raise TypeError(f"state must be the NoiseState returned by DiffusionLoss.noise, got {type(state).__name__}")
        weighted = state.importance_weights is not None
        reduction = "none" if weighted else self.reduction
        if self.loss_type == "mse" and self.variance != "learned_range":
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
                                            loss="kl" if self.loss_type == "kl" else "hybrid",
                                            variance=self.variance)
        if not weighted:
            return losses
        self.timestep_sampler.update(state.t, losses.detach())
        return reference.reduce_per_sample(losses * state.importance_weights, self.reduction)

    def extra_repr(self):
        weighting = "tensor" if isinstance(self.weighting, torch.Tensor) else repr(self.weighting)
        return (f"T={self.schedule.num_timesteps}, prediction={self.prediction!r}, weighting={weighting}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}, variance={self.variance!r}, "
                f"loss_type={self.loss_type!r}, timestep_sampler={type(self.timestep_sampler).__name__}, "
                f"self_condition={self.self_condition}")

    def get_extra_state(self):
        """The importance sampler's loss history, so that `state_dict()` resumes it."""
        return None if self.timestep_sampler is None else self.timestep_sampler.state_dict()

    def set_extra_state(self, state):
        if state is not None and self.timestep_sampler is not None:
            self.timestep_sampler.load_state_dict(state)

"""Inference timesteps and sigmas of diffusers' schedulers, as pure functions of the schedule.

The solvers work with the DDPM noise level `σ_t = sqrt((1 - ab_t) / ab_t)` (diffusers' `sigmas`,
k-diffusion's discrete σ): `α_t = 1 / sqrt(1 + σ²)` and `s_t = σ α_t` are the signal and noise
scales of `x_t = α_t x0 + s_t eps`, and `λ_t = -log σ_t` is the half log-SNR. Where ab = 0 (zero
terminal SNR) σ would be infinite; diffusers' schedulers replace that ab by 2**-24 (σ ≈ 4096), and
so do we (`solver_sigmas`, and the kernels).

Every function reproduces one diffusers `set_timesteps` (diffusers 0.3x-0.4x):

| function | scheduler | model timesteps | grid |
|---|---|---|---|
| `discrete_timesteps` | DDPMScheduler, DDIMScheduler | int64 | n points of [0, T) |
| `ddpm_prev_timesteps`, `ddim_prev_timesteps` | their `previous_timestep` / `prev_timestep` | int64 | |
| `multistep_schedule` | DPMSolverMultistepScheduler, UniPCMultistepScheduler | int64 | n of n + 1 points |
| `euler_schedule` | Euler-, EulerAncestral-, HeunDiscreteScheduler | float32 | n points, σ by np.interp |

and `dpm_solver_orders` / `unipc_orders` give the order of each step (warm-up, lower_order_final).
Sigmas come back as float64 tensors of n + 1 values (the last is the final σ: 0, or σ_min with
final_sigmas_type="sigma_min"). Diffusers builds its tables in float32; ours come from the
schedule's float64 tables, so sigmas agree to float32 rounding and timesteps exactly.
"""
from typing import NamedTuple

import torch

from ._checks import check_choice, check_schedule
from .options import SPACINGS

FINAL_SIGMAS = ("zero", "sigma_min")
MULTISTEP_SCHEDULERS = ("dpmsolver", "unipc")
ZERO_SNR_ALPHAS_CUMPROD = 2.0 ** -24  # diffusers' stand-in for ab = 0
KARRAS_RHO = 7.0


class InferenceSchedule(NamedTuple):
    """timesteps: (n,) what the model is called with; sigmas: (n + 1,) float64, step k goes from
    sigmas[k] to sigmas[k + 1]."""
    timesteps: torch.Tensor
    sigmas: torch.Tensor


def solver_sigmas(schedule):
    """σ_t = sqrt((1 - ab_t) / ab_t) over t = 0 … T-1, float64, with ab = 0 read as 2**-24."""
    check_schedule(schedule)
    ab = schedule.alphas_cumprod
    ab = torch.where(ab > 0, ab, ZERO_SNR_ALPHAS_CUMPROD)
    return ((1 - ab) / ab).sqrt()


def interp_sigmas(t, sigmas):
    """np.interp(t, arange(T), sigmas) for float t in [0, T-1]: linear between neighbours."""
    t = t.to(torch.float64)
    low = t.floor().clamp(0, sigmas.numel() - 2).long()
    return sigmas[low] + (t - low) * (sigmas[low + 1] - sigmas[low])


def sigma_to_t(sigma, sigmas):
    """diffusers' `_sigma_to_t`: the fractional timestep of σ, interpolating log σ between table entries."""
    log_sigmas = sigmas.log()
    log_sigma = sigma.to(torch.float64).clamp(min=1e-10).log()
    dists = log_sigma[None, :] - log_sigmas[:, None]
    # the last table index with log σ_t <= log σ (0 if none), at most T - 2
    low = torch.cumsum((dists >= 0).long(), 0).argmax(0).clamp(max=sigmas.numel() - 2)
    low_value, high_value = log_sigmas[low], log_sigmas[low + 1]
    w = ((low_value - log_sigma) / (low_value - high_value)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_max, sigma_min, n, rho=KARRAS_RHO):
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max to sigma_min, uniform in σ^(1/ρ)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


# -- DDPMScheduler and DDIMScheduler ---------------------------------------------------------------


def discrete_timesteps(num_train_timesteps, num_inference_steps, spacing="leading", steps_offset=0):
    """DDPMScheduler / DDIMScheduler.set_timesteps: n int64 timesteps, descending (their default
    spacing is "leading"). linspace: round(linspace(0, T-1, n)); leading: arange(n) · (T // n) +
    steps_offset; trailing: round(arange(T, 0, -T/n)) - 1."""
    T, n = _counts(num_train_timesteps, num_inference_steps, most=num_train_timesteps)
    check_choice(spacing, "spacing", SPACINGS)
    _check_offset(steps_offset)
    if spacing == "linspace":
        timesteps = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
    elif spacing == "leading":
        timesteps = (torch.arange(n, dtype=torch.float64) * (T // n)).round().flip(0) + steps_offset
    else:
        timesteps = _trailing(T, T / n)
    return _below(timesteps, T, spacing).long()


def ddpm_prev_timesteps(timesteps):
    """DDPMScheduler.previous_timestep: the next timestep of the list, -1 after the last."""
    return torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])


def ddim_prev_timesteps(timesteps, num_train_timesteps, num_inference_steps, set_alpha_to_one=True):
    """DDIMScheduler.step's prev_timestep = t - T // n (not always the next of the list: trailing and
    linspace spacings skip), past the start read as -1 (ab_prev = 1, set_alpha_to_one) or 0 (ab[0])."""
    prev = timesteps - num_train_timesteps // num_inference_steps
    return torch.where(prev >= 0, prev, -1 if set_alpha_to_one else 0)


# -- DPMSolverMultistepScheduler and UniPCMultistepScheduler ----------------------------------------


def multistep_schedule(schedule, num_inference_steps, *, spacing="linspace", steps_offset=0, karras=False,
                       lu_lambdas=False, final_sigmas_type="zero", scheduler="dpmsolver"):
    """DPMSolverMultistepScheduler (scheduler="dpmsolver") or UniPCMultistepScheduler ("unipc")
    .set_timesteps: int64 timesteps from n of n + 1 grid points, and their sigmas.

    linspace: round(linspace(0, T-1, n+1)) without its 0; leading: arange(n+1) · (T // (n+1)) without
    its 0, + steps_offset; trailing as DDPMScheduler. karras (use_karras_sigmas): Karras sigmas over
    the whole table's [σ_0, σ_{T-1}], timesteps their rounded `sigma_to_t`; lu_lambdas
    (use_lu_lambdas, dpmsolver only): uniform in log σ over the same range. Otherwise σ at each
    timestep. Differences kept: with karras and sigma_min, UniPC ends at the Karras σ_min, DPM-Solver
    at σ_0; with a cosine schedule ('squaredcos_cap_v2') diffusers' DPM-Solver truncates the Karras
    timesteps where we round (as it does for every other schedule).
    """
    T, n = _schedule_counts(schedule, num_inference_steps)
    check_choice(spacing, "spacing", SPACINGS)
    check_choice(final_sigmas_type, "final_sigmas_type", FINAL_SIGMAS)
    check_choice(scheduler, "scheduler", MULTISTEP_SCHEDULERS)
    _check_offset(steps_offset)
    if karras and lu_lambdas:
        raise ValueError("karras and lu_lambdas cannot both be set")
    if lu_lambdas and scheduler != "dpmsolver":
        raise ValueError("lu_lambdas is a DPMSolverMultistepScheduler option (scheduler='dpmsolver')")
    table = solver_sigmas(schedule)
    if spacing == "linspace":
        timesteps = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
    elif spacing == "leading":
        timesteps = (torch.arange(n + 1, dtype=torch.float64) * (T // (n + 1))).round().flip(0)[:-1] + steps_offset
    else:
        timesteps = _trailing(T, T / n)
    timesteps = _below(timesteps, T, spacing)
    if karras or lu_lambdas:
        if karras:
            sigmas = karras_sigmas(float(table[-1]), float(table[0]), n)
        else:
            sigmas = torch.linspace(float(table[-1].log()), float(table[0].log()), n, dtype=torch.float64).exp()
        timesteps = sigma_to_t(sigmas, table).round()
    else:
        sigmas = table[timesteps.long()]
    if final_sigmas_type == "zero":
        last = 0.0
    else:
        last = sigmas[-1] if karras and scheduler == "unipc" else table[0]
    return InferenceSchedule(timesteps.long(), torch.cat([sigmas, sigmas.new_tensor([float(last)])]))


# -- EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler ---------------


def euler_schedule(schedule, num_inference_steps, *, spacing="linspace", steps_offset=0, karras=False,
                   final_sigmas_type="zero"):
    """EulerDiscreteScheduler.set_timesteps (also EulerAncestral- and HeunDiscreteScheduler's, which
    have no final_sigmas_type; Heun's doubling of the timesteps is the sampler's business).

    Float32 timesteps: linspace: linspace(0, T-1, n) itself, fractional; leading: arange(n) · (T // n)
    + steps_offset; trailing as DDPMScheduler. Sigmas by linear interpolation of the table at those
    timesteps (np.interp). karras: Karras sigmas between the first and last of those interpolated
    sigmas, the timesteps their (unrounded) `sigma_to_t`.
    """
    T, n = _schedule_counts(schedule, num_inference_steps)
    check_choice(spacing, "spacing", SPACINGS)
    check_choice(final_sigmas_type, "final_sigmas_type", FINAL_SIGMAS)
    _check_offset(steps_offset)
    table = solver_sigmas(schedule)
    if spacing == "linspace":
        timesteps = torch.linspace(0, T - 1, n, dtype=torch.float64).flip(0)
    elif spacing == "leading":
        timesteps = (torch.arange(n, dtype=torch.float64) * (T // n)).round().flip(0) + steps_offset
    else:
        timesteps = _trailing(T, T / n)
    timesteps = _below(timesteps, T, spacing).to(torch.float32)  # diffusers interpolates at the float32 timesteps
    sigmas = interp_sigmas(timesteps, table)
    if karras:
        sigmas = karras_sigmas(float(sigmas[0]), float(sigmas[-1]), n)
        timesteps = sigma_to_t(sigmas, table).to(torch.float32)
    last = 0.0 if final_sigmas_type == "zero" else float(table[0])
    return InferenceSchedule(timesteps, torch.cat([sigmas, sigmas.new_tensor([last])]))


# -- the order of each step ----------------------------------------------------------------------


def dpm_solver_orders(num_inference_steps, order=2, *, lower_order_final=True, final_sigmas_type="zero",
                      euler_at_final=False):
    """DPMSolverMultistepScheduler.step's order of each step: min(order, k + 1) while the history fills;
    the last step first order if euler_at_final, or lower_order_final with n < 15, or the final σ is 0;
    the second to last at most second order if lower_order_final with n < 15."""
    _counts(2, num_inference_steps)
    check_choice(order, "order", (1, 2, 3))
    check_choice(final_sigmas_type, "final_sigmas_type", FINAL_SIGMAS)
    n, few = num_inference_steps, lower_order_final and num_inference_steps < 15
    orders = []
    for k in range(n):
        step_order = min(order, k + 1)
        if k == n - 1 and (euler_at_final or few or final_sigmas_type == "zero"):
            step_order = 1
        elif k == n - 2 and few:
            step_order = min(step_order, 2)
        orders.append(step_order)
    return orders


def unipc_orders(num_inference_steps, order=2, *, lower_order_final=True):
    """UniPCMultistepScheduler.step's (predictor orders, corrector orders): the predictor of step k has
    order min(order, k + 1, n - k if lower_order_final); the corrector of step k, applied to the
    sample the predictor of step k - 1 made, has that predictor's order (0: no corrector at k = 0)."""
    _counts(2, num_inference_steps)
    check_choice(order, "order", (1, 2))
    n = num_inference_steps
    predictor = [min(order, k + 1, n - k if lower_order_final else order) for k in range(n)]
    return predictor, [0] + predictor[:-1]


def _trailing(T, step_ratio):
    """round(arange(T, 0, -T/n)) - 1: diffusers' trailing spacing, the last timestep T - 1 included."""
    start = torch.arange(T, 0, -step_ratio, dtype=torch.float64)
    return start.round() - 1


def _below(timesteps, T, spacing):
    """Leading spacing plus steps_offset can reach T, which diffusers passes on to the model (and clamps
    for its sigmas): an error here."""
    if int(timesteps.max()) >= T:
        raise ValueError(f"spacing={spacing!r} with this steps_offset gives timestep {int(timesteps.max())}, "
                         f"past the schedule's last, {T - 1}")
    return timesteps


def _schedule_counts(schedule, num_inference_steps):
    check_schedule(schedule)
    return _counts(schedule.num_timesteps, num_inference_steps, most=schedule.num_timesteps)


def _counts(num_train_timesteps, num_inference_steps, most=None):
    for name, value in (("num_train_timesteps", num_train_timesteps), ("num_inference_steps", num_inference_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if most is not None and num_inference_steps > most:
        raise ValueError(f"num_inference_steps must be at most {most} (the schedule's T), got {num_inference_steps}")
    return num_train_timesteps, num_inference_steps


def _check_offset(steps_offset):
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an int >= 0, got {steps_offset!r}")

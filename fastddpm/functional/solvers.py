"""Few-step solvers, stateless and per sample: DPM-Solver++ (2M, 3M, SDE), Euler, Euler ancestral,
Heun and UniPC-bh2 (formulas: docs/solvers.md).

    x_prev, x0_hat = dpm_solver_step(model(x_t, t), x_t, t, t_prev, schedule, history=history)

`x_t` is fastddpm's x_t = α x0 + s eps, what the model is called with (diffusers' Euler-family
sample is y = x_t sqrt(1 + σ²); their `scale_model_input(y)` is our x_t). Each step returns
(x_prev, x0_hat) and keeps no state: the multistep solvers take `history`, the previous steps'
(x0_hat, t) pairs, newest first; Heun's second stage takes the first stage's x0_hat.

Times: with time="timestep" (default) `t`, `t_prev` and the history's times are int timesteps
(t_prev = -1: the end, σ = 0) or float ones (σ interpolated linearly between timesteps, as
diffusers' Euler schedulers; -1.0: the end); with time="sigma" they are the noise levels
σ = sqrt((1 - ab)/ab) themselves (σ = 0: the end). Where ab = 0 (zero terminal SNR), σ is
diffusers' 2**-24 stand-in (σ ≈ 4096): finite for v and x0 predictions; eps can not give x0 there.

Each function validates its arguments, then runs one fused kernel (fastddpm.kernels.solvers) or
the float64-capable reference below (`reference_*`), by `fastddpm.backend.use_triton(x_t)`.
"""
import torch

from fastddpm._checks import (check_choice, check_float, check_generator, check_like, check_prediction, check_schedule,
                              check_timesteps, check_values, draw_seed)
from fastddpm.backend import use_triton
from fastddpm.kernels import solvers as solver_kernel
from fastddpm.reference import solvers as solver_reference

from ._args import check_seed

TIMES = ("timestep", "sigma")
SOLVERS = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")

__all__ = ["dpm_solver_step", "euler_step", "euler_ancestral_step", "heun_step", "unipc_step"]


# -- public steps ------------------------------------------------------------------------------


def dpm_solver_step(model_output, x_t, t, t_prev, schedule, *, history=(), order=2, solver="dpmsolver++",
                    solver_type="midpoint", noise=None, generator=None, seed=None, prediction="eps",
                    clip_denoised=False, time="timestep"):
    """One DPM-Solver++ multistep step (diffusers' DPMSolverMultistepScheduler, k-diffusion's
    sample_dpmpp_2m / 2m_sde / 3m_sde) from t to t_prev: (x_prev, x0_hat).

    history: ((x0_hat, t) of the previous step, (x0_hat, t) of the one before), as far as known; the
    order used is min(order, 1 + len(history)), and 1 where σ(t_prev) = 0. solver "sde-dpmsolver++"
    adds noise: `noise`, or drawn (in the kernel from a Philox `seed`, drawn from `generator` when
    not given; the reference draws with `generator`).
    """
    prediction = check_prediction(prediction)
    check_choice(solver, "solver", SOLVERS)
    check_choice(solver_type, "solver_type", SOLVER_TYPES)
    check_choice(order, "order", (1, 2, 3))
    sde = solver == "sde-dpmsolver++"
    times, x0s = _check_step(model_output, x_t, t, t_prev, schedule, history, min(order, 3) - 1, clip_denoised,
                             time)
    seed = _check_noise(noise, generator, seed, x_t, sde)
    return dpm_solver_update(model_output, x_t, times, x0s, schedule, time=time, sde=sde, heun=solver_type == "heun",
                             noise=noise, seed=seed, generator=generator, prediction=prediction, clip=clip_denoised)


def euler_step(model_output, x_t, t, t_prev, schedule, *, prediction="eps", clip_denoised=False, time="timestep"):
    """One Euler step of the probability-flow ODE (EulerDiscreteScheduler, k-diffusion's sample_euler)."""
    prediction = check_prediction(prediction)
    times, _ = _check_step(model_output, x_t, t, t_prev, schedule, (), 0, clip_denoised, time)
    return euler_update("euler", model_output, x_t, times, schedule, time=time, prediction=prediction,
                        clip=clip_denoised)


def euler_ancestral_step(model_output, x_t, t, t_prev, schedule, *, noise=None, generator=None, seed=None,
                         prediction="eps", clip_denoised=False, time="timestep"):
    """One Euler ancestral step (EulerAncestralDiscreteScheduler, sample_euler_ancestral with eta 1):
    Euler to σ_down, then noise of σ_up; noise as in `dpm_solver_step`."""
    prediction = check_prediction(prediction)
    times, _ = _check_step(model_output, x_t, t, t_prev, schedule, (), 0, clip_denoised, time)
    seed = _check_noise(noise, generator, seed, x_t, True)
    return euler_update("ancestral", model_output, x_t, times, schedule, time=time, noise=noise, seed=seed,
                        generator=generator, prediction=prediction, clip=clip_denoised)


def heun_step(model_output, x_t, t, t_prev, schedule, *, x0_hat_first=None, prediction="eps", clip_denoised=False,
              time="timestep"):
    """Heun's method in two model calls (HeunDiscreteScheduler, k-diffusion's sample_heun):

        x_mid, x0_first = heun_step(model(x_t, t), x_t, t, t_prev, schedule)     # Euler predictor
        x_prev, x0_hat = heun_step(model(x_mid, t_prev), x_mid, t, t_prev, schedule, x0_hat_first=x0_first)

    With x0_hat_first the step is the corrector: x_t is the predictor's x_mid (at t_prev) and the
    model output is the model's at (x_mid, t_prev). The last step to σ = 0 is the predictor alone.
    """
    prediction = check_prediction(prediction)
    times, _ = _check_step(model_output, x_t, t, t_prev, schedule, (), 0, clip_denoised, time)
    if x0_hat_first is not None:
        check_like(x0_hat_first, "x0_hat_first", x_t, "x_t")
    mode = "euler" if x0_hat_first is None else "heun"
    return euler_update(mode, model_output, x_t, times, schedule, first=x0_hat_first, time=time,
                        prediction=prediction, clip=clip_denoised)


def unipc_step(model_output, x_t, t, t_prev, schedule, *, history=(), order=2, corrector_order=None,
               prediction="eps", clip_denoised=False, time="timestep"):
    """One UniPC-bh2 step (UniPCMultistepScheduler's default): correct x_t, which the previous step's
    predictor made, with the model output at it (UniC), then predict x at t_prev (UniP).

    history as in `dpm_solver_step`; the predictor's order is min(order, 1 + len(history)) (1 where
    σ(t_prev) = 0), the corrector's `corrector_order`: the previous predictor's order, by default
    min(order, len(history)); 0 for no correction (the first step).
    """
    prediction = check_prediction(prediction)
    check_choice(order, "order", (1, 2))
    if corrector_order is None:
        corrector_order = min(order, len(history))
    check_choice(corrector_order, "corrector_order", (0, 1, 2))
    used = max(order - 1, corrector_order)
    times, x0s = _check_step(model_output, x_t, t, t_prev, schedule, history, used, clip_denoised, time)
    if corrector_order > len(x0s):
        raise ValueError(f"corrector_order={corrector_order} needs {corrector_order} history entries, "
                         f"got {len(x0s)}")
    return unipc_update(model_output, x_t, times, x0s, schedule, time=time, order=min(order, 1 + len(x0s)),
                        corrector_order=corrector_order, prediction=prediction, clip=clip_denoised)


# -- dispatch on validated inputs (the sampler calls these in its loop) ---------------------------


def dpm_solver_update(model_output, x_t, times, x0s, schedule, *, time, sde, heun, noise, seed, generator, prediction,
                      clip):
    """x0s: the history's x0_hat (as many as the order needs); times: t, t_prev and the history's times."""
    if use_triton(x_t):
        h1, h2 = (list(x0s) + [None, None])[:2]
        return solver_kernel.run(solver_kernel.dpm_solver_step_op, model_output, x_t, [h1, h2, noise], seed,
                     *_four(times), schedule.kernel_table(x_t.device), prediction, 1 + len(x0s), sde, heun,
                     bool(clip), kernel_time(times[0], time))
    sigmas = [solver_reference.sigma_of(s, schedule, time) for s in times]
    return solver_reference.dpm_solver(model_output, x_t, sigmas, x0s, sde=sde, heun=heun,
                                noise=_noise(noise, generator, x_t, sde), prediction=prediction, clip=clip)


def euler_update(mode, model_output, x_t, times, schedule, *, time, first=None, noise=None, seed=None,
                 generator=None, prediction, clip):
    """mode "euler", "ancestral" or "heun" (the corrector, `first` the predictor's x0_hat)."""
    if use_triton(x_t):
        return solver_kernel.run(solver_kernel.euler_step_op, model_output, x_t, [first, noise], seed, times[0],
                     times[1], schedule.kernel_table(x_t.device), prediction, mode, bool(clip),
                     kernel_time(times[0], time))
    sigma, sigma_next = (solver_reference.sigma_of(s, schedule, time) for s in times[:2])
    if mode == "heun":
        return solver_reference.heun_correction(model_output, x_t, sigma, sigma_next, first, prediction=prediction, clip=clip)
    noise = _noise(noise, generator, x_t, mode == "ancestral")
    return solver_reference.euler(model_output, x_t, sigma, sigma_next, noise=noise, prediction=prediction, clip=clip)


def unipc_update(model_output, x_t, times, x0s, schedule, *, time, order, corrector_order, prediction, clip):
    if use_triton(x_t):
        h1, h2 = (list(x0s) + [None, None])[:2]
        return solver_kernel.run(solver_kernel.unipc_step_op, model_output, x_t, [h1, h2], *_four(times), schedule.kernel_table(x_t.device),
                     prediction, order, corrector_order, bool(clip), kernel_time(times[0], time))
    sigmas = [solver_reference.sigma_of(s, schedule, time) for s in times]
    return solver_reference.unipc(model_output, x_t, sigmas, x0s, order=order, corrector_order=corrector_order,
                           prediction=prediction, clip=clip)


def kernel_time(t, time):
    """The kernels' name of a time: "sigma", "timestep" (int) or "fractional" (float timesteps)."""
    return "sigma" if time == "sigma" else ("fractional" if t.is_floating_point() else "timestep")


def _four(times):
    return list(times) + [None] * (4 - len(times))


def _noise(noise, generator, x_t, wanted):
    if not wanted or noise is not None:
        return noise
    return torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)


# -- checks ------------------------------------------------------------------------------------


def _check_step(model_output, x_t, t, t_prev, schedule, history, used, clip_denoised, time):
    """Validate a step's common arguments; returns ([t, t_prev, history times…], [history x0_hat…]), the
    history cut to its first `used` entries."""
    check_schedule(schedule)
    check_float(x_t, "x_t")
    channels, shape = x_t.shape[1], tuple(x_t.shape)
    wide = getattr(model_output, "shape", (None, None))[1:2] == (2 * channels,)
    check_like(model_output, "model_output", x_t, "x_t", shape=(shape[0], 2 * channels, *shape[2:]) if wide else None)
    check_choice(clip_denoised, "clip_denoised", (False, True))
    check_choice(time, "time", TIMES)
    if not isinstance(history, (tuple, list)):
        raise TypeError(f"history must be a tuple of (x0_hat, t) pairs, newest first, got {type(history).__name__}")
    values = not use_triton(x_t)  # the kernels check the times where they load them
    times = [_check_time(t, "t", x_t, schedule, time, end=False, values=values),
             _check_time(t_prev, "t_prev", x_t, schedule, time, end=True, values=values)]
    x0s = []
    for i, entry in enumerate(history[:used]):
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise TypeError(f"history[{i}] must be an (x0_hat, t) pair, got {type(entry).__name__}")
        check_like(entry[0], f"history[{i}][0]", x_t, "x_t")
        times.append(_check_time(entry[1], f"history[{i}][1]", x_t, schedule, time, end=False, values=values))
        x0s.append(entry[0])
    names = ["t", "t_prev"] + [f"history[{i}][1]" for i in range(len(times) - 2)]
    for name, value in zip(names, times):
        if time == "timestep" and value.is_floating_point() != t.is_floating_point():
            raise TypeError(f"{name} must be of t's kind (int or float timesteps), got {value.dtype}")
    return times, x0s


def _check_time(t, name, like, schedule, time, end, values):
    """An int or float tensor of shape (B,): timesteps in [0, T) (float: [0, T-1]), or σ >= 0; -1 (σ = 0)
    if end. values=False leaves the range to the kernel that loads the time (its device assert)."""
    if time == "timestep" and isinstance(t, torch.Tensor) and not t.is_floating_point():
        return check_timesteps(t, name, like, schedule, allow_minus_one=end, values=values)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        what = "timesteps (int or float)" if time == "timestep" else "noise levels σ (float)"
        raise TypeError(f"{name} must be a tensor of {what} of shape (B,), got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != (like.shape[0],):
        raise ValueError(f"{name} must have shape ({like.shape[0]},), one per sample, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the data is on {like.device}")
    if not values:
        return t
    if time == "timestep":
        last = schedule.num_timesteps - 1
        valid = ((t >= 0) & (t <= last)) | ((t == -1) if end else False)
        message = f"{name} must lie in [0, {last}]" + (" or be -1 (the end)" if end else "")
    else:
        valid = torch.isfinite(t) & ((t >= 0) if end else (t > 0))
        message = f"{name} must be finite and {'>= 0' if end else '> 0'}"
    check_values(t, valid, message)
    return t


def _check_noise(noise, generator, seed, x_t, stochastic):
    """The noise, generator and Philox seed of a stochastic step; returns the seed for the kernel."""
    check_generator(generator)
    if noise is not None:
        check_like(noise, "noise", x_t, "x_t")
    if seed is not None:
        seed = check_seed(seed, x_t)
        if not use_triton(x_t):
            raise ValueError("seed needs the triton backend (in-kernel noise); the reference draws with generator")
    if not stochastic or noise is not None or not use_triton(x_t):
        return None
    return seed if seed is not None else draw_seed(x_t.device, generator)

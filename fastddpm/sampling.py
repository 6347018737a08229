"""`sample`: samples from a DDPM-trained model, by the DDPM ancestral loop, DDIM, or a few-step
solver (DPM-Solver++ 2M/3M and their SDE variants, Euler, Euler ancestral, Heun, UniPC).

    samples = sample(model, (64, 3, 32, 32), schedule, method="dpm++2m", steps=20)

Each step is one model call and one fused kernel (fastddpm.samplers); the loop never waits for
the device: every step's times are on the device before it starts, and the Philox seeds of all
steps are drawn at once. Timesteps: improved-diffusion's respacing (fastddpm.respace) for DDPM
and DDIM by default, or diffusers' spacings, Karras and uniform-logSNR sigmas (fastddpm.timesteps).
"""
import torch

from . import timesteps as TS
from ._checks import (FLOAT_DTYPES, check_bool, check_choice, check_eta, check_generator, check_model,
                      check_model_dtype, check_prediction, check_schedule, draw_seed, model_output, model_tensors,
                      schedule_default)
from .backend import use_triton
from .functional.solvers import SOLVER_TYPES
from .guidance import ClassifierFreeGuidance
from .options import CLIP_OPTIONS, METHODS, SOLVER_METHODS, VARIANCES
from .respace import respace, space_timesteps
from .samplers import MULTISTEP, STOCHASTIC, ancestral_loop, solver_loop
from .schedule import device_with_index

__all__ = ["sample"]


@torch.no_grad()
def sample(model, shape, schedule, *, method="ddpm", steps=None, eta=0.0, prediction=None, variance=None,
           clip_denoised=None, generator=None, progress=True, model_kwargs=None, guidance_scale=None,
           null_kwargs=None, device=None, dtype=torch.float32, return_x0_hat=False, x_T=None, cuda_graph=False,
           callback=None, spacing=None, steps_offset=None, karras=False, lu_lambdas=False, lower_order_final=True,
           solver_type="midpoint", final_sigmas_type="zero", noise_fn=None, use_clipped_model_output=None,
           self_condition=False):
    """Samples of shape `shape` from `model(x_t, t, **model_kwargs)`.

    model: returns eps, x0 or v (`prediction`, diffusers' names accepted; a tensor, a diffusers
        output's `.sample`, a tuple's first element or a dict's "sample"), with 2C channels for
        variance="learned_range" (only DDPM reads the variance half). t: the (B,) original timesteps,
        float32 for the Euler family. `self_condition=True`: called as model(x_t, t, x0_hat of the
        previous step, None at the first) (denoising-diffusion-pytorch's self-conditioning).
    Defaults: prediction, variance, clip_denoised (DDPM and DDIM), spacing, steps_offset and
        use_clipped_model_output left None come from `schedule.defaults` (a schedule built from a
        diffusers scheduler: with its noise, `fastddpm.diffusers.pipeline_noise`, DDPM and DDIM then
        reproduce DDPMPipeline and DDIMPipeline), else "eps", "fixed_small", True, improved-diffusion's
        respacing, 0 and True.
    method: "ddpm" (ancestral; `variance`), "ddim" (`eta` 0: deterministic), or the few-step
        solvers "dpm++2m", "dpm++3m", "dpm++2m-sde", "dpm++3m-sde" (`solver_type` "midpoint" or
        "heun"), "euler", "euler-a", "heun", "unipc" (diffusers' schedulers of those names).
    steps: DDPM/DDIM: None (every step), an int N, improved-diffusion's section counts "10,20,30"
        or "ddimN" (fastddpm.respace; a string is always that), unless a `spacing` applies;
        solvers: an int (default 20).
    spacing: diffusers' timestep spacing "leading" (+ `steps_offset`), "trailing" or "linspace"
        (DDPMPipeline / DDIMPipeline for DDPM and DDIM; default "linspace" for the solvers);
        `karras`, `lu_lambdas`, `lower_order_final`, `final_sigmas_type`: the solvers' diffusers options.
    clip_denoised: False, True (clip x0_hat to [-1, 1]) or "dynamic" (DDPM and DDIM); None: True for
        DDPM and DDIM (improved-diffusion, diffusers' pipelines), False for the solvers (diffusers').
    generator: for x_T and the noise (the kernels draw per-step Philox seeds from it once; the
        PyTorch path draws with torch.randn at every step); `noise_fn(k, x)`: step k's noise instead
        (to reproduce another implementation's stream), called where diffusers draws: DDPM where the
        model's timestep is > 0, DDIM with eta > 0 and the stochastic solvers at every step.
    use_clipped_model_output: DDIM's eps from the clipped x0_hat (True) or the model's (False).
    guidance_scale: classifier-free guidance (fastddpm.guidance.ClassifierFreeGuidance) with
        `null_kwargs` for the unconditional call.
    device, dtype: of x_T and every x_t (default device: x_T's, else that of the parameters or
        buffers of the model, or of the module a wrapper of it refers to (a bound method, a partial,
        a lambda's closure or global names: `fastddpm._checks.model_tensors`), else torch's default
        device: pass `device` for a wrapper with no module in reach).
    callback: fn({"step": k, "t": timesteps (B,), "sample": x after step k, "x0_hat": x0_hat}) after
        every step; return_x0_hat=True returns (samples, x0_hat of the last step) (a callable there
        is taken as the callback).
    x_T: the starting noise (default: N(0, I) from `generator`).
    cuda_graph: DDPM and DDIM on CUDA with the Triton backend: capture one step (model and kernel)
        in a CUDA graph and replay it (the model must be capturable: static shapes, no host sync).
    """
    check_schedule(schedule)
    check_choice(method, "method", METHODS)
    prediction = check_prediction(schedule_default(prediction, "prediction", schedule, "eps"))
    variance = schedule_default(variance, "variance", schedule, "fixed_small")
    check_choice(variance, "variance", VARIANCES)
    if clip_denoised is None:  # diffusers' solvers read no clip_sample
        clip_denoised = False if method in SOLVER_METHODS else schedule.defaults.get("clip_denoised", True)
    check_choice(clip_denoised, "clip_denoised", CLIP_OPTIONS)
    if spacing is None and not isinstance(steps, str):
        spacing = schedule.defaults.get("spacing")
    steps_offset = schedule_default(steps_offset, "steps_offset", schedule, 0)
    use_clipped_model_output = schedule_default(use_clipped_model_output, "use_clipped_model_output", schedule, True)
    check_bool(use_clipped_model_output, "use_clipped_model_output")
    check_bool(self_condition, "self_condition")
    check_generator(generator)
    check_model(model, model_kwargs)
    check_eta(eta)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    if not (isinstance(return_x0_hat, bool) or callable(return_x0_hat)):
        raise TypeError(f"return_x0_hat must be a bool or a callable, got {type(return_x0_hat).__name__}")
    if callable(return_x0_hat):  # the callable form of earlier releases
        callback, return_x0_hat = callback or return_x0_hat, False
    for name, fn in (("callback", callback), ("noise_fn", noise_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    shape = _check_shape(shape)
    device = _device(device, x_T, model)
    if x_T is not None:
        _check_x_T(x_T, shape, device)
    check_model_dtype(model, dtype, "dtype")
    if self_condition and (guidance_scale is not None or cuda_graph):
        raise ValueError("self_condition=True works without guidance_scale and cuda_graph")
    denoise = _denoiser(model, model_kwargs, guidance_scale, null_kwargs, variance, shape[1], device, self_condition)
    x = (x_T.to(dtype) if x_T is not None else _randn(shape, generator, device, dtype)).contiguous()
    triton_path = use_triton(x)
    report = None if callback is None else (
        lambda k, t, x, x0_hat: callback({"step": k, "t": t, "sample": x, "x0_hat": x0_hat}))
    bar = (lambda steps: _progress(steps)) if progress else (lambda steps: steps)
    if method in SOLVER_METHODS:
        if cuda_graph:
            raise ValueError(f"cuda_graph=True captures the DDPM and DDIM step; method {method!r} has no graph mode")
        check_choice(solver_type, "solver_type", SOLVER_TYPES)
        if clip_denoised == "dynamic":
            raise ValueError(f"clip_denoised='dynamic' is for DDPM and DDIM, not {method!r}")
        n = 20 if steps is None else steps
        plan = _solver_plan(schedule, method, n, spacing, steps_offset, karras, lu_lambdas, final_sigmas_type)
        orders = correctors = None
        if method == "unipc":
            orders, correctors = TS.unipc_orders(n, MULTISTEP[method], lower_order_final=lower_order_final)
        elif method in MULTISTEP:
            orders = TS.dpm_solver_orders(n, MULTISTEP[method], lower_order_final=lower_order_final,
                                          final_sigmas_type=final_sigmas_type)
        stochastic = method in STOCHASTIC and noise_fn is None and triton_path
        seeds = _step_seeds(n, device, generator) if stochastic else None
        x, x0_hat = solver_loop(denoise, x, schedule, method=method, plan=plan, orders=orders,
                                correctors=correctors, solver_type=solver_type, seeds=seeds, noise_fn=noise_fn,
                                generator=generator, options=dict(prediction=prediction, clip=clip_denoised),
                                callback=report, progress=bar)
        return (x, x0_hat) if return_x0_hat else x
    if cuda_graph:
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {x.device}")
        if not triton_path or noise_fn is not None:
            raise ValueError("cuda_graph=True needs the Triton backend's in-kernel noise (no noise_fn; the PyTorch "
                             "path draws noise with torch.randn)")
    set_alpha_to_one = schedule.defaults.get("set_alpha_to_one", True)
    schedule, t_steps, t_prev_steps, model_t_steps, timesteps = _ancestral_plan(
        schedule, method, steps, spacing, steps_offset, set_alpha_to_one, shape[0], device)
    adds_noise = method == "ddpm" or eta > 0
    n = t_steps.shape[0]
    drawn_in_kernel = triton_path and adds_noise and noise_fn is None
    seeds = _step_seeds(n, device, generator) if drawn_in_kernel else None
    options = dict(prediction=prediction, variance=variance, clip_denoised=clip_denoised, return_x0_hat=return_x0_hat)
    if method == "ddim":
        options["use_clipped_model_output"] = use_clipped_model_output
    # where diffusers draws noise: DDPMScheduler.step where t > 0, DDIMScheduler.step where eta > 0
    draws = [adds_noise and (method == "ddim" or t > 0) for t in timesteps.tolist()]
    x, x0_hat = ancestral_loop(denoise, x, schedule, method=method, eta=eta, t_steps=t_steps,
                               t_prev_steps=t_prev_steps, model_t_steps=model_t_steps, seeds=seeds,
                               generator=generator, options=options, callback=report, progress=bar,
                               cuda_graph=cuda_graph, noise_fn=noise_fn if adds_noise else None, draws=draws,
                               self_condition=self_condition)
    return (x, x0_hat) if return_x0_hat else x


def _step_seeds(n, device, generator):
    """The Philox seeds of n steps, drawn at once (one RNG launch, no sync in the loop): seed + k keys
    step k's stream."""
    return draw_seed(device, generator) + torch.arange(n, device=device)


def _ancestral_plan(schedule, method, steps, spacing, steps_offset, set_alpha_to_one, batch, device):
    """(schedule to step in, t, t_prev and the model's t of each step as (n, B) device tensors, and
    the model's t of each step as a (n,) host tensor).

    improved-diffusion's respacing: the respaced schedule, t = n-1 … 0, t_prev = t - 1. diffusers'
    spacings: DDIM steps in the full schedule from t to DDIMScheduler's prev_timestep; DDPM in the
    schedule respaced to the spaced timesteps (DDPMScheduler.step on custom timesteps)."""
    T = schedule.num_timesteps
    if spacing is not None:
        n = T if steps is None else steps
        if not isinstance(n, int) or isinstance(n, bool):
            raise ValueError(f"steps must be an int with spacing={spacing!r}, got {steps!r}")
        timesteps = TS.discrete_timesteps(T, n, spacing, steps_offset)
        if method == "ddim":
            rows = (timesteps, TS.ddim_prev_timesteps(timesteps, T, n, set_alpha_to_one), timesteps)
            return (schedule, *(r.to(device)[:, None].expand(n, batch).contiguous() for r in rows), timesteps)
        schedule, timestep_map = respace(schedule, timesteps.tolist())
    elif steps is not None:
        schedule, timestep_map = respace(schedule, space_timesteps(T, steps))
    else:
        timestep_map = torch.arange(T)
    n = schedule.num_timesteps
    # step k runs t = n - 1 - k
    t_steps = torch.arange(n - 1, -1, -1, device=device)[:, None].expand(n, batch).contiguous()
    return schedule, t_steps, t_steps - 1, timestep_map.to(device)[t_steps], timestep_map.flip(0)


def _solver_plan(schedule, method, steps, spacing, steps_offset, karras, lu_lambdas, final_sigmas_type):
    """The InferenceSchedule (model timesteps, n + 1 sigmas) of `method`'s diffusers scheduler."""
    spacing = "linspace" if spacing is None else spacing
    if method in ("euler-a", "heun") and final_sigmas_type != "zero":
        raise ValueError(f"final_sigmas_type must be 'zero' for {method!r} (its diffusers scheduler ends at σ = 0)")
    if method in MULTISTEP:
        return TS.multistep_schedule(schedule, steps, spacing=spacing, steps_offset=steps_offset, karras=karras,
                                     lu_lambdas=lu_lambdas, final_sigmas_type=final_sigmas_type,
                                     scheduler="unipc" if method == "unipc" else "dpmsolver")
    if lu_lambdas:
        raise ValueError("lu_lambdas is a DPM-Solver option (methods 'dpm++…')")
    return TS.euler_schedule(schedule, steps, spacing=spacing, steps_offset=steps_offset, karras=karras,
                             final_sigmas_type=final_sigmas_type)


def _denoiser(model, model_kwargs, guidance_scale, null_kwargs, variance, channels, device, self_condition):
    """fn(x_t, t, x0_hat of the previous step) -> the model output tensor, with classifier-free
    guidance when guidance_scale is set; x0_hat reaches the model only with self_condition."""
    if guidance_scale is not None:
        learned = channels if variance == "learned_range" else None
        guided = ClassifierFreeGuidance(model, guidance_scale, model_kwargs, null_kwargs, learned_channels=learned,
                                        device=device)
        return lambda x, t, x0_hat: guided(x, t)
    kwargs = model_kwargs or {}
    if self_condition:
        return lambda x, t, x0_hat: model_output(model(x, t, x0_hat, **kwargs))
    return lambda x, t, x0_hat: model_output(model(x, t, **kwargs))


def _device(device, x_T, model):
    """The given device, else x_T's, else that of the model's first parameter or buffer (found
    through wrappers by `model_tensors`), else torch's default device."""
    if device is None and isinstance(x_T, torch.Tensor):
        device = x_T.device
    elif device is None:
        tensors = model_tensors(model)
        device = tensors[0].device if tensors else torch.get_default_device()
    return device_with_index(device)


def _check_x_T(x_T, shape, device):
    if not isinstance(x_T, torch.Tensor) or x_T.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x_T must be a float tensor, got {type(x_T).__name__}")
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    if x_T.device != device:
        raise ValueError(f"x_T is on {x_T.device} but sampling runs on {device}")


def _randn(shape, generator, device, dtype):
    """N(0, I) from `generator` (on whatever device it lives), on `device`."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def _check_shape(shape):
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"shape must be a tuple (B, C, ...) of positive ints, got {shape!r}")
    return tuple(shape)


def _progress(iterable):
    from tqdm.auto import tqdm  # imported when asked for: it costs the package's import time otherwise

    return tqdm(iterable, desc="sampling", leave=False)

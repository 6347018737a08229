"""Few-step sampling with DPM-Solver++, Euler, Euler ancestral, Heun and UniPC, as diffusers' schedulers
run them (timesteps, sigmas and orders from fastddpm.timesteps), one fused step per model call.

    samples = sample_solver(model, (16, 3, 32, 32), schedule, "dpm++2m", steps=20)

The loop does not synchronise with the host: the timesteps and sigmas of every step are put on the
device before it starts (the steps read σ directly, time="sigma"), orders are Python ints fixed per
step, and the in-kernel noise of the stochastic methods is keyed by Philox seeds drawn at once.
"""
import torch

from . import solvers as S
from . import timesteps as TS
from ._checks import FLOAT_DTYPES, check_choice, check_generator, check_schedule, draw_seed
from .backend import use_triton
from .schedule import PREDICTIONS

METHODS = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "dpm++3m-sde", "euler", "euler-a", "heun", "unipc")
MULTISTEP = {"dpm++2m": 2, "dpm++3m": 3, "dpm++2m-sde": 2, "dpm++3m-sde": 3, "unipc": 2}
STOCHASTIC = ("dpm++2m-sde", "dpm++3m-sde", "euler-a")

__all__ = ["sample_solver", "solver_schedule", "guided_model", "METHODS"]


def solver_schedule(schedule, method, steps, *, spacing="linspace", steps_offset=0, karras=False, lu_lambdas=False,
                    final_sigmas_type="zero"):
    """The InferenceSchedule (model timesteps, n + 1 sigmas) of `method`'s diffusers scheduler."""
    check_choice(method, "method", METHODS)
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


@torch.no_grad()
def sample_solver(model, shape, schedule, method="dpm++2m", steps=20, *, spacing="linspace", steps_offset=0,
                  karras=False, lu_lambdas=False, final_sigmas_type="zero", lower_order_final=True,
                  solver_type="midpoint", prediction="eps", clip_denoised=False, generator=None, x_T=None,
                  noise_fn=None, callback=None, progress=True, device=None, dtype=torch.float32):
    """Samples of `shape` from `model(x_t, t)`: t the (B,) timesteps of the step, int64 for the
    multistep methods, float32 for the Euler family (diffusers calls the model with those).

    method: "dpm++2m", "dpm++3m" and their "-sde" variants (DPMSolverMultistepScheduler, solver_type
        "midpoint" or "heun"), "euler", "euler-a", "heun" (2 model calls a step but the last), "unipc".
    spacing, steps_offset, karras, lu_lambdas, final_sigmas_type, lower_order_final: the diffusers
        options of the same names (fastddpm.timesteps).
    x_T: the starting x_t (default N(0, I) from `generator`). diffusers' Euler-family pipelines with
        "linspace" or "trailing" start at σ_max noise·y, which is x_T = noise σ_max / sqrt(1 + σ_max²).
    noise_fn: for the stochastic methods, fn(k, x) -> the noise of step k (default: drawn in the
        kernel from Philox seeds, or torch.randn with `generator` on the reference backend).
    callback: fn({"step": k, "t": timesteps, "sample": x, "x0_hat": x0_hat}) after every step.
    Guidance: pass a wrapped model, e.g. `guided_model(model, scale, model_kwargs, null_kwargs)`.
    """
    check_schedule(schedule)
    check_choice(method, "method", METHODS)
    check_choice(prediction, "prediction", PREDICTIONS)
    check_choice(solver_type, "solver_type", S.SOLVER_TYPES)
    check_choice(clip_denoised, "clip_denoised", (False, True))
    check_generator(generator)
    for name, fn in (("model", model), ("noise_fn", noise_fn), ("callback", callback)):
        if fn is not None and not callable(fn) or fn is None and name == "model":
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"shape must be a tuple (B, C, ...) of positive ints, got {shape!r}")
    shape = tuple(shape)
    device = torch.device(device) if device is not None else _model_device(model)
    plan = solver_schedule(schedule, method, steps, spacing=spacing, steps_offset=steps_offset, karras=karras,
                           lu_lambdas=lu_lambdas, final_sigmas_type=final_sigmas_type)
    if x_T is None:
        source = generator.device if generator is not None else device
        x = torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)
    elif not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != shape or x_T.device != device:
        raise ValueError(f"x_T must be a tensor of shape {shape} on {device}, got "
                         f"{tuple(getattr(x_T, 'shape', ()))} on {getattr(x_T, 'device', None)}")
    else:
        x = x_T.to(dtype)
    n, batch = steps, shape[0]
    # every step's times on the device before the loop: row k of each table is step k's
    model_t = plan.timesteps.to(device)[:, None].expand(n, batch).contiguous()
    sigmas = plan.sigmas.to(device)[:, None].expand(n + 1, batch).contiguous()
    seeds = None
    if method in STOCHASTIC and noise_fn is None and use_triton(x):
        seeds = draw_seed(device, generator) + torch.arange(n, device=device)
    options = dict(prediction=prediction, clip=clip_denoised)

    def noise(k):
        return (noise_fn(k, x) if noise_fn is not None else None), (None if seeds is None else seeds[k:k + 1])

    if method in MULTISTEP:
        order = MULTISTEP[method]
        if method == "unipc":
            orders, correctors = TS.unipc_orders(n, order, lower_order_final=lower_order_final)
        else:
            orders = TS.dpm_solver_orders(n, order, lower_order_final=lower_order_final,
                                          final_sigmas_type=final_sigmas_type)
    history = []  # (x0_hat, σ row) of the previous steps, newest first
    for k in _progress(range(n), progress):
        out = model(x, model_t[k])
        times = [sigmas[k], sigmas[k + 1]]
        if method == "unipc":
            used = history[:max(orders[k] - 1, correctors[k])]
            x_next, x0_hat = S.unipc_update(out, x, times + [s for _, s in used], [h for h, _ in used], schedule,
                                            time="sigma", order=orders[k], corrector_order=correctors[k], **options)
        elif method in MULTISTEP:
            used = history[:orders[k] - 1]
            z, seed = noise(k) if method.endswith("-sde") else (None, None)
            x_next, x0_hat = S.dpm_solver_update(out, x, times + [s for _, s in used], [h for h, _ in used], schedule,
                                                 time="sigma", sde=method.endswith("-sde"),
                                                 heun=solver_type == "heun", noise=z, seed=seed,
                                                 generator=generator, **options)
        elif method == "heun":
            x_next, x0_hat = S.euler_update("euler", out, x, times, schedule, time="sigma", **options)
            if k < n - 1:  # the last step, to σ = 0, is Euler's alone
                out = model(x_next, model_t[k + 1])
                x_next, x0_hat = S.euler_update("heun", out, x_next, times, schedule, time="sigma", first=x0_hat,
                                                **options)
        else:
            z, seed = noise(k) if method == "euler-a" else (None, None)
            x_next, x0_hat = S.euler_update("ancestral" if method == "euler-a" else "euler", out, x, times, schedule,
                                            time="sigma", noise=z, seed=seed, generator=generator, **options)
        x = x_next
        history = [(x0_hat, sigmas[k])] + history[:1]
        if callback is not None:
            callback({"step": k, "t": model_t[k], "sample": x, "x0_hat": x0_hat})
    return x


def guided_model(model, guidance_scale, model_kwargs, null_kwargs):
    """fn(x_t, t) -> uncond + scale (cond - uncond), cond and uncond as one batch of 2B: classifier-free
    guidance for `sample_solver` (model called as model(x_t, t, **kwargs); kwargs' tensors batched)."""
    if set(model_kwargs) != set(null_kwargs):
        raise ValueError(f"null_kwargs must have the keys of model_kwargs {sorted(model_kwargs)}, "
                         f"got {sorted(null_kwargs)}")
    both = {key: torch.cat([value, null_kwargs[key]]) if isinstance(value, torch.Tensor) else value
            for key, value in model_kwargs.items()}
    scale = float(guidance_scale)

    def guided(x, t):
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return torch.lerp(uncond, cond, scale)

    return guided


def _model_device(model):
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


def _progress(iterable, progress):
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (the demo extra)
        return iterable
    return tqdm(iterable, desc="sampling", leave=False)

"""Sampling: the DDPM ancestral loop and DDIM, on the fused reverse step (math.md section 4).

    samples = sample(model, (64, 3, 32, 32), schedule, method="ddim", steps=50)

Each step is one model call and one kernel (`functional.p_sample_step` or `ddim_step`: read x_t
and the model output, write x_{t-1}, noise drawn in the kernel). The loop does not synchronise
with the host: every timestep tensor is built on the device before it starts, and the Philox
seeds of all steps are drawn at once. On CUDA, `cuda_graph=True` captures one step (model and
kernel) in a CUDA graph and replays it, so a step costs one graph launch.

Respacing (`steps`) follows improved-diffusion: `space_timesteps` picks the kept timesteps,
`respace` rebuilds the betas of that subsequence from its alphas_cumprod (SpacedDiffusion), and
the model is still called with the original timesteps (`timestep_map`).
"""
import torch

from . import functional as F
from . import reference
from ._checks import FLOAT_DTYPES, check_choice, check_generator, check_schedule, draw_seed
from .backend import use_triton
from .options import CLIP_OPTIONS, METHODS, PREDICTIONS, VARIANCES
from .schedule import KERNEL_ROWS, NoiseSchedule

__all__ = ["sample", "space_timesteps", "respace", "eager_p_sample_step", "eager_ddim_step"]


# -- respacing (improved-diffusion's respace.py) ---------------------------------------------


def space_timesteps(num_timesteps, section_counts):
    """The set of timesteps to keep from a process of `num_timesteps` steps (improved-diffusion).

    section_counts: an int or a list of ints, or a string "10,20,30": the process is cut into
    equal sections (the first ones one step longer when it does not divide), and each section
    keeps its count of evenly strided steps, rounded, first and last included. "ddimN" keeps
    range(0, num_timesteps, stride) for the integer stride that gives exactly N steps
    (the DDIM paper's spacing).
    """
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = _positive_int(section_counts[len("ddim"):], "steps", section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps from {num_timesteps} with an integer stride")
        section_counts = [_positive_int(part, "steps", section_counts) for part in section_counts.split(",")]
    elif isinstance(section_counts, int) and not isinstance(section_counts, bool):
        section_counts = [section_counts]
    if not isinstance(section_counts, (list, tuple)) or not section_counts or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in section_counts):
        raise ValueError(f"steps must be positive ints, got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return set(kept)


def respace(schedule, use_timesteps):
    """(schedule over `use_timesteps`, timestep_map): improved-diffusion's SpacedDiffusion.

    The kept alphas_cumprod are unchanged: the new betas are `1 - ab[k] / ab[previous kept]`.
    `timestep_map[i]` (int64) is the original timestep of the new step i, what the model sees.
    """
    check_schedule(schedule)
    kept = sorted({int(t) for t in use_timesteps})
    T = schedule.num_timesteps
    if len(kept) < 2 or kept[0] < 0 or kept[-1] >= T:
        raise ValueError(f"use_timesteps must hold at least 2 timesteps in [0, {T}), got {len(kept)} from "
                         f"{kept[0] if kept else None} to {kept[-1] if kept else None}")
    timestep_map = torch.tensor(kept, dtype=torch.int64)
    ab = schedule.alphas_cumprod[timestep_map]
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return NoiseSchedule(1.0 - ab / ab_prev), timestep_map


def _positive_int(text, name, whole):
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an int, 'N1,N2,...' or 'ddimN', got {whole!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be positive, got {whole!r}")
    return value


# -- the sampler ----------------------------------------------------------------------------


@torch.no_grad()
def sample(model, shape, schedule, *, method="ddpm", steps=None, eta=0.0, prediction="eps", variance="fixed_small",
           clip_denoised=True, generator=None, progress=True, model_kwargs=None, guidance_scale=None,
           null_kwargs=None, device=None, dtype=torch.float32, return_x0_hat=False, x_T=None, cuda_graph=False):
    """Samples of shape `shape` from `model`, by the DDPM ancestral loop or DDIM.

    model: called as `model(x_t, t, **model_kwargs)`, t the int64 original timesteps (B,); returns
        eps, x0 or v (`prediction`), with 2C channels for variance="learned_range" (DDIM ignores
        the variance half).
    method: "ddpm" (ancestral, `variance` fixed_small, fixed_large or learned_range) or "ddim"
        (`eta` = 0: deterministic; 1: DDPM-like noise).
    steps: None (every step of `schedule`), an int N (N evenly spaced steps), improved-diffusion's
        section counts "10,20,30" or "ddimN"; see `space_timesteps` and `respace`.
    clip_denoised: False, True (clip x0_hat to [-1, 1]) or "dynamic" (Imagen's thresholding).
    generator: a torch.Generator for x_T and the noise (on the Triton path, one draw of per-step
        Philox seeds; on the reference path, torch.randn at every step).
    guidance_scale: classifier-free guidance `uncond + scale (cond - uncond)` on the model output
        (its mean half for learned_range; the variance half is the conditional one). Cond and
        uncond run as one batch of 2B. The unconditional call gets `null_kwargs`, by default
        `model_kwargs` with "y" replaced by the null class `model.num_classes`: fastddpm's UNet
        embeds num_classes + 1 labels, label num_classes being "no class".
    device, dtype: of x_T and of every x_t (default device: the model's).
    return_x0_hat: True returns (samples, x0_hat of the last step); a callable is called after
        every step as fn({"step": k, "t": original timesteps (B,), "sample": x_{t-1},
        "x0_hat": x0_hat}) for previews (the kernel then writes x0_hat too).
    x_T: the starting noise (default: drawn from `generator`).
    cuda_graph: capture one step in a CUDA graph and replay it (CUDA, Triton backend; the model
        must be capturable: static shapes, no host synchronisation).
    """
    check_schedule(schedule)
    check_choice(method, "method", METHODS)
    check_choice(prediction, "prediction", PREDICTIONS)
    check_choice(variance, "variance", VARIANCES)
    check_choice(clip_denoised, "clip_denoised", CLIP_OPTIONS)
    check_generator(generator)
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t, **model_kwargs), got {type(model).__name__}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    if not (isinstance(return_x0_hat, bool) or callable(return_x0_hat)):
        raise TypeError(f"return_x0_hat must be a bool or a callable, got {type(return_x0_hat).__name__}")
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shape = _check_shape(shape)
    if x_T is not None:
        _check_x_T(x_T, shape, device)
    if steps is not None:
        schedule, timestep_map = respace(schedule, space_timesteps(schedule.num_timesteps, steps))
    else:
        timestep_map = torch.arange(schedule.num_timesteps)
    denoiser = _denoiser(model, model_kwargs, guidance_scale, null_kwargs, variance, device)

    x = (x_T.to(dtype) if x_T is not None else _randn(shape, generator, device, dtype)).contiguous()
    triton_path = use_triton(x)
    n, batch = schedule.num_timesteps, shape[0]
    # every step's timesteps on the device before the loop: step k runs t = n - 1 - k
    t_steps = torch.arange(n - 1, -1, -1, device=device)[:, None].expand(n, batch).contiguous()
    model_t_steps = timestep_map.to(device)[t_steps]
    adds_noise = method == "ddpm" or eta > 0
    # the Triton path draws all the steps' Philox seeds at once: seed + k keys step k's stream
    seeds = draw_seed(device, generator) + torch.arange(n, device=device) if triton_path and adds_noise else None
    wants_x0_hat = return_x0_hat is not False

    def step(x, k_t, k_model_t, seed):
        """(x_{t-1}, x0_hat or None): one model call and one fused step."""
        out = denoiser(x, k_model_t)
        options = dict(prediction=prediction, clip_denoised=clip_denoised, return_x0_hat=wants_x0_hat, seed=seed,
                       generator=None if seed is not None else generator)
        if method == "ddpm":
            result = F.p_sample_step(out, x, k_t, schedule, variance=variance, **options)
        else:
            result = F.ddim_step(out, x, k_t, k_t - 1, schedule, eta=eta, **options)
        return result if wants_x0_hat else (result, None)

    if cuda_graph:
        run_step = _graphed_step(step, x, t_steps, model_t_steps, seeds, triton_path)
    else:
        def run_step(x, k):
            return step(x, t_steps[k], model_t_steps[k], None if seeds is None else seeds[k:k + 1])

    x0_hat = None
    for k in _progress(range(n), progress):
        x, x0_hat = run_step(x, k)
        if callable(return_x0_hat):
            return_x0_hat({"step": k, "t": model_t_steps[k], "sample": x, "x0_hat": x0_hat})
    if cuda_graph:  # the graph's static buffers are overwritten by the next replay
        x, x0_hat = x.clone(), None if x0_hat is None else x0_hat.clone()
    return (x, x0_hat) if return_x0_hat is True else x


def _denoiser(model, model_kwargs, guidance_scale, null_kwargs, variance, device):
    """fn(x_t, t) -> model output, with classifier-free guidance when guidance_scale is set."""
    model_kwargs = dict(model_kwargs or {})
    if guidance_scale is None:
        return lambda x, t: model(x, t, **model_kwargs)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be a float or None, got {guidance_scale!r}")
    if null_kwargs is None:
        from .unet import unwrap_model  # num_classes of a UNet under compile_unet's wrappers

        num_classes = getattr(unwrap_model(model), "num_classes", None)
        if not isinstance(model_kwargs.get("y"), torch.Tensor) or num_classes is None:
            raise ValueError("guidance_scale needs a condition: model_kwargs['y'] and a model with num_classes "
                             "(its null class), or null_kwargs for the unconditional call")
        null_kwargs = {**model_kwargs, "y": torch.full_like(model_kwargs["y"], num_classes)}
    if set(null_kwargs) != set(model_kwargs):
        raise ValueError(f"null_kwargs must have the keys of model_kwargs {sorted(model_kwargs)}, "
                         f"got {sorted(null_kwargs)}")
    # cond and uncond as one batch of 2B, built once
    both = {}
    for key, cond in model_kwargs.items():
        if isinstance(cond, torch.Tensor):
            both[key] = torch.cat([cond, null_kwargs[key]]).to(device)
        else:
            both[key] = cond
    scale = float(guidance_scale)

    def guided(x, t):
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        if variance != "learned_range" or cond.shape[1] == x.shape[1]:
            return torch.lerp(uncond, cond, scale)
        channels = x.shape[1]
        mean = torch.lerp(uncond[:, :channels], cond[:, :channels], scale)
        return torch.cat([mean, cond[:, channels:]], dim=1)

    return guided


def _graphed_step(step, x, t_steps, model_t_steps, seeds, triton_path):
    """run_step(x, k) replaying one captured step; x lives in the graph's static input buffer."""
    if x.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {x.device}")
    if not triton_path:
        raise ValueError("cuda_graph=True needs the Triton backend: the reference draws noise with torch.randn")
    static_x, static_t, static_model_t = x.clone(), t_steps[0].clone(), model_t_steps[0].clone()
    static_seed = None if seeds is None else seeds[:1].clone()
    # warm up on a side stream (Triton compilation, lazy initialisation), then restore x
    stream = torch.cuda.Stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(static_x, static_t, static_model_t, static_seed)
    torch.cuda.current_stream(x.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_prev, x0_hat = step(static_x, static_t, static_model_t, static_seed)
        static_x.copy_(x_prev)

    def run_step(x, k):
        static_t.copy_(t_steps[k])
        static_model_t.copy_(model_t_steps[k])
        if static_seed is not None:
            static_seed.copy_(seeds[k:k + 1])
        graph.replay()
        return static_x, x0_hat

    return run_step


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


def _model_device(model):
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


def _check_shape(shape):
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"shape must be a tuple (B, C, ...) of positive ints, got {shape!r}")
    return tuple(shape)


def _progress(iterable, progress):
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (the demo extra)
        return iterable
    return tqdm(iterable, desc="sampling", leave=False)


# -- the PyTorch path of functional.p_sample_step and ddim_step (CPU under backend "auto") -----
#
# reference.p_sample_step's math with about half its memory passes (one gather for every
# coefficient, addcmul, in-place clamp, no unused eps_hat): 7 passes for a clipped eps step
# against 13 for improved-diffusion's p_sample. Same dtypes as the reference.


def _coefficients(schedule, t, like):
    """fn(name) -> schedule.<name>[t] as (B, 1, …, 1) in like's compute dtype: the float32 rows come
    from one gather of the cached kernel table, float64 ones from the float64 tables."""
    if like.dtype == torch.float64:
        return lambda name: reference.gather(getattr(schedule, name), t, like)
    rows = schedule.kernel_table(like.device)[:, t]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return lambda name: rows[KERNEL_ROWS.index(name)].reshape(shape)


def _x0_eps(out, x, coefficient, prediction, clip_denoised, need_eps):
    """x0_hat (processed) and eps_hat (None unless need_eps), as reference.x0_eps_from_output."""
    if prediction == "x0":
        x0 = out
    else:
        a, b = (("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod") if prediction == "eps"
                else ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
        x0 = torch.addcmul(coefficient(a) * x, coefficient(b), out, value=-1)
    if clip_denoised is True:
        x0 = x0.clamp(-1, 1) if x0 is out else x0.clamp_(-1, 1)
    elif clip_denoised == "dynamic":
        x0 = reference.process_x0(x0, "dynamic")
    if not need_eps:
        return x0, None
    if prediction == "eps" and not clip_denoised:
        return x0, out
    if prediction == "v" and not clip_denoised:
        return x0, torch.addcmul(coefficient("sqrt_one_minus_alphas_cumprod") * x, coefficient("sqrt_alphas_cumprod"),
                                 out)
    # eps = (sqrt_recip_ab x_t - x0) / sqrt_recipm1_ab
    recipm1 = coefficient("sqrt_recipm1_alphas_cumprod")
    return x0, torch.addcmul(coefficient("sqrt_recip_alphas_cumprod") / recipm1 * x, recipm1.reciprocal(), x0,
                             value=-1)


def eager_p_sample_step(model_output, x_t, t, schedule, *, noise=None, generator=None, prediction="eps",
                        variance="fixed_small", clip_denoised=False, return_x0_hat=False):
    """reference.p_sample_step in fewer passes (validated inputs); x0_hat too with return_x0_hat."""
    dtype = reference.compute_dtype(x_t)
    coefficient = _coefficients(schedule, t, x_t)
    mean_output, var_output = reference.split_model_output(model_output, x_t, variance)
    x = x_t.to(dtype)
    x0_hat, _ = _x0_eps(mean_output.to(dtype), x, coefficient, prediction, clip_denoised, need_eps=False)
    x_prev = torch.addcmul(coefficient("posterior_mean_coef2") * x, coefficient("posterior_mean_coef1"), x0_hat)
    if variance == "learned_range":
        log_var = reference.model_log_variance(var_output, x_t, t, schedule, variance)
    else:
        log_var = coefficient("posterior_log_variance_clipped" if variance == "fixed_small"
                              else "fixed_large_log_variance")
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    nonzero = (t != 0).to(dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    x_prev = x_prev.addcmul_(nonzero * torch.exp(0.5 * log_var), noise.to(dtype)).to(x_t.dtype)
    return (x_prev, _own(x0_hat, mean_output, x_t.dtype)) if return_x0_hat else x_prev


def eager_ddim_step(model_output, x_t, t, t_prev, schedule, *, eta=0.0, noise=None, generator=None, prediction="eps",
                    clip_denoised=False, return_x0_hat=False):
    """reference.ddim_step in fewer passes (validated inputs); x0_hat too with return_x0_hat."""
    channels = x_t.shape[1]
    if model_output.shape[1] == 2 * channels:
        model_output = model_output[:, :channels]
    dtype = reference.compute_dtype(x_t)
    coefficient = _coefficients(schedule, t, x_t)
    x = x_t.to(dtype)
    x0_hat, eps_hat = _x0_eps(model_output.to(dtype), x, coefficient, prediction, clip_denoised, need_eps=True)
    ab = coefficient("alphas_cumprod")
    # t_prev = -1 is the last step: ab_prev = 1
    ab_prev = torch.where(t_prev >= 0, schedule.alphas_cumprod.to(t.device)[t_prev.clamp(min=0)], 1.0)
    ab_prev = ab_prev.to(dtype).reshape(ab.shape)
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
    x_prev = (ab_prev.sqrt() * x0_hat).addcmul_((1 - ab_prev - sigma ** 2).clamp(min=0).sqrt(), eps_hat)
    if eta != 0:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        x_prev = x_prev.addcmul_(sigma, noise.to(dtype))
    x_prev = x_prev.to(x_t.dtype)
    return (x_prev, _own(x0_hat, model_output, x_t.dtype)) if return_x0_hat else x_prev


def _own(x0_hat, model_output, dtype):
    """x0_hat in `dtype`, never the caller's model output itself (x0 prediction, no clipping)."""
    return x0_hat.to(dtype, copy=x0_hat is model_output)

"""Argument checks shared by the public API: clear errors naming the argument.

Shape, dtype and device checks are plain Python on static metadata, so they cost nothing
under torch.compile. The range of t is a value check: exact (ValueError) for CPU tensors
in eager mode; elsewhere an asynchronous device assert, so there is no host sync or graph break.
"""
import functools

import torch

from .options import PREDICTION_SYNONYMS, PREDICTIONS, canonical_prediction
from .schedule import NoiseSchedule

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_schedule(schedule):
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastddpm.NoiseSchedule, got {type(schedule).__name__}")


def check_float(x, name, min_ndim=2):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have shape (B, ...) with at least {min_ndim} dims, got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_like(x, name, like, like_name, shape=None):
    """x is a float tensor of like's shape (or `shape`) on like's device."""
    check_float(x, name, min_ndim=1)
    expected = like.shape if shape is None else tuple(shape)  # torch.Size compares equal to its tuple
    if x.shape != expected:
        raise ValueError(f"{name} must have shape {tuple(expected)} to match {like_name}, got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")


def check_timesteps(t, name, like, schedule, allow_minus_one=False, values=True):
    """t: an integer tensor of shape (B,) on like's device, every value in [0, T) (or -1 if allowed).

    values=False leaves the range to the kernel that loads t (its device assert): no launch here.
    Returns t as int64 when the values were checked here, else as given (int32 or int64).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape (B,), got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 tensor of timestep indices, got {t.dtype}")
    batch = like.shape[0]
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), one timestep per sample, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the data is on {like.device}")
    if not values:
        return t
    low, T = (-1 if allow_minus_one else 0), schedule.num_timesteps
    check_values(t, (t >= low) & (t < T), f"{name} must lie in [{low}, {T})")
    return t.long()


def check_values(t, valid, message):
    """Every element of the bool tensor `valid` (about `t`) is true: checked exactly (ValueError with
    t's range) for CPU tensors in eager mode, elsewhere by an asynchronous device assert."""
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(valid.all()):
            raise ValueError(f"{message}, got values from {t.min().item()} to {t.max().item()}")
    else:
        torch._assert_async(valid.all(), message)


def check_choice(value, name, choices):
    """`value` is one of `choices`; a bool is none of a vocabulary without bools (True == 1)."""
    if value not in choices or (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_eta(eta):
    """DDIM's eta: a number >= 0."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")


def check_model(model, model_kwargs=None):
    """A callable model, and its keyword arguments a dict or None."""
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t, **model_kwargs), got {type(model).__name__}")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")


def check_prediction(prediction, name="prediction"):
    """`prediction` as fastddpm names it ("eps", "x0" or "v"); diffusers' prediction_type and
    denoising-diffusion-pytorch's objective names are accepted for them."""
    canonical = canonical_prediction(prediction)
    if canonical not in PREDICTIONS:
        raise ValueError(f"{name} must be one of {PREDICTIONS} (or their names elsewhere, "
                         f"{tuple(PREDICTION_SYNONYMS)}), got {prediction!r}")
    return canonical


def schedule_default(value, name, schedule, fallback):
    """`value` if given, else the schedule's default for option `name` (a schedule built from a
    diffusers scheduler keeps its config's), else `fallback`."""
    if value is not None:
        return value
    return schedule.defaults.get(name, fallback)


def check_generator(generator, name="generator"):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")


def draw_seed(device, generator=None, count=1):
    """`count` uniform int64s in [0, 2**62) on `device`, one RNG launch (no host sync): a fresh
    Philox seed for count=1; a training step draws its seed and B timesteps at once."""
    check_generator(generator)
    if generator is None or generator.device == device:
        return torch.randint(0, 2 ** 62, (count,), device=device, generator=generator)
    return torch.randint(0, 2 ** 62, (count,), device=generator.device, generator=generator).to(device)


def model_output(out, name="model"):
    """The tensor a model returned: itself, a diffusers output's `.sample`, a tuple's first element or
    a dict's "sample"; anything else is an error naming what was returned and what is accepted."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and isinstance(out.get("sample"), torch.Tensor):
        return out["sample"]
    raise TypeError(f"{name} returned {type(out).__name__}: expected a tensor, an object with a .sample tensor "
                    "(diffusers), a tuple whose first element is a tensor, or a dict with a 'sample' tensor")


def model_tensors(model, depth=3):
    """The parameters, then the buffers, of the module(s) `model` computes with: a module's own, or
    those of the module a bound method, a functools.partial, a `__wrapped__` function, a callable
    object's attributes, or a function's closure or global names refer to (a lambda around a
    module), searched `depth` wrappers deep. Empty when there is none (a plain function)."""
    modules = _modules(model, depth, set())
    return [p for m in modules for p in m.parameters()] + [b for m in modules for b in m.buffers()]


def _modules(obj, depth, seen):
    if id(obj) in seen or obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor, type)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if depth == 0 or not callable(obj):
        return []
    inner = [getattr(obj, "__self__", None), getattr(obj, "__wrapped__", None)]
    if isinstance(obj, functools.partial):
        inner += [obj.func, *obj.args, *obj.keywords.values()]
    code = getattr(obj, "__code__", None)
    if code is not None:
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                inner.append(cell.cell_contents)
            except ValueError:  # a cell not filled yet
                pass
        names = getattr(obj, "__globals__", {})
        inner += [names[name] for name in code.co_names if name in names]
    elif not isinstance(obj, (functools.partial, type(len))) and hasattr(obj, "__dict__"):
        inner += list(vars(obj).values())  # a callable object holding its module
    return [m for item in inner for m in _modules(item, depth - 1, seen)]


def check_model_dtype(model, dtype, name):
    """Float64 inputs (of `dtype`, given as `name`) to a model whose parameters are not float64, or
    the reverse, fail inside the model's first layer: say so before the model runs."""
    tensors = [p for p in model_tensors(model) if p.is_floating_point()]
    if tensors and (tensors[0].dtype == torch.float64) != (dtype == torch.float64):
        raise TypeError(f"{name} is {dtype} but the model's parameters are {tensors[0].dtype}: pass {name} as "
                        f"{tensors[0].dtype} (or convert the model with .to({dtype}))")

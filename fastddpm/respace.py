"""Respacing, as improved-diffusion's respace.py: sample a DDPM on a subsequence of its timesteps.

`space_timesteps` picks the timesteps to keep; `respace` rebuilds the betas of that subsequence
from its alphas_cumprod (SpacedDiffusion), and the model is still called with the original
timesteps (`timestep_map`). diffusers' spacings ("leading", "trailing", "linspace") are in
fastddpm.timesteps.
"""
import torch

from ._checks import check_schedule
from .schedule import NoiseSchedule

__all__ = ["space_timesteps", "respace"]


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

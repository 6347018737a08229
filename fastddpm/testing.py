"""Inputs that look like a diffusion model's, shared by `fastddpm verify`, the benchmarks and the
tests (built on the reference only).

A "plausible model" predicts the noise with an error, eps_hat = eps + spread · N(0, 1) (spread
0.3 by default), written in its prediction's parameterization; a learned-range model's variance
half lies in [-1, 1]. Its bound's terms stay well conditioned, where unrelated random outputs put
the decoder's bin masses deep in the tails.
"""
import torch

from . import reference as R

SPREAD = 0.3  # the plausible model's error on eps, in units of eps's standard deviation


def random_images(shape, *, generator=None, dtype=torch.float32, device=None):
    """Images uniform in [-1, 1], the data range of every model here."""
    return torch.rand(shape, generator=generator, dtype=dtype, device=device) * 2 - 1


def plausible_eps(noise, spread=SPREAD, generator=None):
    """eps_hat = noise + spread · N(0, 1), in noise's dtype and device."""
    return noise + spread * torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=noise.device)


def variance_half(shape, *, bound=1.0, generator=None, dtype=torch.float32, device=None):
    """The variance half of a learned-range output, uniform in [-bound, bound] (1: the range's ends)."""
    return (torch.rand(shape, generator=generator, dtype=dtype, device=device) * 2 - 1) * bound


def plausible_output(x0, noise, t, schedule, *, prediction="eps", variance="fixed_small", spread=SPREAD,
                     variance_bound=1.0, generator=None):
    """The output of a plausible model at x_t = q_sample(x0, t, noise), in the reference's compute
    dtype (x0's; float32 for half types): eps_hat
    (`plausible_eps`) as `prediction` ("eps", "x0" or "v") writes it, and for `variance`
    "learned_range" a variance half (`variance_half`) concatenated along the channels."""
    x_t = R.q_sample(x0, t, noise, schedule)
    eps_hat = plausible_eps(noise, spread, generator)
    x0_hat = R.predict_x0_from_eps(x_t, t, eps_hat, schedule)
    output = R.training_target(x0_hat, t, eps_hat, schedule, prediction)
    if variance == "learned_range":
        half = variance_half(x0.shape, bound=variance_bound, generator=generator, dtype=output.dtype,
                             device=output.device)
        output = torch.cat([output, half], dim=1)
    return output

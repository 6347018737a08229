"""`elbo_bpd`: a model's negative ELBO in bits/dim (docs/math.md section 6): improved-diffusion's
calc_bpd_loop (every t, a fresh eps for each), or an unbiased stratified estimate of the same
bound from K model calls, with its standard error."""
import math

import torch

from . import functional, reference
from ._checks import (check_bool, check_choice, check_float, check_generator, check_model, check_model_dtype,
                      check_prediction, check_schedule, model_output, schedule_default)
from .options import CLIP_OPTIONS, STRATA, VARIANCES

__all__ = ["elbo_bpd"]


def _repeat_kwargs(model_kwargs, batch, repeats):
    """Tile every tensor of model_kwargs with a leading batch dimension `repeats` times."""
    if repeats == 1:
        return model_kwargs
    return {key: value.repeat(repeats, *([1] * (value.ndim - 1)))
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch else value
            for key, value in model_kwargs.items()}


def stratum_edges(T, K, strata="log"):
    """Edges 1 = e_0 < … < e_{K-1} = T of K-1 strata of 1..T-1 (stratum j is e_j..e_{j+1}-1).

    "log": geometrically spaced, so that the bound's terms, which fall off steeply with t
    (most of the sum sits in the first few steps), vary little inside a stratum; "equal":
    near-equal sizes. Every stratum holds at least one step (K <= T).
    """
    if strata == "equal":
        return 1 + torch.div(torch.arange(K, dtype=torch.int64) * (T - 1), K - 1, rounding_mode="floor")
    edges = torch.logspace(0, math.log10(T), K, dtype=torch.float64).round().long().tolist()
    edges[0], edges[-1] = 1, T
    for j in range(1, K):  # at least one step each, and room left for the strata after j
        edges[j] = min(max(edges[j], edges[j - 1] + 1), T - (K - 1 - j))
    return torch.tensor(edges, dtype=torch.int64)


def stratified_timesteps(T, K, batch, *, strata="log", device=None, generator=None):
    """(t (batch, K) int64, stratum sizes n (K,) float64): column 0 is t = 0 (a stratum of its own);
    column j >= 1 draws one uniform t in stratum j of `stratum_edges`, independently per sample."""
    edges = stratum_edges(T, K, strata)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), edges[:-1]]).to(device)
    sizes = torch.cat([torch.ones(1, dtype=torch.int64), edges[1:] - edges[:-1]]).to(device)
    uniform = torch.rand(batch, K, generator=generator, device=generator.device if generator is not None else device,
                         dtype=torch.float64).to(device)
    offsets = (uniform * sizes).long().minimum(sizes - 1)
    return starts + offsets, sizes.to(torch.float64)


def collapsed_strata_stderr(contributions):
    """Standard error of sum_j Y_j with one draw per stratum (B, K'): adjacent strata are paired
    (the last three grouped when K' is odd) and a group of m treated as m draws of one stratum,
    Var(sum) ≈ m/(m-1) sum (Y_i - mean)². Conservative: differences between the strata's means
    count as variance. NaN for a single stratum."""
    count = contributions.shape[1]
    if count < 2:
        return contributions.new_full((contributions.shape[0],), float("nan"))
    starts = list(range(0, count - 1, 2))  # pairs; with an odd count the last group has three
    variance = torch.zeros_like(contributions[:, 0])
    for start, stop in zip(starts, starts[1:] + [count]):
        group = contributions[:, start:stop]
        m = group.shape[1]
        variance = variance + m / (m - 1) * (group - group.mean(1, keepdim=True)).square().sum(1)
    return variance.sqrt()


def elbo_bpd(model, x0, schedule, *, prediction=None, variance=None, clip_denoised=None, timesteps=None,
             progress=True, generator=None, model_kwargs=None, batch_timesteps=False, tanh_cdf=False, strata="log"):
    """The negative ELBO of each image of x0 in bits/dim (docs/math.md section 6), under `model`.

    `model(x_t, t, **model_kwargs)` returns the model output (2C channels for learned_range).
    Full loop (`timesteps=None`, improved-diffusion's calc_bpd_loop): t from T-1 down to 0, a
    fresh eps for each; returns per sample
        total_bpd = prior_bpd + sum_t vb[:, t], prior_bpd (B,), and vb, mse (eps_hat's), xstart_mse
        of shape (B, T), column t for timestep t.
    `timesteps=K` (2 <= K <= T): an unbiased estimate of the same total from K model calls:
    the decoder term at t = 0 exactly (the largest single term, it would dominate the variance),
    and one uniform t in each of K-1 strata of 1..T-1 (stratum j of n_j steps; `strata="log"`,
    geometric, or "equal": see `stratum_edges`), drawn per sample: E[n_j vb_{t_j}] = the sum of
    vb over stratum j, so
        total_bpd = prior_bpd + vb_0 + sum_j n_j vb_{t_j}
    is unbiased for the full loop's expectation; `total_bpd_stderr` is its collapsed-strata
    standard error (see `collapsed_strata_stderr`; NaN for K = 2). vb, mse, xstart_mse are then
    (B, K) at the timesteps returned as `t` (B, K), with `stratum_sizes` (K,).

    batch_timesteps: False (one model call per timestep), True (every timestep of the loop in one
    call) or an int k (k timesteps per call, batch k·B). clip_denoised: True (default, as
    improved-diffusion and `fastddpm elbo`), False or "dynamic" (Imagen's thresholding: computed by
    the reference, as a per-sample quantile). prediction ("eps", "x0", "v" or diffusers' names),
    variance and clip_denoised left None come from `schedule.defaults` (a diffusers scheduler's
    config), else "eps", "fixed_small" and True. A float64 x0 needs a float64 model. The model may return a tensor, a diffusers output's
    `.sample`, a tuple or a dict with "sample". Runs under
    torch.no_grad; float32 results (float64 for float64 x0).
    """
    check_schedule(schedule)
    check_float(x0, "x0")
    check_model(model, model_kwargs)
    check_model_dtype(model, x0.dtype, "x0")
    prediction = check_prediction(schedule_default(prediction, "prediction", schedule, "eps"))
    variance = schedule_default(variance, "variance", schedule, "fixed_small")
    clip_denoised = schedule_default(clip_denoised, "clip_denoised", schedule, True)
    check_choice(variance, "variance", VARIANCES)
    check_choice(clip_denoised, "clip_denoised", CLIP_OPTIONS)
    check_generator(generator)
    T = schedule.num_timesteps
    if timesteps is not None and (isinstance(timesteps, bool) or not isinstance(timesteps, int)
                                  or not 2 <= timesteps <= T):
        raise ValueError(f"timesteps must be None (every t) or an int in [2, T={T}], got {timesteps!r}")
    if not (isinstance(batch_timesteps, bool) or (isinstance(batch_timesteps, int) and batch_timesteps >= 1)):
        raise ValueError(f"batch_timesteps must be a bool or an int >= 1, got {batch_timesteps!r}")
    check_bool(tanh_cdf, "tanh_cdf")
    check_choice(strata, "strata", STRATA)
    model_kwargs = model_kwargs or {}
    batch, device = x0.shape[0], x0.device
    if timesteps is None:
        columns = torch.arange(T, device=device).expand(batch, T)
        order = list(range(T - 1, -1, -1))  # calc_bpd_loop's order
    else:
        columns, sizes = stratified_timesteps(T, timesteps, batch, strata=strata, device=device, generator=generator)
        order = list(range(timesteps))
    count = len(order)
    per_call = count if batch_timesteps is True else 1 if batch_timesteps is False else min(batch_timesteps, count)
    result_dtype = reference.compute_dtype(x0)
    stats = torch.zeros(3, batch, count, dtype=result_dtype, device=device)  # vb, mse, xstart_mse
    from tqdm.auto import tqdm  # imported when used: it costs the package's import time otherwise

    bar = tqdm(total=count, desc="bits/dim", disable=not progress)
    with torch.no_grad():
        for first in range(0, count, per_call):
            chunk = order[first:first + per_call]
            k = len(chunk)
            t = columns[:, chunk].T.reshape(-1)  # (k·B,), timestep-major like x0.repeat
            x0_rep = x0.repeat(k, *([1] * (x0.ndim - 1)))
            # one draw per timestep, so the noise does not depend on batch_timesteps
            noise = torch.cat([torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                                           device=generator.device if generator is not None else device)
                               for _ in chunk]).to(device)
            x_t = functional.q_sample(x0_rep, t, noise, schedule)
            output = model_output(model(x_t, t, **_repeat_kwargs(model_kwargs, batch, k)))
            vb, x0_mse, eps_mse = functional.vb_terms_with_mse(output, x0_rep, x_t, noise, t, schedule,
                                                               prediction=prediction, variance=variance,
                                                               clip_denoised=clip_denoised, tanh_cdf=tanh_cdf)
            for row, values in enumerate((vb, eps_mse, x0_mse)):
                stats[row][:, chunk] = values.to(result_dtype).reshape(k, batch).T
            bar.update(k)
    bar.close()
    prior = reference.prior_bpd(x0, schedule).to(result_dtype)
    vb, mse, xstart_mse = stats
    if timesteps is None:
        return {"total_bpd": prior + vb.sum(1), "prior_bpd": prior, "vb": vb, "mse": mse, "xstart_mse": xstart_mse}
    contributions = vb * sizes.to(result_dtype)
    return {"total_bpd": prior + contributions.sum(1),
            "total_bpd_stderr": collapsed_strata_stderr(contributions[:, 1:]),
            "prior_bpd": prior, "vb": vb, "mse": mse, "xstart_mse": xstart_mse, "t": columns,
            "stratum_sizes": sizes.to(result_dtype)}

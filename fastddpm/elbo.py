"""The variational bound in practice: importance sampling of t for training, and the
model's negative ELBO in bits/dim for evaluation (math.md section 6).

- `LossSecondMomentSampler`: improved DDPM's sampler of t, p_t ∝ sqrt(E[L_t²]) over the last
  10 losses of each t, kept on the device and updated without host synchronisation.
- `elbo_bpd`: improved-diffusion's calc_bpd_loop (every t, a fresh eps for each), or an
  unbiased stratified estimate of the same bound from K model calls, with its standard error.
"""
import math

import torch
import torch.distributed as dist

from . import functional, reference
from ._checks import check_choice, check_float, check_generator, check_schedule
from .options import CLIP_OPTIONS, PREDICTIONS, STRATA, VARIANCES
from .schedule import NoiseSchedule

__all__ = ["LossSecondMomentSampler", "elbo_bpd"]


class LossSecondMomentSampler:
    """Importance sampling of t by the loss's second moment (Nichol & Dhariwal 2021, section 3.3).

    p_t ∝ sqrt(mean of the last `history_per_term` L_t²), mixed with `uniform_prob` of the uniform
    distribution; uniform until every t has a full history. `sample` returns (t, weights) with
    weights = 1 / (T p_t): E[weights · L_t] under p is the uniform mean of L_t, so multiply the
    per-sample loss by the weights. `update(t, losses)` after each step.

    The history is a (T, history_per_term) ring buffer with a count per t, on `device` (the
    model's): updates are a few vectorised scatters with no `.item()` and no loop over the batch.
    With an initialised torch.distributed process group, `update` gathers every rank's (t, loss)
    pairs, in rank order, as improved-diffusion does, so all ranks keep the same history.
    """

    def __init__(self, schedule_or_T, history_per_term=10, uniform_prob=0.001, device=None):
        if isinstance(schedule_or_T, NoiseSchedule):
            T = schedule_or_T.num_timesteps
        elif isinstance(schedule_or_T, int) and not isinstance(schedule_or_T, bool) and schedule_or_T >= 1:
            T = schedule_or_T
        else:
            raise TypeError(f"schedule_or_T must be a NoiseSchedule or an int >= 1, got {schedule_or_T!r}")
        if not isinstance(history_per_term, int) or isinstance(history_per_term, bool) or history_per_term < 1:
            raise ValueError(f"history_per_term must be an int >= 1, got {history_per_term!r}")
        if not isinstance(uniform_prob, (int, float)) or isinstance(uniform_prob, bool) or not 0 <= uniform_prob <= 1:
            raise ValueError(f"uniform_prob must be a float in [0, 1], got {uniform_prob!r}")
        self.num_timesteps = T
        self.history_per_term = history_per_term
        self.uniform_prob = float(uniform_prob)
        device = torch.device("cpu" if device is None else device)
        self.loss_history = torch.zeros(T, history_per_term, dtype=torch.float64, device=device)
        self.loss_counts = torch.zeros(T, dtype=torch.int64, device=device)

    @property
    def device(self):
        return self.loss_history.device

    def to(self, device):
        self.loss_history = self.loss_history.to(device)
        self.loss_counts = self.loss_counts.to(device)
        return self

    def warmed_up(self):
        """A 0-dim bool tensor (on the device): every t has a full history."""
        return (self.loss_counts >= self.history_per_term).all()

    def probabilities(self):
        """p_t, a float64 (T,) tensor on the device (uniform before the warm-up)."""
        T = self.num_timesteps
        weights = self.loss_history.square().mean(1).sqrt()
        weights = weights / weights.sum()
        weights = weights * (1.0 - self.uniform_prob) + self.uniform_prob / T
        uniform = torch.full_like(weights, 1.0 / T)
        # An all-zero history (zero losses) has no shape to follow: stay uniform.
        return torch.where(self.warmed_up() & torch.isfinite(weights).all(), weights, uniform)

    def sample(self, batch_size, generator=None):
        """(t (batch_size,) int64, weights (batch_size,) float32), both on the sampler's device."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        check_generator(generator)
        probs = self.probabilities()
        if generator is not None and generator.device != probs.device:
            t = torch.multinomial(probs.to(generator.device), batch_size, replacement=True, generator=generator)
            t = t.to(probs.device)
        else:
            t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * probs[t])
        return t, weights.to(torch.float32)

    @torch.no_grad()
    def update(self, t, losses):
        """Record this step's per-sample losses (any device and float dtype; detached here).

        In a process group every rank must call it (it is a collective), with its own batch.
        """
        if not isinstance(t, torch.Tensor) or not isinstance(losses, torch.Tensor):
            raise TypeError("t and losses must be tensors")
        if t.ndim != 1 or losses.shape != t.shape:
            raise ValueError(f"t and losses must have the same shape (B,), got {tuple(t.shape)} and "
                             f"{tuple(losses.shape)}")
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"t must be an int64 tensor, got {t.dtype}")
        newest, counts = self._newest_per_term(t.to(self.device).long(), losses.detach().to(self.device, torch.float64))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Fixed shapes (T, H) and (T,) whatever each rank's batch size: no size exchange, no sync.
            all_newest = [torch.empty_like(newest) for _ in range(dist.get_world_size())]
            all_counts = [torch.empty_like(counts) for _ in range(dist.get_world_size())]
            dist.all_gather(all_newest, newest)
            dist.all_gather(all_counts, counts)
            for rank_newest, rank_counts in zip(all_newest, all_counts):
                self._append(rank_newest, rank_counts)
        else:
            self._append(newest, counts)

    def _newest_per_term(self, t, losses):
        """Per t: how many losses this batch holds, and the last H of them in batch order, (T, H).

        Occurrence k (in batch order) of a t that occurs n times goes to column k - (n - min(n, H)).
        """
        T, H = self.num_timesteps, self.history_per_term
        counts = torch.zeros(T, dtype=torch.int64, device=t.device).index_add_(0, t, torch.ones_like(t))
        order = torch.sort(t, stable=True).indices
        sorted_t = t[order]
        group_start = torch.cumsum(counts, 0) - counts
        rank_in_group = torch.arange(t.numel(), device=t.device) - group_start[sorted_t]
        column = rank_in_group - (counts[sorted_t] - counts[sorted_t].clamp(max=H))
        kept = column >= 0
        newest = torch.zeros(T, H, dtype=torch.float64, device=t.device)
        # Dropped rows write to a scratch row T, so every kept slot is written exactly once.
        rows = torch.where(kept, sorted_t, T)
        padded = torch.cat([newest, newest.new_zeros(1, H)])
        padded[rows, column.clamp(min=0)] = losses[order]
        return padded[:T].contiguous(), counts

    def _append(self, newest, counts):
        """Append the min(count, H) newest losses of each t to its ring buffer: loss number i of t
        (counting from the first ever recorded) lives in slot i % H."""
        H = self.history_per_term
        kept = counts.clamp(max=H)
        column = torch.arange(H, device=counts.device)
        slot = (self.loss_counts[:, None] + (counts - kept)[:, None] + column[None, :]) % H
        write = column[None, :] < kept[:, None]
        current = self.loss_history.gather(1, slot)
        self.loss_history.scatter_(1, slot, torch.where(write, newest, current))
        self.loss_counts += counts

    def state_dict(self):
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state):
        self.loss_history.copy_(state["loss_history"])
        self.loss_counts.copy_(state["loss_counts"])


# -- evaluation -------------------------------------------------------------------------------


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


def elbo_bpd(model, x0, schedule, *, prediction="eps", variance="fixed_small", clip_denoised=False, timesteps=None,
             progress=True, generator=None, model_kwargs=None, batch_timesteps=False, tanh_cdf=False, strata="log"):
    """The negative ELBO of each image of x0 in bits/dim (math.md section 6), under `model`.

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
    call) or an int k (k timesteps per call, batch k·B). clip_denoised: False, True or "dynamic"
    (Imagen's thresholding: computed by the reference, as a per-sample quantile). Runs under
    torch.no_grad; float32 results (float64 for float64 x0).
    """
    check_schedule(schedule)
    check_float(x0, "x0")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t, **model_kwargs), got {type(model).__name__}")
    check_choice(prediction, "prediction", PREDICTIONS)
    check_choice(variance, "variance", VARIANCES)
    check_choice(clip_denoised, "clip_denoised", CLIP_OPTIONS)
    check_generator(generator)
    T = schedule.num_timesteps
    if timesteps is not None and (isinstance(timesteps, bool) or not isinstance(timesteps, int)
                                  or not 2 <= timesteps <= T):
        raise ValueError(f"timesteps must be None (every t) or an int in [2, T={T}], got {timesteps!r}")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    if not (isinstance(batch_timesteps, bool) or (isinstance(batch_timesteps, int) and batch_timesteps >= 1)):
        raise ValueError(f"batch_timesteps must be a bool or an int >= 1, got {batch_timesteps!r}")
    if not isinstance(tanh_cdf, bool):
        raise TypeError(f"tanh_cdf must be a bool, got {type(tanh_cdf).__name__}")
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
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is optional
        tqdm = None
    bar = tqdm(total=count, desc="bits/dim", disable=not progress) if tqdm is not None else None
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
            output = model(x_t, t, **_repeat_kwargs(model_kwargs, batch, k))
            t, triton_path = functional._check_reverse(output, x_t, t, schedule, prediction, variance, clip_denoised)
            vb, x0_mse, eps_mse = functional.vb_terms_with_mse(output, x0_rep, x_t, noise, t, schedule,
                                                               prediction=prediction, variance=variance,
                                                               clip_denoised=clip_denoised, tanh_cdf=tanh_cdf,
                                                               triton_path=triton_path)
            for row, values in enumerate((vb, eps_mse, x0_mse)):
                stats[row][:, chunk] = values.to(result_dtype).reshape(k, batch).T
            if bar is not None:
                bar.update(k)
    if bar is not None:
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

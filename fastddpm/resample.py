"""How a training step draws t: uniformly, or by improved DDPM's importance sampling, as
improved-diffusion's resample.py (Nichol & Dhariwal 2021, section 3.3)."""
import torch
import torch.distributed as dist

from ._checks import check_generator
from .schedule import NoiseSchedule

__all__ = ["LossSecondMomentSampler"]


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

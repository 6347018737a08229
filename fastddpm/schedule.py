"""Noise schedules: every table of docs/math.md section 1, built once in float64."""
import math
from collections.abc import Mapping

import torch

from .diffusers_config import diffusers_defaults
from .options import PREDICTIONS, WEIGHTINGS, canonical_prediction

# Rows of the float32 table the kernels gather from, in this order (see `kernel_table`).
KERNEL_ROWS = (
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "log_betas",
    "alphas_cumprod",
    "sqrt_alphas_cumprod_prev",
    "fixed_large_log_variance",
)

# Rows of a prediction's float32 coefficient table (see `prediction_table`): x0_hat = x0_xt x_t +
# x0_out out and eps_hat = eps_xt x_t + eps_out out for a model output `out`, and the training
# target = target_eps eps + target_x0 x0.
PREDICTION_ROWS = ("x0_xt", "x0_out", "eps_xt", "eps_out", "target_eps", "target_x0")


class NoiseSchedule:
    """A DDPM noise schedule of `T` steps, `t = 0 … T-1` (docs/math.md sections 1-2).

    Every table is a float64 CPU tensor named as in improved-diffusion. Kernels read
    float32 copies from `kernel_table(device)`, built once per device and cached. `defaults`: the
    options a diffusers scheduler's config sets (prediction, clip_denoised, variance, spacing,
    steps_offset, set_alpha_to_one, use_clipped_model_output), which DiffusionLoss, sample and
    elbo_bpd use where their argument is None; empty for the other constructors.
    """

    def __init__(self, betas):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor of at least 2 steps, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = betas.numel()
        self.alphas = 1.0 - betas
        self.alphas_cumprod = ab = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ab).sqrt()
        self.sqrt_recip_alphas_cumprod = ab.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ab - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
        # t = 0 has zero posterior variance; its log uses t = 1 (improved-diffusion, DDPM).
        self.posterior_log_variance_clipped = torch.cat(
            [self.posterior_variance[1:2], self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = betas * ab_prev.sqrt() / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * self.alphas.sqrt() / (1.0 - ab)
        self.snr = ab / (1.0 - ab)
        self.log_betas = betas.log()
        self.sqrt_alphas_cumprod_prev = ab_prev.sqrt()
        # fixed_large: betas, with t = 0 using posterior_variance[1] (improved-diffusion).
        self.fixed_large_variance = torch.cat([self.posterior_variance[1:2], betas[1:]])
        self.fixed_large_log_variance = self.fixed_large_variance.log()
        self.defaults = {}
        self._kernel_tables = {}
        self._prediction_tables = {}
        self._weight_tables = {}
        # Filled now rather than inside a compiled step, where a new cache entry forces a recompile.
        for device in default_devices():
            self.kernel_table(device)

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def linear(cls, T, beta_start=1e-4, beta_end=0.02, *, rescale_with_T=False, zero_terminal_snr=False):
        """Ho et al.; `rescale_with_T` scales both ends by 1000 / T (improved-diffusion)."""
        if rescale_with_T:
            beta_start, beta_end = beta_start * 1000 / T, beta_end * 1000 / T
        return cls._build(torch.linspace(beta_start, beta_end, _steps(T), dtype=torch.float64), zero_terminal_snr)

    @classmethod
    def cosine(cls, T, s=0.008, max_beta=0.999, *, zero_terminal_snr=False):
        """Nichol & Dhariwal: f(s) = cos((s + 0.008) / 1.008 · π/2)²."""
        T = _steps(T)

        def f(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
        return cls._build(torch.tensor(betas, dtype=torch.float64), zero_terminal_snr)

    @classmethod
    def scaled_linear(cls, T, beta_start=0.00085, beta_end=0.012, *, zero_terminal_snr=False):
        """Stable Diffusion's schedule: linear in sqrt(beta)."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, _steps(T), dtype=torch.float64) ** 2
        return cls._build(betas, zero_terminal_snr)

    @classmethod
    def sigmoid(cls, T, beta_start=1e-4, beta_end=0.02, *, zero_terminal_snr=False):
        """GeoDiff's schedule, as diffusers: sigmoid(linspace(-6, 6, T)) scaled to [start, end]."""
        betas = torch.sigmoid(torch.linspace(-6, 6, _steps(T), dtype=torch.float64)) * (beta_end - beta_start) + beta_start
        return cls._build(betas, zero_terminal_snr)

    @classmethod
    def from_betas(cls, betas, *, zero_terminal_snr=False):
        return cls._build(torch.as_tensor(betas, dtype=torch.float64), zero_terminal_snr)

    @classmethod
    def from_diffusers(cls, scheduler, *, zero_terminal_snr=False):
        """The schedule of a diffusers scheduler (DDPMScheduler, DDIMScheduler, …) or of its config (a
        FrozenDict or dict), with the config's sampling options kept in `defaults`.

        Its alphas_cumprod are the scheduler's (float32, what every diffusers step reads; from a
        config, built as diffusers builds them), its betas 1 - ab_t / ab_{t-1}. `defaults`: see
        `diffusers_defaults`.
        """
        config = getattr(scheduler, "config", scheduler)
        if not isinstance(config, Mapping) or "num_train_timesteps" not in config:
            raise TypeError("scheduler must be a diffusers scheduler or its config (with num_train_timesteps), "
                            f"got {type(scheduler).__name__}")
        ab = getattr(scheduler, "alphas_cumprod", None)
        ab = diffusers_alphas_cumprod(config) if ab is None else ab
        ab = torch.as_tensor(ab).detach().cpu().to(torch.float64)
        schedule = cls._build(1.0 - ab / torch.cat([ab.new_ones(1), ab[:-1]]), zero_terminal_snr)
        schedule.defaults = diffusers_defaults(config)
        return schedule

    @classmethod
    def from_lucidrains(cls, timesteps=1000, beta_schedule="sigmoid", **schedule_fn_kwargs):
        """denoising-diffusion-pytorch's GaussianDiffusion(timesteps=, beta_schedule=, schedule_fn_kwargs=)
        betas, in float64 as it builds them.

        "linear": Ho et al.'s 1e-4 … 0.02, both scaled by 1000 / T. "cosine" (s=0.008) and "sigmoid"
        (start=-3, end=3, tau=1; Chen 2023, fig. 8) define ab(u) on u = t / T, t = 0 … T, normalise it
        by ab(0) and take betas = 1 - ab(u_{t+1}) / ab(u_t) clipped to [0, 0.999]:
        cosine ab(u) = cos²((u + s) / (1 + s) · π/2); sigmoid ab(u) = (σ(end/τ) - σ((u (end - start)
        + start) / τ)) / (σ(end/τ) - σ(start/τ)), σ(end/τ) and σ(start/τ) rounded to float32 as there
        (`clamp_min` is accepted and unused, as there).
        """
        T = _steps(timesteps)
        if beta_schedule == "linear":
            if schedule_fn_kwargs:
                raise TypeError(f"the linear schedule takes no options, got {sorted(schedule_fn_kwargs)}")
            scale = 1000 / T
            return cls(torch.linspace(scale * 0.0001, scale * 0.02, T, dtype=torch.float64))
        u = torch.linspace(0, T, T + 1, dtype=torch.float64) / T
        if beta_schedule == "cosine":
            ab = _lucidrains_cosine(u, **schedule_fn_kwargs)
        elif beta_schedule == "sigmoid":
            ab = _lucidrains_sigmoid(u, **schedule_fn_kwargs)
        else:
            raise ValueError(f"beta_schedule must be 'linear', 'cosine' or 'sigmoid', got {beta_schedule!r}")
        ab = ab / ab[0]
        return cls(torch.clip(1 - ab[1:] / ab[:-1], 0, 0.999))

    @classmethod
    def _build(cls, betas, zero_terminal_snr):
        return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    # -- tables for kernels and losses ----------------------------------------------------

    def kernel_table(self, device):
        """float32 copy of the KERNEL_ROWS tables on `device`, shape (len(KERNEL_ROWS), T); cached."""
        device = device_with_index(device)
        table = self._kernel_tables.get(device)
        if table is None:
            table = self._kernel_tables[device] = _float32_table([getattr(self, name) for name in KERNEL_ROWS], device)
        return table

    def prediction_table(self, prediction, device):
        """float32 (len(PREDICTION_ROWS), T) coefficients of x0_hat, eps_hat and the training target
        for a model predicting `prediction` (docs/math.md section 4), on `device`; cached.

        eps: x0_hat = sqrt_recip_ab x_t - sqrt_recipm1_ab out; x0: eps_hat = (x_t - sqrt_ab out) /
        sqrt_1m_ab (finite where ab = 0); v: x0_hat = sqrt_ab x_t - sqrt_1m_ab out, eps_hat =
        sqrt_1m_ab x_t + sqrt_ab out, target sqrt_ab eps - sqrt_1m_ab x0.
        """
        key = (canonical_prediction(prediction), device_with_index(device))
        table = self._prediction_tables.get(key)
        if table is None:
            zero, one = torch.zeros_like(self.betas), torch.ones_like(self.betas)
            sqrt_ab, sqrt_1m_ab = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
            rows = {
                "eps": (self.sqrt_recip_alphas_cumprod, -self.sqrt_recipm1_alphas_cumprod, zero, one, one, zero),
                "x0": (zero, one, 1.0 / sqrt_1m_ab, -sqrt_ab / sqrt_1m_ab, zero, one),
                "v": (sqrt_ab, -sqrt_1m_ab, sqrt_1m_ab, sqrt_ab, sqrt_ab, -sqrt_1m_ab),
            }[key[0]]
            table = _float32_table(rows, key[1])
            self._prediction_tables[key] = table
        return table

    def loss_weights(self, weighting="simple", prediction="eps", gamma=5.0):
        """float64 table over t of the weight on the MSE of `prediction` (docs/math.md section 5).

        `weighting`: "simple", "vlb", "snr", "min_snr", "p2", or a user tensor of length T
        (used as given). "simple" is the plain MSE of whatever is predicted. "vlb", "snr"
        and "p2" are defined on the eps-space MSE and converted, so each is the same
        objective whatever the parameterization ("vlb" makes L_b = KL / D for t >= 1);
        "min_snr" is diffusers' text-to-image formula for each prediction.
        """
        T = self.num_timesteps
        if isinstance(weighting, torch.Tensor):
            w = weighting.detach().to("cpu", torch.float64).reshape(-1)
            if w.numel() != T:
                raise ValueError(f"weighting tensor must have length T={T}, got {w.numel()}")
            if not bool(torch.isfinite(w).all()):
                raise ValueError("weighting tensor must be finite")
            return w
        prediction = canonical_prediction(prediction)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        snr = self.snr
        if weighting == "simple":
            return torch.ones(T, dtype=torch.float64)
        if weighting == "vlb":
            # betas² / (2 σ² α (1 - ab)) on the eps MSE, σ² at t = 0 the clipped one; built as
            # coef1² / (2 σ²) on the x0 MSE, which stays finite where alpha = 0 (zero terminal SNR).
            sigma2 = self.posterior_log_variance_clipped.exp()
            w_x0 = self.posterior_mean_coef1 ** 2 / (2 * sigma2)
            if prediction == "x0":
                return w_x0
            if prediction == "v":
                return w_x0 / (1 + snr)
            return _finite(torch.where(snr > 0, w_x0 / snr, torch.inf))
        if weighting == "snr":
            return snr * _eps_to(prediction, snr)
        if weighting == "min_snr":
            clipped = snr.clamp(max=gamma)
            if prediction == "eps":
                # min(snr, γ)/snr; its limit where snr = 0 (zero terminal SNR) is 1.
                return torch.where(snr > 0, clipped / snr.clamp(min=1e-300), torch.ones_like(snr))
            if prediction == "v":
                return clipped / (snr + 1)
            return clipped
        if weighting == "p2":
            return (1.0 + snr) ** -1.0 * _eps_to(prediction, snr)
        raise ValueError(f"weighting must be one of {WEIGHTINGS} or a tensor of length T, got {weighting!r}")

    def loss_weight_table(self, weighting, prediction, gamma, device):
        """float32 `loss_weights` on `device`, cached for named weightings."""
        if isinstance(weighting, torch.Tensor):
            return self.loss_weights(weighting, prediction, gamma).to(device, torch.float32)
        key = (weighting, prediction, float(gamma), device_with_index(device))
        table = self._weight_tables.get(key)
        if table is None:
            table = self.loss_weights(weighting, prediction, gamma).to(device, torch.float32)
            self._weight_tables[key] = table
        return table

    def sample_timesteps(self, batch_size, *, device=None, generator=None):
        """Uniform int64 timesteps in [0, T)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def __repr__(self):
        return f"NoiseSchedule(T={self.num_timesteps}, beta[0]={self.betas[0].item():.3g}, beta[-1]={self.betas[-1].item():.3g})"


def device_with_index(device):
    """`device` as a torch.device with its index (the current GPU's for a bare "cuda")."""
    if type(device) is not torch.device:
        device = torch.device(device)
    if device.index is None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _float32_table(rows, device):
    """float64 rows stacked into a contiguous float32 table on `device`; zero terminal SNR makes
    sqrt_recip_ab infinite at T-1, which is kept finite (3e38)."""
    rows = [torch.nan_to_num(row, posinf=3e38, neginf=-3e38) for row in rows]
    return torch.stack(rows).to(torch.float32).to(device).contiguous()


def default_devices():
    """The CPU and, where CUDA is available, the current GPU: where tables are built up front."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


def _steps(T):
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"T must be an int >= 2, got {T!r}")
    return T


def _finite(weights):
    """An eps-space weight is infinite where snr = 0 (eps cannot give x0 there): cap it at the
    largest finite weight so every table stays finite."""
    finite = torch.isfinite(weights)
    return torch.where(finite, weights, weights[finite].max())


def _eps_to(prediction, snr):
    """Factor turning a weight on the eps-space MSE into one on `prediction`'s MSE.

    ||x0 - x0_hat||² = ||eps - eps_hat||² / snr and ||v - v_hat||² = ||eps - eps_hat||² (1 + snr) / snr.
    """
    if prediction == "eps":
        return torch.ones_like(snr)
    safe = snr.clamp(min=1e-300)
    if prediction == "x0":
        return safe
    return safe / (1 + snr)


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2024: shift and scale sqrt(ab) so the last is 0 and the first unchanged."""
    sqrt_ab = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))  # diffusers' order: float32 betas round as there
    ab = sqrt_ab ** 2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def _lucidrains_cosine(u, s=0.008):
    return torch.cos((u + s) / (1 + s) * math.pi * 0.5) ** 2


def _lucidrains_sigmoid(u, start=-3, end=3, tau=1, clamp_min=1e-5):
    v_start, v_end = (torch.tensor(v / tau, dtype=torch.float32).sigmoid().double() for v in (start, end))
    return (v_end - ((u * (end - start) + start) / tau).sigmoid()) / (v_end - v_start)


def diffusers_alphas_cumprod(config):
    """A DDPMScheduler / DDIMScheduler config's alphas_cumprod, in float32 as diffusers builds them."""
    T = config["num_train_timesteps"]
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = NoiseSchedule.cosine(T).betas.float()  # betas_for_alpha_bar: Python floats, then float32
    elif kind == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float32)) * (end - start) + start
    else:
        raise ValueError(f"beta_schedule {kind!r} of this config is not built here: pass the scheduler itself")
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, 0)

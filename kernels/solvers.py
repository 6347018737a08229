"""Fused few-step solver steps (docs/solvers.md): DPM-Solver++ (2M, 3M, SDE), Euler, Euler ancestral,
Heun and UniPC-bh2, one pass over the batch each.

Every step is linear in its tensors: with σ the DDPM noise level of each time (`sigma_at`),
α = 1/sqrt(1+σ²), s = σα, and x0_hat = a x_t + b out (`x0_coefficients`),

    x_prev = A x_t + c0 x0_hat + c1 h1 + c2 h2 + C z

where h1, h2 are the previous steps' x0_hat (the history) and z the noise. A program computes the
per-sample scalars A, c0, c1, c2, C from its sample's σ's (a few logs and divides), then streams the
elements. Bytes per element: read x_t, the model output and each history tensor, write x_prev and
x0_hat: (2 + history) reads + 2 writes, noise drawn in the kernel (+1 read with a given noise);
one launch per step. Heun's corrector reads its predictor's x0_hat as its one history tensor.

Times (TIME): 0 σ itself, 1 int timesteps (-1: σ = 0) gathered from the kernel table, 2 fractional
timesteps, σ interpolated linearly between table entries (diffusers' np.interp). Where ab = 0
(zero terminal SNR) σ is diffusers' 2**-24 stand-in, ZERO_SNR_SIGMA.

Matches fastddpm.solvers' reference_* functions.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import (AB, CHECKED, SQRT_RECIPM1_AB, channel_sizes, eager, kernel_layout, launch_config, like_layout,
                      model_output_offsets, sample_numel, sample_offsets, load_noise)
from ._launch import launch

PREDICTION_IDS = {"eps": 0, "x0": 1, "v": 2}
TIME_IDS = {"sigma": 0, "timestep": 1, "fractional": 2}
EULER_MODES = {"euler": 0, "ancestral": 1, "heun": 2}
ZERO_SNR_SIGMA = tl.constexpr(math.sqrt((1 - 2.0 ** -24) / 2.0 ** -24))


# -- device functions ---------------------------------------------------------------------


@triton.jit
def table_sigma(table_ptr, index, T):
    """σ = sqrt(1/ab - 1) at an in-range index; diffusers' stand-in where ab = 0."""
    ab = tl.load(table_ptr + AB * T + index)
    return tl.where(ab > 0, tl.load(table_ptr + SQRT_RECIPM1_AB * T + index), ZERO_SNR_SIGMA)


@triton.jit
def sigma_at(t_ptr, sample, table_ptr, T, TIME: tl.constexpr, END: tl.constexpr):
    """σ of this sample's time (see TIME in the module docstring), float32, checked where it is
    loaded (a device assert; the end of sampling, σ = 0 or t = -1, only where END) and clamped so
    that no gather reads out of bounds."""
    if TIME == 0:
        sigma = tl.load(t_ptr + sample).to(tl.float32)
        if END:  # constexpr branches: Triton 3.2's interpreter cannot broadcast a constexpr bool
            valid = sigma >= 0
        else:
            valid = sigma > 0
        tl.device_assert((sigma < float("inf")) & valid,
                         "a step's sigma must be finite and > 0 (t_prev's: >= 0)")
    elif TIME == 1:
        t = tl.load(t_ptr + sample)
        if END:
            valid = (t >= 0) | (t == -1)
        else:
            valid = t >= 0
        tl.device_assert((t < T) & valid,
                         "a step's timesteps must lie in [0, T) (t_prev: -1 for the end)")
        sigma = tl.where(t >= 0, table_sigma(table_ptr, tl.minimum(tl.maximum(t, 0), T - 1), T), 0.0)
    else:
        t = tl.load(t_ptr + sample).to(tl.float32)
        if END:
            valid = (t >= 0) | (t == -1.0)
        else:
            valid = t >= 0
        tl.device_assert((t <= T - 1.0) & valid,
                         "a step's fractional timesteps must lie in [0, T - 1] (t_prev: -1 for the end)")
        low = tl.minimum(tl.maximum(t, 0.0), T - 2.0).to(tl.int32)  # floor, as t >= 0
        low_sigma = table_sigma(table_ptr, low, T)
        sigma = low_sigma + (t - low) * (table_sigma(table_ptr, low + 1, T) - low_sigma)
        sigma = tl.where(t >= 0, sigma, 0.0)
    return sigma


@triton.jit
def x0_coefficients(sigma, prediction):
    """(a, b) with x0_hat = a x_t + b out at σ: eps (x - s out)/α, x0 out, v α x - s out."""
    alpha = 1.0 / tl.sqrt_rn(1.0 + sigma * sigma)
    is_eps = prediction == 0
    is_x0 = prediction == 1
    a = tl.where(is_eps, tl.sqrt_rn(1.0 + sigma * sigma), tl.where(is_x0, 0.0, alpha))
    b = tl.where(is_eps, -sigma, tl.where(is_x0, 1.0, -sigma * alpha))
    return a, b


@triton.jit
def expm1(x):
    """exp(x) - 1 without cancellation for small |x| (Kahan's (u - 1) x / log u); -1 at -inf."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (u - 1.0) * x / tl.log(u)))


@triton.jit
def load_x0_hat(out_ptr, x, sample, offs, mask, D, C, sigma, prediction,
                WIDE_OUTPUT: tl.constexpr, CLIP: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """x0_hat of the model output at σ (its first C channels), optionally clipped to [-1, 1]."""
    out_offs, _ = model_output_offsets(sample, offs, D, C, WIDE_OUTPUT, CHANNELS_LAST)
    out = tl.load(out_ptr + out_offs, mask=mask).to(tl.float32)
    a, b = x0_coefficients(sigma, prediction)
    x0 = a * x + b * out
    if CLIP:
        x0 = tl.clamp(x0, -1.0, 1.0)
    return x0


# -- kernels --------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["prediction"])
def dpm_solver_kernel(out_ptr, x_ptr, h1_ptr, h2_ptr, noise_ptr, seed_ptr, t_ptr, t_prev_ptr, t1_ptr, t2_ptr,
                      table_ptr, x_prev_ptr, x0_ptr, D, T, C, HW, prediction,
                      ORDER: tl.constexpr, SDE: tl.constexpr, HEUN: tl.constexpr, CLIP: tl.constexpr,
                      TIME: tl.constexpr, WIDE_OUTPUT: tl.constexpr, DRAW_NOISE: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """DPM-Solver++ multistep (Lu et al. 2022, eq. 9 and appendix; SDE: k-diffusion's dpmpp_2m/3m_sde).

    With h = λ_t - λ_s, e = σ_t/σ_s = exp(-h): ODE x = (s_t/s_s) x + α_t φ D0 + …, φ = 1 - e, H = h;
    SDE x = (s_t/s_s) e x + α_t φ D0 + … + s_t sqrt(φ) z, φ = 1 - e², H = 2h. D-terms: order 2 midpoint
    ½ α_t φ D1, order 2 heun and order 3 α_t (1 - φ/H) D1, order 3 α_t ((φ - H)/H² + ½) D2, expanded
    in x0_hat, h1, h2. First order where σ_t = 0 (the limit of every order there).
    """
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    sigma_s = sigma_at(t_ptr, sample, table_ptr, T, TIME, False)
    sigma_t = sigma_at(t_prev_ptr, sample, table_ptr, T, TIME, True)
    alpha_s = 1.0 / tl.sqrt_rn(1.0 + sigma_s * sigma_s)
    alpha_t = 1.0 / tl.sqrt_rn(1.0 + sigma_t * sigma_t)
    e = sigma_t / sigma_s
    A = (sigma_t * alpha_t) / (sigma_s * alpha_s)
    h = tl.log(sigma_s) - tl.log(sigma_t)
    if SDE:
        A = A * e
        phi = 1.0 - e * e
        H = 2.0 * h
    else:
        phi = 1.0 - e
        H = h
    c0 = alpha_t * phi
    c1 = 0.0
    c2 = 0.0
    final = sigma_t == 0.0
    if ORDER >= 2:
        r0 = (tl.log(sigma_at(t1_ptr, sample, table_ptr, T, TIME, False)) - tl.log(sigma_s)) / h
        if ORDER == 2:
            if HEUN:
                b1 = alpha_t * (1.0 - phi / H)
            else:
                b1 = 0.5 * alpha_t * phi
            # b1 D1, D1 = (x0 - h1) / r0
            c1 = tl.where(final, 0.0, -b1 / r0)
            c0 = tl.where(final, c0, c0 + b1 / r0)
        else:
            r1 = (tl.log(sigma_at(t2_ptr, sample, table_ptr, T, TIME, False))
                  - tl.log(sigma_at(t1_ptr, sample, table_ptr, T, TIME, False))) / h
            b1 = alpha_t * (1.0 - phi / H)
            b2 = alpha_t * ((phi - H) / (H * H) + 0.5)
            # b1 D1 + b2 D2 = p (x0 - h1)/r0 - q (h1 - h2)/r1 (D1, D2 of the paper's eq. 9 form)
            p = b1 * (1.0 + r0 / (r0 + r1)) + b2 / (r0 + r1)
            q = (b1 * r0 + b2) / (r0 + r1)
            c0 = tl.where(final, c0, c0 + p / r0)
            c1 = tl.where(final, 0.0, -p / r0 - q / r1)
            c2 = tl.where(final, 0.0, q / r1)
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    x0 = load_x0_hat(out_ptr, x, sample, offs, mask, D, C, sigma_s, prediction, WIDE_OUTPUT, CLIP, CHANNELS_LAST)
    x_prev = A * x + c0 * x0
    if ORDER >= 2:
        x_prev += c1 * tl.load(h1_ptr + base + offs, mask=mask).to(tl.float32)
    if ORDER == 3:
        x_prev += c2 * tl.load(h2_ptr + base + offs, mask=mask).to(tl.float32)
    if SDE:
        z = load_noise(noise_ptr, seed_ptr, sample, offs, mask, base, D, C, HW, DRAW_NOISE, CHANNELS_LAST, BLOCK)
        x_prev += sigma_t * alpha_t * tl.sqrt_rn(phi) * z
    tl.store(x_prev_ptr + base + offs, x_prev.to(x_prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + base + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["prediction"])
def euler_kernel(out_ptr, x_ptr, first_ptr, noise_ptr, seed_ptr, t_ptr, t_prev_ptr, table_ptr, x_prev_ptr, x0_ptr,
                 D, T, C, HW, prediction,
                 MODE: tl.constexpr, CLIP: tl.constexpr, TIME: tl.constexpr, WIDE_OUTPUT: tl.constexpr,
                 DRAW_NOISE: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Euler (MODE 0), Euler ancestral (1) and Heun's corrector (2) on the probability-flow ODE in σ
    (Karras et al. 2022, alg. 1-2), written for x_t = y/sqrt(1+σ²), y diffusers' sample.

    Euler: y' = y + (σ_d - σ)(y - x0)/σ, σ_d = σ' (ancestral: σ_d = sqrt(σ'² - σ_up²),
    σ_up = sqrt(σ'² (σ² - σ'²) / σ²), + σ_up z), so x' = α'σ_d/(ασ) x + α'(1 - σ_d/σ) x0 (+ α'σ_up z)
    with α = 1/sqrt(1 + σ²).
    Heun's corrector: x at σ' is the Euler prediction, the output the model's there, `first` the
    predictor's x0_hat: y' = y_mid + (σ' - σ)(d2 - d1)/2 = y_mid + (1 - σ/σ')(x0_first - x0)/2.
    """
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    sigma = sigma_at(t_ptr, sample, table_ptr, T, TIME, False)
    sigma_next = sigma_at(t_prev_ptr, sample, table_ptr, T, TIME, True)
    alpha_next = 1.0 / tl.sqrt_rn(1.0 + sigma_next * sigma_next)
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    if MODE == 2:
        x0 = load_x0_hat(out_ptr, x, sample, offs, mask, D, C, sigma_next, prediction, WIDE_OUTPUT, CLIP,
                         CHANNELS_LAST)
        k = tl.where(sigma_next > 0, 0.5 * alpha_next * (1.0 - sigma / sigma_next), 0.0)
        first = tl.load(first_ptr + base + offs, mask=mask).to(tl.float32)
        x_prev = x + k * (first - x0)
    else:
        x0 = load_x0_hat(out_ptr, x, sample, offs, mask, D, C, sigma, prediction, WIDE_OUTPUT, CLIP, CHANNELS_LAST)
        alpha = 1.0 / tl.sqrt_rn(1.0 + sigma * sigma)
        if MODE == 1:
            sigma_up = tl.sqrt_rn(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma))
            sigma_down = tl.sqrt_rn(tl.maximum(sigma_next * sigma_next - sigma_up * sigma_up, 0.0))
        else:
            sigma_down = sigma_next
        ratio = sigma_down / sigma
        x_prev = (alpha_next * ratio / alpha) * x + alpha_next * (1.0 - ratio) * x0
        if MODE == 1:
            z = load_noise(noise_ptr, seed_ptr, sample, offs, mask, base, D, C, HW, DRAW_NOISE, CHANNELS_LAST, BLOCK)
            x_prev += alpha_next * sigma_up * z
    tl.store(x_prev_ptr + base + offs, x_prev.to(x_prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + base + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["prediction"])
def unipc_kernel(out_ptr, x_ptr, h1_ptr, h2_ptr, t_ptr, t_prev_ptr, t1_ptr, t2_ptr, table_ptr, x_prev_ptr, x0_ptr,
                 D, T, C, HW, prediction,
                 ORDER: tl.constexpr, CORRECTOR: tl.constexpr, CLIP: tl.constexpr, TIME: tl.constexpr,
                 WIDE_OUTPUT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """UniPC-bh2 (Zhao et al. 2023; diffusers' UniPCMultistepScheduler, predict_x0): the corrector UniC
    of order CORRECTOR on x_t (what the previous predictor made), then the predictor UniP of ORDER.

    B(h) = expm1(-h). UniC, from the previous predictor's output: x_c = x - α B(h_c)[(ρ0 - ½) D1' +
    ρ1 (x0 - h1)], D1' = (h2 - h1)/r_c, (ρ0, ρ1) solving [[1, 1], [r_c, 1]] ρ = (b1, b2) (order 1:
    x_c = x - ½ α B(h_c)(x0 - h1)). UniP: x' = (s'/s) x_c - α' B(h) x0 - ½ α' B(h)(h1 - x0)/r.
    """
    sample, offs, mask, base = sample_offsets(D, BLOCK)
    sigma = sigma_at(t_ptr, sample, table_ptr, T, TIME, False)
    sigma_next = sigma_at(t_prev_ptr, sample, table_ptr, T, TIME, True)
    alpha = 1.0 / tl.sqrt_rn(1.0 + sigma * sigma)
    alpha_next = 1.0 / tl.sqrt_rn(1.0 + sigma_next * sigma_next)
    # corrector: x_c = x + k0 x0 + k1 h1 + k2 h2
    k0 = 0.0
    k1 = 0.0
    k2 = 0.0
    if CORRECTOR >= 1:
        log_sigma_1 = tl.log(sigma_at(t1_ptr, sample, table_ptr, T, TIME, False))
        h_c = log_sigma_1 - tl.log(sigma)
        b_h = expm1(-h_c)
        if CORRECTOR == 1:
            k0 = -0.5 * alpha * b_h
            k1 = -k0
        else:
            r_c = (tl.log(sigma_at(t2_ptr, sample, table_ptr, T, TIME, False)) - log_sigma_1) / -h_c
            phi_k1 = b_h / -h_c - 1.0
            b1 = phi_k1 / b_h
            b2 = 2.0 * (phi_k1 / -h_c - 0.5) / b_h
            rho0 = (b1 - b2) / (1.0 - r_c)
            rho1 = b1 - rho0
            k0 = -alpha * b_h * rho1
            k1 = alpha * b_h * (rho1 + (rho0 - 0.5) / r_c)
            k2 = -alpha * b_h * (rho0 - 0.5) / r_c
    # predictor: x' = A x_c + e0 x0 + e1 h1
    h = tl.log(sigma) - tl.log(sigma_next)
    b_h = expm1(-h)
    A = (sigma_next * alpha_next) / (sigma * alpha)
    e0 = -alpha_next * b_h
    e1 = 0.0
    if ORDER == 2:
        r = (tl.log(sigma_at(t1_ptr, sample, table_ptr, T, TIME, False)) - tl.log(sigma)) / -h
        final = sigma_next == 0.0
        e1 = tl.where(final, 0.0, -0.5 * alpha_next * b_h / r)
        e0 = tl.where(final, e0, e0 - e1)
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    x0 = load_x0_hat(out_ptr, x, sample, offs, mask, D, C, sigma, prediction, WIDE_OUTPUT, CLIP, CHANNELS_LAST)
    x_prev = A * x + (A * k0 + e0) * x0
    if ORDER == 2 or CORRECTOR >= 1:
        x_prev += (A * k1 + e1) * tl.load(h1_ptr + base + offs, mask=mask).to(tl.float32)
    if CORRECTOR == 2:
        x_prev += A * k2 * tl.load(h2_ptr + base + offs, mask=mask).to(tl.float32)
    tl.store(x_prev_ptr + base + offs, x_prev.to(x_prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + base + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


# -- launchers (kernel-layout tensors, see _common.kernel_layout) ----------------------------


def step_launch_config(x):
    """4 warps, as the posterior steps (no spills with three history reads)."""
    return launch_config(x, num_warps=4)


def _launch(kernel, model_output, x_t, table, prediction, channels_last, *pointers, **flags):
    """Launch `kernel` on (output, x_t, *pointers, table, x_prev, x0_hat, sizes); returns (x_prev, x0_hat)."""
    x_prev, x0_hat = torch.empty_like(x_t), torch.empty_like(x_t)
    grid, block, num_warps = step_launch_config(x_t)
    C, HW = channel_sizes(x_t, channels_last)
    launch(kernel, grid, model_output, x_t, *(x_t if p is None else p for p in pointers), table, x_prev, x0_hat,
           sample_numel(x_t), table.shape[1], C, HW, PREDICTION_IDS[prediction],
           WIDE_OUTPUT=model_output.shape[1] == 2 * x_t.shape[1], CHANNELS_LAST=channels_last,
           BLOCK=block, num_warps=num_warps, **flags, **CHECKED)
    return x_prev, x0_hat


# -- custom ops: (x_prev, x0_hat); None for an unused history, noise, seed or time -----------------


def _dpm_solver_step(model_output: torch.Tensor, x_t: torch.Tensor, h1: torch.Tensor | None,
                     h2: torch.Tensor | None, noise: torch.Tensor | None, seed: torch.Tensor | None, t: torch.Tensor,
                     t_prev: torch.Tensor, t1: torch.Tensor | None, t2: torch.Tensor | None, table: torch.Tensor,
                     prediction: str, order: int, sde: bool, heun: bool, clip: bool, time: str,
                     channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(dpm_solver_kernel, model_output, x_t, table, prediction, channels_last,
                   h1, h2, noise, seed, t, t_prev, t1, t2, ORDER=order, SDE=sde, HEUN=heun, CLIP=clip,
                   TIME=TIME_IDS[time], DRAW_NOISE=sde and noise is None)


def _euler_step(model_output: torch.Tensor, x_t: torch.Tensor, first: torch.Tensor | None,
                noise: torch.Tensor | None, seed: torch.Tensor | None, t: torch.Tensor, t_prev: torch.Tensor,
                table: torch.Tensor, prediction: str, mode: str, clip: bool, time: str,
                channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(euler_kernel, model_output, x_t, table, prediction, channels_last,
                   first, noise, seed, t, t_prev, MODE=EULER_MODES[mode], CLIP=clip, TIME=TIME_IDS[time],
                   DRAW_NOISE=mode == "ancestral" and noise is None)


def _unipc_step(model_output: torch.Tensor, x_t: torch.Tensor, h1: torch.Tensor | None, h2: torch.Tensor | None,
                t: torch.Tensor, t_prev: torch.Tensor, t1: torch.Tensor | None, t2: torch.Tensor | None,
                table: torch.Tensor, prediction: str, order: int, corrector: int, clip: bool, time: str,
                channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(unipc_kernel, model_output, x_t, table, prediction, channels_last,
                   h1, h2, t, t_prev, t1, t2, ORDER=order, CORRECTOR=corrector, CLIP=clip, TIME=TIME_IDS[time])


dpm_solver_step_op = torch.library.custom_op("fastddpm::dpm_solver_step", _dpm_solver_step, mutates_args=())
euler_step_op = torch.library.custom_op("fastddpm::euler_step", _euler_step, mutates_args=())
unipc_step_op = torch.library.custom_op("fastddpm::unipc_step", _unipc_step, mutates_args=())


def _fake(model_output, x_t, *args):
    return torch.empty_like(x_t), torch.empty_like(x_t)


for _op in (dpm_solver_step_op, euler_step_op, unipc_step_op):
    _op.register_fake(_fake)

# the ops' Python implementations, for eager calls (`run`)
IMPLEMENTATIONS = {dpm_solver_step_op: _dpm_solver_step, euler_step_op: _euler_step, unipc_step_op: _unipc_step}


# -- entry points of fastddpm.solvers (validated inputs; times already in kernel form) ------------


def run(op, model_output, x_t, tensors, *args):
    """Call `op` on x_t in its kernel layout, the model output and the full-size `tensors` (history,
    noise; None where unused) in the same layout, then `args` as the op takes them. Eager calls that
    need no autograd run the op's implementation directly (less host time than the custom op)."""
    x_t, channels_last = kernel_layout(x_t)
    tensors = [like_layout(tensor, channels_last) for tensor in tensors]
    model_output = like_layout(model_output, channels_last)
    if eager(model_output, x_t, *tensors):
        op = IMPLEMENTATIONS[op]
    return op(model_output, x_t, *tensors, *args, channels_last)

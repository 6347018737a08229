"""The few-step solvers' steps (docs/math.md section 8) in PyTorch: the float64 truth for
kernels/solvers.py, on σ = sqrt((1 - ab) / ab) with α = 1 / sqrt(1 + σ²), so x_t = α x0 + σα eps.

Float64 math for float64 inputs, float32 otherwise (coefficients in float64, then cast), each
output rounded once to x_t's dtype. Validated arguments (fastddpm.functional.solvers checks them).
"""
import torch

from fastddpm.timesteps import interp_sigmas, solver_sigmas

from .diffusion import compute_dtype, upcast


def sigma_of(t, schedule, time):
    """float64 σ of each time: a gather (int), np.interp (float timesteps) or σ itself; the end -1 is 0."""
    if time == "sigma":
        return t.to(torch.float64)
    table = solver_sigmas(schedule).to(t.device)
    if t.is_floating_point():
        return torch.where(t >= 0, interp_sigmas(t.clamp(min=0), table), 0.0)
    return torch.where(t >= 0, table[t.clamp(min=0)], 0.0)


def alpha_of(sigma):
    """α = 1/sqrt(1 + σ²): x_t = α x0 + σα eps."""
    return (1 + sigma ** 2).rsqrt()


def x0_hat_of(model_output, x_t, sigma, prediction, clip):
    """x0_hat in the compute dtype: eps (x - s out)/α, x0 out, v α x - s out; clipped to [-1, 1] if clip."""
    channels = x_t.shape[1]
    out = upcast(model_output[:, :channels], x_t)
    x = upcast(x_t, x_t)
    alpha, s = expand(alpha_of(sigma), x_t), expand(sigma * alpha_of(sigma), x_t)
    if prediction == "eps":
        x0 = (x - s * out) / alpha
    elif prediction == "v":
        x0 = alpha * x - s * out
    else:
        x0 = out
    return x0.clamp(-1, 1) if clip else x0


def dpm_solver(model_output, x_t, sigmas, history, *, sde, heun, noise, prediction, clip):
    """DPM-Solver++ of order 1 + len(history) (diffusers' multistep_dpm_solver_*_order_update, the SDE
    third order as k-diffusion's sample_dpmpp_3m_sde); sigmas (σ_s, σ_t, σ of the history)."""
    sigma_s, sigma_t = sigmas[:2]
    m0 = x0_hat_of(model_output, x_t, sigma_s, prediction, clip)
    m = [m0] + [upcast(x0, x_t) for x0 in history]
    final = sigma_t == 0  # every order's limit there is the first-order step
    lam = [-s.log() for s in sigmas]
    h = lam[1] - lam[0]
    alpha_t = alpha_of(sigma_t)
    e = sigma_t / sigma_s  # exp(-h)
    ratio = sigma_t * alpha_t / (sigma_s * alpha_of(sigma_s))
    phi, H = (1 - e ** 2, 2 * h) if sde else (1 - e, h)
    x = expand(ratio * e if sde else ratio, x_t) * upcast(x_t, x_t) + expand(alpha_t * phi, x_t) * m0
    if len(m) >= 2:
        r0 = torch.where(final, 1.0, (lam[0] - lam[2]) / h)
        d1_0 = (m0 - m[1]) / expand(r0, x_t)
        if len(m) == 2:
            d1 = d1_0
            b1 = alpha_t * (1 - phi / H) if heun else 0.5 * alpha_t * phi
        else:
            r1 = torch.where(final, 1.0, (lam[2] - lam[3]) / h)
            d1_1 = (m[1] - m[2]) / expand(r1, x_t)
            d1 = d1_0 + expand(r0 / (r0 + r1), x_t) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / expand(r0 + r1, x_t)
            b1 = alpha_t * (1 - phi / H)
            x = x + expand(torch.where(final, 0.0, alpha_t * ((phi - H) / H ** 2 + 0.5)), x_t) * d2
        x = x + expand(torch.where(final, 0.0, b1), x_t) * d1
    if sde:
        x = x + expand(sigma_t * alpha_t * phi.sqrt(), x_t) * upcast(noise, x_t)
    return x.to(x_t.dtype), m0.to(x_t.dtype)


def euler(model_output, x_t, sigma, sigma_next, *, noise, prediction, clip):
    """Euler (noise None) or Euler ancestral on y = x_t sqrt(1 + σ²) (diffusers' Euler schedulers):
    d = (y - x0)/σ, y' = y + (σ_down - σ) d (+ σ_up z), x' = y'/sqrt(1 + σ'²)."""
    x0 = x0_hat_of(model_output, x_t, sigma, prediction, clip)
    if noise is None:
        sigma_up, sigma_down = torch.zeros_like(sigma), sigma_next
    else:
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2).sqrt()
        sigma_down = (sigma_next ** 2 - sigma_up ** 2).clamp(min=0).sqrt()
    y = upcast(x_t, x_t) / expand(alpha_of(sigma), x_t)
    d = (y - x0) / expand(sigma, x_t)
    y = y + expand(sigma_down - sigma, x_t) * d
    if noise is not None:
        y = y + expand(sigma_up, x_t) * upcast(noise, x_t)
    return (y * expand(alpha_of(sigma_next), x_t)).to(x_t.dtype), x0.to(x_t.dtype)


def heun_correction(model_output, x_mid, sigma, sigma_next, x0_first, *, prediction, clip):
    """Heun's corrector: y' = y + (σ' - σ)(d1 + d2)/2 with y = y_mid - (σ' - σ) d1, d1 = (y_mid - x0_first)/σ'
    (the predictor's slope, also (y - x0_first)/σ), d2 = (y_mid - x0)/σ'; no correction where σ' = 0."""
    x0 = x0_hat_of(model_output, x_mid, sigma_next, prediction, clip)
    y_mid = upcast(x_mid, x_mid) / expand(alpha_of(sigma_next), x_mid)
    safe = expand(torch.where(sigma_next > 0, sigma_next, 1.0), x_mid)
    d1 = (y_mid - upcast(x0_first, x_mid)) / safe
    d2 = (y_mid - x0) / safe
    y = y_mid + expand(torch.where(sigma_next > 0, sigma_next - sigma, 0.0), x_mid) * (d2 - d1) / 2
    return (y * expand(alpha_of(sigma_next), x_mid)).to(x_mid.dtype), x0.to(x_mid.dtype)


def unipc(model_output, x_t, sigmas, history, *, order, corrector_order, prediction, clip):
    """UniPC-bh2, predict_x0 (diffusers' multistep_uni_c_bh_update then multistep_uni_p_bh_update). The
    corrector needs the previous predictor's input only through its output x_t: x_c = x_t - α B(h)
    (corrector residual - the previous predictor's residual)."""
    sigma = sigmas[0]
    m0 = x0_hat_of(model_output, x_t, sigma, prediction, clip)
    m = [m0] + [upcast(x0, x_t) for x0 in history]
    lam = [-s.log() for s in sigmas]
    x = upcast(x_t, x_t)
    if corrector_order:
        h = lam[0] - lam[2]
        b_h = torch.expm1(-h)
        if corrector_order == 1:
            residual = 0.5 * (m0 - m[1])
        else:
            r = (lam[3] - lam[2]) / h
            phi_k1 = b_h / -h - 1
            b1, b2 = phi_k1 / b_h, 2 * (phi_k1 / -h - 0.5) / b_h
            rho0 = (b1 - b2) / (1 - r)  # [[1, 1], [r, 1]] ρ = (b1, b2)
            d1 = (m[2] - m[1]) / expand(r, x_t)
            residual = expand(rho0 - 0.5, x_t) * d1 + expand(b1 - rho0, x_t) * (m0 - m[1])
        x = x - expand(alpha_of(sigma) * b_h, x_t) * residual
    sigma_next = sigmas[1]
    final = sigma_next == 0
    h = lam[1] - lam[0]
    b_h = torch.expm1(-h)
    alpha_next = alpha_of(sigma_next)
    x_next = expand(sigma_next * alpha_next / (sigma * alpha_of(sigma)), x_t) * x - expand(alpha_next * b_h, x_t) * m0
    if order == 2:
        r = torch.where(final, 1.0, (lam[2] - lam[0]) / h)
        x_next = x_next - expand(torch.where(final, 0.0, 0.5 * alpha_next * b_h), x_t) * (m[1] - m0) / expand(r, x_t)
    return x_next.to(x_t.dtype), m0.to(x_t.dtype)


def expand(coefficient, like):
    """A (B,) float64 coefficient as (B, 1, …, 1) in like's compute dtype."""
    return coefficient.to(compute_dtype(like)).reshape(-1, *([1] * (like.ndim - 1)))

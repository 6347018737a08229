"""improved-diffusion's sampling step and bound term, the eager peer the benchmarks time: its
GaussianDiffusion methods (eps prediction, fixed_small variance) op by op, with the helpers they
call and their unused outputs (each costs a gather, which matters where launches dominate).

`tables`: {name: the schedule's float64 table}, one of TABLES each. improved-diffusion keeps them
as numpy arrays that `_extract_into_tensor` copies to the device on every gather: pass host
tables with `copy=True` to time that too.
"""
import math

import torch

TABLES = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
          "posterior_mean_coef2", "posterior_variance", "posterior_log_variance_clipped")


class GaussianDiffusion:
    def __init__(self, tables, copy=False):
        self.tables, self.copy = tables, copy

    def _extract(self, name, t, shape):  # _extract_into_tensor: gather, float32, broadcast to the full shape
        table = self.tables[name]
        values = (table.to(device=t.device) if self.copy else table)[t].float()
        while values.ndim < len(shape):
            values = values[..., None]
        return values.expand(shape)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
                + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        return (mean, self._extract("posterior_variance", t, x_t.shape),
                self._extract("posterior_log_variance_clipped", t, x_t.shape))

    def p_mean_variance(self, model_output, x, t, clip_denoised=True):
        variance = self._extract("posterior_variance", t, x.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)
        pred_xstart = (self._extract("sqrt_recip_alphas_cumprod", t, x.shape) * x
                       - self._extract("sqrt_recipm1_alphas_cumprod", t, x.shape) * model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model_output, x, t, clip_denoised=True):
        out = self.p_mean_variance(model_output, x, t, clip_denoised)
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return sample.to(x.dtype)

    def vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=True):
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where((t == 0), decoder_nll, kl)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def mean_flat(tensor):
    return tensor.mean(dim=list(range(1, len(tensor.shape))))

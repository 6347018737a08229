"""fastddpm.reference: every formula of docs/math.md in plain PyTorch, the float64 truth that the
kernels are tested against. `diffusion`: schedules' forward and reverse process, the losses and the
bound (sections 3-6); `solvers`: the few-step solvers (section 8)."""
from . import solvers
from .diffusion import (DYNAMIC_THRESHOLD_PERCENTILE, approx_standard_normal_cdf, compute_dtype, ddim_step,
                        diffusion_loss, discretized_gaussian_log_likelihood, gather, hybrid_loss, model_log_variance,
                        normal_kl, p_mean_variance, p_sample_step, predict_eps_from_v, predict_eps_from_x0,
                        predict_x0_from_eps, predict_x0_from_v, prior_bpd, process_x0, q_posterior, q_sample,
                        reduce_per_sample, split_model_output, standard_normal_cdf, training_target, upcast,
                        v_target, vb_terms_bpd, vb_terms_with_mse, x0_eps_from_output)

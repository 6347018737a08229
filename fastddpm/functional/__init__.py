"""fastddpm.functional: the DDPM ops in the style of torch.nn.functional.

Tensors first, the schedule next, options keyword-only; `t` a tensor of shape (B,), a timestep per
sample; `prediction` "eps", "x0" or "v" (diffusers' "epsilon", "sample", "v_prediction" and
lucidrains' "pred_noise", "pred_x0", "pred_v" too). Each op validates its arguments, then runs a
fused Triton kernel, the PyTorch path (fastddpm.torch_ops) or, for float64 inputs, the float64
reference (fastddpm.reference): the only place where that choice is made (see fastddpm.backend).
`fastddpm.elbo_bpd` is the bound of a model.
"""
from .bound import discretized_gaussian_log_likelihood, normal_kl, prior_bpd, vb_terms_bpd, vb_terms_with_mse
from .diffusion import ddim_step, p_mean_variance, p_sample_step, q_posterior, q_sample
from .losses import checked_diffusion_loss, diffusion_loss, hybrid_loss, training_noise
from .solvers import dpm_solver_step, euler_ancestral_step, euler_step, heun_step, unipc_step

__all__ = ["q_sample", "q_posterior", "p_mean_variance", "p_sample_step", "ddim_step", "diffusion_loss",
           "normal_kl", "discretized_gaussian_log_likelihood", "vb_terms_bpd", "vb_terms_with_mse", "prior_bpd", "hybrid_loss",
           "dpm_solver_step", "euler_step", "euler_ancestral_step", "heun_step", "unipc_step"]

"""Bad input to every functional op: a clear error naming the argument, on both backends."""
import pytest
import torch
from helpers import use_backend

from fastddpm import NoiseSchedule
from fastddpm import functional as F

S = NoiseSchedule.linear(100)


def x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


T2 = torch.tensor([3, 50])

CASES = [
    # q_posterior
    (lambda: F.q_posterior(x(2, 3, 4), x(2, 3, 5), T2, S), ValueError, r"x0 must have shape \(2, 3, 5\)"),
    (lambda: F.q_posterior(x(2, 3, 4), x(2, 3, 4).long(), T2, S), TypeError, "x_t must be float32"),
    # p_mean_variance
    (lambda: F.p_mean_variance(x(2, 3, 4), x(2, 3, 4), T2, S, prediction="score"), ValueError, "prediction must be one of"),
    (lambda: F.p_mean_variance(x(2, 3, 4), x(2, 3, 4), T2, S, variance="learned"), ValueError, "variance must be one of"),
    (lambda: F.p_mean_variance(x(2, 3, 4), x(2, 3, 4), T2, S, variance="learned_range"), ValueError,
     r"model_output must have shape \(2, 6, 4\)"),
    (lambda: F.p_mean_variance(x(2, 3, 4), x(2, 3, 4), T2, S, clip_denoised="yes"), ValueError,
     "clip_denoised must be one of"),
    (lambda: F.p_mean_variance(x(2, 3, 4), x(2, 3, 4), torch.tensor([1, 2, 3]), S), ValueError, r"t must have shape \(2,\)"),
    # p_sample_step
    (lambda: F.p_sample_step(x(2, 3, 4), x(2, 3, 4), T2, S, noise=x(2, 3)), ValueError, r"noise must have shape"),
    (lambda: F.p_sample_step(x(2, 3, 4), x(2, 3, 4), T2, S, generator="seed"), TypeError, "generator must be"),
    (lambda: F.p_sample_step(x(2, 3, 4), x(2, 3, 4), T2.float(), S), TypeError, "t must be an int64"),
    # ddim_step
    (lambda: F.ddim_step(x(2, 3, 4), x(2, 3, 4), T2, T2 - 1, S, eta=-0.5), ValueError, "eta must be a float >= 0"),
    (lambda: F.ddim_step(x(2, 5, 4), x(2, 3, 4), T2, T2 - 1, S), ValueError, "model_output must have 3"),
    (lambda: F.ddim_step(x(2, 3, 4), x(2, 3, 4), T2, T2 - 1, "schedule"), TypeError, "schedule must be"),
    # diffusion_loss
    (lambda: F.diffusion_loss(x(2, 3, 4), x(2, 3, 4), x(2, 3, 4), T2, S, reduction="avg"), ValueError,
     "reduction must be one of"),
    (lambda: F.diffusion_loss(x(2, 3, 4), x(2, 3, 4), x(2, 3, 4), T2, S, weighting="karras"), ValueError,
     "weighting must be one of"),
    (lambda: F.diffusion_loss(x(2, 3, 4), x(2, 3, 4), x(2, 3, 4), T2, S, weighting=torch.ones(99)), ValueError,
     "weighting tensor must have length T=100"),
    (lambda: F.diffusion_loss(x(2, 3, 5), x(2, 3, 4), x(2, 3, 4), T2, S), ValueError,
     r"model_output must have shape \(2, 3, 4\)"),
    (lambda: F.diffusion_loss(x(2, 3, 4), x(2, 3, 4), x(2, 3, 4), T2, S, prediction="mu"), ValueError,
     "prediction must be one of"),
    # vb_terms_bpd, prior_bpd, normal_kl, discretized likelihood
    (lambda: F.vb_terms_bpd(x(2, 3, 4), x(2, 3, 5), x(2, 3, 4), T2, S), ValueError, r"x0 must have shape \(2, 3, 4\)"),
    (lambda: F.vb_terms_bpd(x(2, 3, 4), x(2, 3, 4), x(2, 3, 4), T2, S, variance="learned_range"), ValueError,
     "model_output must have shape"),
    (lambda: F.prior_bpd(x(3), S), ValueError, r"x0 must have shape \(B, ...\)"),
    (lambda: F.normal_kl(0.0, x(2), x(2), x(2)), TypeError, "mean1 must be a torch.Tensor"),
    (lambda: F.discretized_gaussian_log_likelihood(x(4), x(5), x(4)), ValueError, r"means must have shape \(4,\)"),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input_names_the_argument(backend, call, error, match):
    with use_backend(backend), pytest.raises(error, match=match):
        call()


RANGE_CASES = [
    # (call, the reference's host check, the kernel's device assert)
    (lambda: F.q_posterior(x(2, 3, 4), x(2, 3, 4), torch.tensor([3, 100]), S), r"t must lie in \[0, 100\)",
     r"t must lie in \[0, T\)"),
    (lambda: F.ddim_step(x(2, 3, 4), x(2, 3, 4), T2, torch.tensor([2, -2]), S), r"t_prev must lie in \[-1, 100\)",
     r"t_prev must lie in \[-1, T\)"),
    (lambda: F.p_sample_step(x(2, 3, 4), x(2, 3, 4), torch.tensor([-1, 3]), S), r"t must lie in \[0, 100\)",
     r"t must lie in \[0, T\)"),
    (lambda: F.vb_terms_bpd(x(2, 3, 4), x(2, 3, 4), x(2, 3, 4), torch.tensor([100, 3]), S), r"t must lie in \[0, 100\)",
     r"t must lie in \[0, T\)"),
    (lambda: F.diffusion_loss(x(2, 3, 4), x(2, 3, 4), x(2, 3, 4), torch.tensor([3, 100]), S),
     r"t must lie in \[0, 100\)", r"t must lie in \[0, T\)"),
]


@pytest.mark.parametrize("call, host_message, kernel_message", RANGE_CASES)
def test_out_of_range_timesteps_name_the_argument(call, host_message, kernel_message):
    """The reference checks on the host (ValueError); the kernels check where they load t, with
    a device assert that Triton's interpreter raises (on a GPU: a device-side assert naming t)."""
    with use_backend("reference"), pytest.raises(ValueError, match=host_message):
        call()
    with use_backend("triton"), pytest.raises(Exception, match=kernel_message):
        call()


def test_out_of_range_t_under_compile_is_an_async_assert():
    """Compiled code cannot branch on tensor values: the range check becomes a device assert."""
    def noised(x0, t):
        return F.q_sample(x0, t, x0, S)

    compiled = torch.compile(noised, fullgraph=True, backend="aot_eager")
    x0 = x(2, 3)
    torch.testing.assert_close(compiled(x0, T2), F.q_sample(x0, T2, x0, S))
    with pytest.raises(RuntimeError, match=r"t must lie in \[0, 100\)"):
        compiled(x0, torch.tensor([3, 100]))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_every_op_takes_diffusers_and_lucidrains_prediction_names(backend):
    out, x_t, x0, noise = x(2, 3, 4), x(2, 3, 4), x(2, 3, 4).clamp(-1, 1), x(2, 3, 4)
    with use_backend(backend):
        for ours, *theirs in (("eps", "epsilon", "pred_noise"), ("v", "v_prediction", "pred_v"),
                              ("x0", "sample", "pred_x0")):
            for name in theirs:
                torch.testing.assert_close(F.p_sample_step(out, x_t, T2, S, noise=noise, prediction=name),
                                           F.p_sample_step(out, x_t, T2, S, noise=noise, prediction=ours))
                torch.testing.assert_close(F.ddim_step(out, x_t, T2, T2 - 1, S, prediction=name),
                                           F.ddim_step(out, x_t, T2, T2 - 1, S, prediction=ours))
                torch.testing.assert_close(F.diffusion_loss(out, x0, noise, T2, S, prediction=name),
                                           F.diffusion_loss(out, x0, noise, T2, S, prediction=ours))
                torch.testing.assert_close(F.vb_terms_bpd(out, x0, x_t, T2, S, prediction=name),
                                           F.vb_terms_bpd(out, x0, x_t, T2, S, prediction=ours))

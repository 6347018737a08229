"""The loss on the PyTorch CPU path (`torch_ops.diffusion_loss`, what `functional.diffusion_loss`
runs off Triton) and on the fused kernel, against outside definitions: diffusers' min-SNR
training loss and the ELBO's KL term."""
import math

import pytest
import torch
from helpers import use_backend
import torch.nn.functional as torch_F

from fastddpm import NoiseSchedule
from fastddpm import functional as F
from fastddpm import reference as R
from fastddpm import torch_ops
from fastddpm.testing import plausible_eps

diffusers = pytest.importorskip("diffusers")
GAMMA = 5.0


def compute_snr(scheduler, t):
    """diffusers.training_utils.compute_snr (written out where training_utils cannot be imported)."""
    try:
        from diffusers.training_utils import compute_snr as diffusers_compute_snr
    except ImportError:
        ab = scheduler.alphas_cumprod.to(t.device)[t].float()
        return ab / (1 - ab)
    return diffusers_compute_snr(scheduler, t)


def diffusers_min_snr_loss(pred, target, t, scheduler, prediction):
    """examples/text_to_image/train_text_to_image.py, the snr_gamma branch."""
    snr = compute_snr(scheduler, t)
    weights = torch.stack([snr, GAMMA * torch.ones_like(t)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction == "eps" else weights / (snr + 1)
    loss = torch_F.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()


@pytest.fixture(scope="module")
def scheduler():
    return diffusers.DDPMScheduler(num_train_timesteps=1000)


def batch(shape=(6, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    pred, x0, noise = (torch.randn(shape, generator=g) for _ in range(3))
    return pred, x0, noise, torch.tensor([0, 3, 50, 400, 900, 999])[: shape[0]]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_loss_is_diffusers_text_to_image(reference_backend, scheduler, prediction):
    """diffusers computes snr in float32 (up to 2e-4 relative error), hence the tolerance."""
    schedule = NoiseSchedule.from_diffusers(scheduler)
    pred, x0, noise, t = batch()
    target = noise if prediction == "eps" else scheduler.get_velocity(x0, noise, t)
    expected = diffusers_min_snr_loss(pred, target, t, scheduler, prediction)
    ours = F.diffusion_loss(pred, x0, noise, t, schedule, prediction=prediction, weighting="min_snr", gamma=GAMMA)
    torch.testing.assert_close(ours, expected, rtol=5e-4, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_simple_eps_loss_is_mse_loss(reference_backend, reduction):
    """docs/math.md section 5: with w = 1 and eps prediction, exactly F.mse_loss(pred, eps) (the mean)."""
    pred, x0, noise, t = batch()
    ours = F.diffusion_loss(pred, x0, noise, t, NoiseSchedule.linear(1000), reduction=reduction)
    expected = torch_F.mse_loss(pred, noise) * (pred.shape[0] if reduction == "sum" else 1)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_vlb_weighted_loss_is_the_kl_term_in_nats(backend, prediction):
    """For fixed_small and t >= 1, w_vlb[t] · MSE = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) / D,
    whatever the parameterization (docs/math.md section 5), on the CPU path and on the kernel."""
    schedule = NoiseSchedule.cosine(1000)
    _, x0, noise, _ = batch((5, 3, 6, 6))
    eps_hat = plausible_eps(noise)
    t = torch.tensor([1, 10, 300, 700, 999])
    x_t = R.q_sample(x0.double(), t, noise.double(), schedule)
    x0_hat, _ = R.x0_eps_from_output(eps_hat.double(), x_t, t, schedule, "eps")
    output = R.training_target(x0_hat, t, eps_hat.double(), schedule, prediction)  # the same model, reparameterized
    kl_nats = R.vb_terms_bpd(eps_hat.double(), x0.double(), x_t, t, schedule) * math.log(2)
    with use_backend(backend):
        loss = F.diffusion_loss(output.float(), x0, noise, t, schedule, prediction=prediction, weighting="vlb",
                                reduction="none")
    torch.testing.assert_close(loss.double(), kl_nats, rtol=1e-5, atol=0)  # float32 output and math


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighting", ["simple", "vlb", "snr", "min_snr", "p2"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_cpu_path_is_the_reference(prediction, weighting, dtype):
    """Same value and gradient as reference.diffusion_loss in its own dtype (float32 math)."""
    schedule = NoiseSchedule.cosine(1000)
    pred, x0, noise, t = (x.to(dtype) if x.is_floating_point() else x for x in batch((6, 2, 5, 7)))
    results = []
    for fn in (torch_ops.diffusion_loss, R.diffusion_loss):
        for reduction in ("mean", "sum", "none"):
            leaf = pred.clone().requires_grad_()
            loss = fn(leaf, x0, noise, t, schedule, prediction=prediction, weighting=weighting, gamma=5.0,
                      reduction=reduction)
            (loss * torch.linspace(0.5, 2, loss.numel()).reshape(loss.shape)).sum().backward()
            results.append((loss.detach(), leaf.grad))
    for (ours, our_grad), (exact, exact_grad) in zip(results[:3], results[3:]):
        assert ours.dtype == exact.dtype == torch.float32 and our_grad.dtype == dtype
        torch.testing.assert_close(ours, exact, rtol=1e-5, atol=0)
        torch.testing.assert_close(our_grad, exact_grad, rtol=1e-5, atol=1e-5 * exact_grad.abs().max().item())

"""The loss path of one training step: draw t and noise, q-sample, loss forward and backward.

The model is left out: `pred` is a fresh tensor requiring grad, standing in for its output
(and x_t is returned, so that torch.compile cannot drop the q-sample). Providers, in one run:

- fastddpm: `DiffusionLoss.noise` + `DiffusionLoss.loss`, as users call them. On CUDA the
  fused kernels (noise drawn in q-sample and regenerated in the loss, gradient written in the
  forward pass); on CPU, under backend "auto", the PyTorch path users get there
  (`torch_ops.q_sample` and `torch_ops.diffusion_loss`), not the kernels.
- eager: diffusers' training scripts: `randn_like`, `DDPMScheduler.add_noise`'s formula (in the
  input dtype), `F.mse_loss(pred.float(), noise.float())`; for min_snr the per-sample form of
  diffusers' train_text_to_image.py (`compute_snr`, `min(snr, gamma) / snr`).
- compile: `torch.compile` (Inductor, static shapes) of that same eager code. On CPU, Inductor
  lowers `randn_like` to its own per-element Philox in C++, several times slower than ATen's
  (`torch._inductor.config.fallback_random = True` avoids it); this is the default users get.

Metrics: time (ms; CUDA: triton.testing.do_bench; CPU: the process's CPU time over repeats
with the providers interleaved, so that other load on the machine does not distort the
comparison; `main` runs one thread on CPU unless told otherwise), bytes of the traffic
model's floor (docs/math.md section 7: read x0, write x_t, read pred, write grad: 4N for the eps
target) and the bandwidth that floor implies at the measured time (the same bytes for every
provider, so GB/s ranks them as time does), peak memory on CUDA.

    python -m fastddpm.benchmarks.bench_loss            # CPU: small sizes, under a minute
    python -m fastddpm.benchmarks.bench_loss --full     # the sizes below (GPU)
"""
import time

import torch
import torch.nn.functional as F

from fastddpm import NoiseSchedule
from fastddpm.loss import DiffusionLoss

from . import harness

FULL_SIZES = ((128, 3, 32, 32), (32, 3, 256, 256), (64, 4, 64, 64))
CPU_SIZES = ((32, 3, 32, 32), (8, 4, 64, 64))
DTYPES = (torch.float32, torch.bfloat16)
WEIGHTINGS = ("simple", "min_snr")
PROVIDERS = ("fastddpm", "eager", "compile")
MIN_SNR_GAMMA = 5.0


def add_noise(x0, noise, t, alphas_cumprod):
    """diffusers' DDPMScheduler.add_noise: the table cast to the input dtype first."""
    alphas_cumprod = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    sqrt_alpha_prod = (alphas_cumprod[t] ** 0.5).flatten().reshape(shape)
    sqrt_one_minus_alpha_prod = ((1 - alphas_cumprod[t]) ** 0.5).flatten().reshape(shape)
    return sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * noise


def compute_snr(alphas_cumprod, t):
    """diffusers.training_utils.compute_snr, in float32 as there."""
    alpha = (alphas_cumprod ** 0.5).to(t.device)[t].float()
    sigma = ((1.0 - alphas_cumprod) ** 0.5).to(t.device)[t].float()
    return (alpha / sigma) ** 2


def eager_loss_path(x0, pred, alphas_cumprod, weighting):
    """The loss path of diffusers' example training scripts (eps prediction)."""
    noise = torch.randn_like(x0)
    t = torch.randint(0, alphas_cumprod.numel(), (x0.shape[0],), device=x0.device)
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    return eager_loss(pred, noise, t, alphas_cumprod, weighting), x_t


def eager_loss(pred, noise, t, alphas_cumprod, weighting):
    """diffusers' loss of an eps prediction: the MSE, or for min_snr the per-sample form of
    train_text_to_image.py."""
    if weighting == "simple":
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")
    snr = compute_snr(alphas_cumprod, t)
    weights = torch.stack([snr, MIN_SNR_GAMMA * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
    loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()


def loss_paths(schedule, weighting):
    """{provider: fn(x0, pred) -> (loss, x_t)}."""
    loss_fn = DiffusionLoss(schedule, prediction="eps", weighting=weighting, gamma=MIN_SNR_GAMMA)
    alphas_cumprod = schedule.alphas_cumprod.float()

    def fastddpm(x0, pred):
        x_t, _, state = loss_fn.noise(x0)
        return loss_fn.loss(pred, x0, state), x_t

    def eager(x0, pred):
        return eager_loss_path(x0, pred, alphas_cumprod, weighting)

    # a fresh compile for every shape and dtype (static shapes, no recompile limit reached)
    torch.compiler.reset()
    return {"fastddpm": fastddpm, "eager": eager, "compile": torch.compile(eager, dynamic=False)}


def floor_bytes(x0):
    """docs/math.md section 7, eps target: read x0, write x_t, read pred, write grad."""
    return 4 * x0.numel() * x0.element_size()


def run(sizes=None, dtypes=DTYPES, device=None, weightings=WEIGHTINGS, providers=PROVIDERS, reps=None):
    """Long-format rows (see harness.FIELDS) for every size, dtype, weighting and provider."""
    device = harness.resolve_device(device)
    on_cuda = device.type == "cuda"
    sizes = sizes or (FULL_SIZES if on_cuda else CPU_SIZES)
    reps = reps or (100 if on_cuda else 30)
    schedule = NoiseSchedule.linear(1000)
    base = dict(mode="full", **harness.environment(device))
    rows = []
    for weighting in weightings:
        for dtype in dtypes:
            for size in sizes:
                x0 = (torch.rand(size, device=device) * 2 - 1).to(dtype)  # data in [-1, 1]
                pred = torch.randn(size, device=device, dtype=dtype, requires_grad=True)
                paths = loss_paths(schedule, weighting)
                steps = {name: make_step(paths[name], x0, pred) for name in providers}
                if on_cuda:
                    times = harness.time_cuda(steps, grad_to_none=[pred])
                else:
                    times = harness.time_cpu(steps, reps, clock=time.process_time)
                where = dict(base, op=f"loss_step_{weighting}", **harness.case_fields(size, dtype))
                for name, step in steps.items():
                    rows += harness.case_rows(where, name, times[name], floor_bytes(x0),
                                              harness.peak_mb(step, device) if on_cuda else None)
    return rows


def make_step(path, x0, pred):
    """One loss path with its backward, on fresh gradients."""
    def step():
        pred.grad = None
        loss, _ = path(x0, pred)
        loss.backward()
    return step


def main(argv=None):
    args = harness.parser(__doc__.split("\n")[0], FULL_SIZES, threads=1).parse_args(argv)
    dtypes = harness.setup(args)
    rows = run(sizes=FULL_SIZES if args.full else None, dtypes=dtypes, device=args.device, reps=args.reps)
    harness.report(rows, args.out)
    return rows


if __name__ == "__main__":
    main()

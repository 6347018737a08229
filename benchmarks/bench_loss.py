"""The loss path of one training step: draw t and noise, q-sample, loss forward and backward.

The model is left out: `pred` is a fresh tensor requiring grad, standing in for its output
(and x_t is returned, so that torch.compile cannot drop the q-sample). Providers, in one run:

- fastddpm: `DiffusionLoss.noise` + `DiffusionLoss.loss`, as users call them. On CUDA the
  fused kernels (noise drawn in q-sample and regenerated in the loss, gradient written in the
  forward pass); on CPU, under backend "auto", the PyTorch path users get there
  (`torch_ops.q_sample` and `torch_ops.diffusion_loss`), not the kernels.
- eager: diffusers' training scripts, with diffusers' own code: `randn_like`, `randint`,
  `DDPMScheduler.add_noise` (in the input dtype), `F.mse_loss(pred.float(), noise.float())`; for
  min_snr the per-sample form of train_text_to_image.py (`diffusers.training_utils.compute_snr`,
  `min(snr, gamma) / snr`).
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


def diffusers_scheduler(schedule):
    """diffusers' DDPMScheduler with the schedule's betas (its tables in float32, as diffusers keeps them)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.tolist())


def eager_loss_path(schedule, weighting):
    """fn(x0, pred) -> (loss, x_t): the loss path of diffusers' example training scripts (eps
    prediction), their own calls: randn_like, randint, `DDPMScheduler.add_noise`, then `eager_loss`."""
    scheduler = diffusers_scheduler(schedule)
    loss = eager_loss(scheduler, weighting)

    def path(x0, pred):
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = scheduler.add_noise(x0, noise, t)
        return loss(pred, noise, t), x_t
    return path


def eager_loss(scheduler, weighting):
    """fn(pred, noise, t): diffusers' loss of an eps prediction, `F.mse_loss(pred.float(),
    noise.float())`, or for min_snr the per-sample form of train_text_to_image.py with
    diffusers.training_utils.compute_snr."""
    if weighting == "simple":
        return lambda pred, noise, t: F.mse_loss(pred.float(), noise.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    def min_snr(pred, noise, t):
        snr = compute_snr(scheduler, t)
        weights = torch.stack([snr, MIN_SNR_GAMMA * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
        return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
    return min_snr


def loss_paths(schedule, weighting):
    """{provider: fn(x0, pred) -> (loss, x_t)}."""
    loss_fn = DiffusionLoss(schedule, prediction="eps", weighting=weighting, gamma=MIN_SNR_GAMMA)

    def fastddpm(x0, pred):
        x_t, _, state = loss_fn.noise(x0)
        return loss_fn.loss(pred, x0, state), x_t

    eager = eager_loss_path(schedule, weighting)
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

"""The hot paths that `traffic` counts and `host_overhead` times, fastddpm beside its peers.

Each `Case` builds, for a size and its dtype, one no-argument step per provider on fixed inputs.
A model output tensor stands in for the model (no model call). Providers:

- fastddpm: the public API on backend "triton" (the kernels; Triton's interpreter on CPU);
  reference: the same calls on backend "reference" (fastddpm's PyTorch path).
- diffusers: its training scripts' loss path with diffusers' own code (`bench_loss.eager_loss_path`:
  randn_like, randint, DDPMScheduler.add_noise, F.mse_loss(pred.float(), noise.float()), min-SNR
  as train_text_to_image.py with training_utils.compute_snr)
  and the real `DDPMScheduler.step` / `DDIMScheduler.step`, one timestep for the batch, the
  scheduler set up as its pipelines do (`set_timesteps(1000)` for DDPM, 50 for DDIM); its
  tables and per-step scalars stay on the host (`Step.host`).
- improved-diffusion: `GaussianDiffusion.p_sample` (transcribed in benchmarks/improved_diffusion.py)
  and `_vb_terms_bpd` (clip_denoised=True as its bits/dim evaluation): its tables are
  float64 numpy arrays on the host, copied to the device at every gather (`Step.host`).

Options match across providers: eps prediction, fixed_small variance, x0_hat clipped to [-1, 1]
in the DDPM step (diffusers' default clip_sample) and the vb term, not in DDIM (ddim_step's
default; DDIMScheduler with clip_sample=False). The floor is docs/math.md section 7's traffic of the
fused pass, in full-tensor passes.
"""
import dataclasses

import torch

import fastddpm
from fastddpm import NoiseSchedule
from fastddpm import functional as F
from fastddpm.loss import DiffusionLoss

from . import bench_loss, bench_sampling
from .improved_diffusion import TABLES, GaussianDiffusion

SIZE = (16, 3, 32, 32)
T = 1000
DDIM_STEPS = 50


@dataclasses.dataclass
class Step:
    fn: object  # no-argument callable: one call of the path
    host: tuple = ()  # tensors that live on the host on a GPU (diffusers' scheduler state)
    backend: str | None = None  # the fastddpm backend it runs under (set around the calls, not in them)

    def on_backend(self):
        """A with-block under its backend (the current one where it names none)."""
        return fastddpm.use_backend(self.backend or fastddpm.get_backend())

    def run(self):
        """One call under its backend."""
        with self.on_backend():
            return self.fn()


@dataclasses.dataclass(eq=False)
class Case:
    op: str
    dtype: torch.dtype
    mode: str  # "full": forward and backward
    floor_passes: int  # full-tensor passes of the fused floor
    floor_launches: int  # one fused kernel per model call boundary
    build: object  # build(size, dtype) -> (main tensor, {provider: Step})

    def steps(self, size=SIZE):
        return self.build(size, self.dtype)

    @property
    def floor(self):
        """Bytes per element of the floor."""
        return self.floor_passes * self.dtype.itemsize


def _inputs(size, dtype, low=0):
    """(x, model_output, t): fixed random inputs, t in [low, T)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, generator=generator).to(dtype)
    output = torch.randn(size, generator=generator).to(dtype)
    return x, output, torch.randint(low, T, (size[0],), generator=generator)


# -- loss forward and backward ---------------------------------------------------------------


def loss_case(weighting):
    def build(size, dtype):
        schedule = NoiseSchedule.linear(T)
        x0 = (torch.rand(size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)  # data in [-1, 1]
        pred = torch.randn(size).to(dtype).requires_grad_()
        loss_fn = DiffusionLoss(schedule, weighting=weighting, gamma=bench_loss.MIN_SNR_GAMMA)
        eager_loss_path = bench_loss.eager_loss_path(schedule, weighting)

        def fastddpm_loss():
            pred.grad = None
            x_t, _, state = loss_fn.noise(x0)
            loss_fn.loss(pred, x0, state).backward()

        def diffusers_loss():
            pred.grad = None
            loss, _ = eager_loss_path(x0, pred)
            loss.backward()

        return x0, {"fastddpm": Step(fastddpm_loss, backend="triton"),
                    "reference": Step(fastddpm_loss, backend="reference"),
                    "diffusers": Step(diffusers_loss)}
    return build


# -- reverse steps ---------------------------------------------------------------------------


def _host_state(scheduler, *extra):
    return tuple(value for value in vars(scheduler).values() if isinstance(value, torch.Tensor)) + extra


def p_sample_build(size, dtype):
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule.linear(T)
    x, output, t = _inputs(size, dtype, low=1)
    steps = bench_sampling.step_providers(schedule, x.device, providers=("fastddpm", "eager"))
    scheduler = DDPMScheduler(num_train_timesteps=T)  # clip_sample, fixed_small, epsilon: as fastddpm's step here
    scheduler.set_timesteps(T)
    timestep = scheduler.timesteps[T // 2]
    return x, {"fastddpm": Step(lambda: steps["fastddpm"](output, x, t), backend="triton"),
               "reference": Step(lambda: steps["fastddpm"](output, x, t), backend="reference"),
               "diffusers": Step(lambda: scheduler.step(output, timestep, x).prev_sample,
                                 _host_state(scheduler, timestep)),
               "improved-diffusion": Step(lambda: steps["eager"](output, x, t),
                                          tuple(getattr(schedule, name) for name in TABLES))}


def ddim_build(eta):
    def build(size, dtype):
        from diffusers import DDIMScheduler

        schedule = NoiseSchedule.linear(T)
        x, output, _ = _inputs(size, dtype)
        scheduler = DDIMScheduler(num_train_timesteps=T, clip_sample=False)  # as ddim_step's default
        scheduler.set_timesteps(DDIM_STEPS)
        timestep = scheduler.timesteps[DDIM_STEPS // 2]
        t = torch.full((size[0],), int(timestep))
        t_prev = t - T // DDIM_STEPS

        def fastddpm_step():
            return F.ddim_step(output, x, t, t_prev, schedule, eta=eta)

        return x, {"fastddpm": Step(fastddpm_step, backend="triton"),
                   "reference": Step(fastddpm_step, backend="reference"),
                   "diffusers": Step(lambda: scheduler.step(output, timestep, x, eta=eta).prev_sample,
                                     _host_state(scheduler, timestep))}
    return build


# -- the variational bound's term ------------------------------------------------------------


def vb_build(size, dtype):
    schedule = NoiseSchedule.linear(T)
    x0, output, t = _inputs(size, dtype)
    x_t = fastddpm.reference.q_sample(x0, t, torch.randn_like(x0), schedule)
    peer = GaussianDiffusion({name: getattr(schedule, name) for name in TABLES}, copy=True)

    def fastddpm_vb():
        return F.vb_terms_bpd(output, x0, x_t, t, schedule, clip_denoised=True)

    return x0, {"fastddpm": Step(fastddpm_vb, backend="triton"),
                "reference": Step(fastddpm_vb, backend="reference"),
                "improved-diffusion": Step(lambda: peer.vb_terms_bpd(output, x0, x_t, t),
                                           tuple(peer.tables.values()))}


# -- few-step solvers: one step in the middle of a 20-step run, the history filled -----------------

SOLVER_STEPS = 20


def solver_build(method):
    """One step k = 10 of 20 (linspace spacing, eps): fastddpm's functional step with its history
    against the diffusers scheduler's `step`, run through the first k steps once, its state (step
    index, stored outputs) set back before every call."""
    def build(size, dtype):
        import diffusers

        from fastddpm import timesteps as TS

        schedule = NoiseSchedule.linear(T)
        x, output, _ = _inputs(size, dtype)
        history = [torch.randn(size, generator=torch.Generator().manual_seed(k)).to(dtype) for k in (1, 2)]
        k = SOLVER_STEPS // 2
        kind, options = {
            "dpm++2m": ("DPMSolverMultistepScheduler", {}),
            "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
            "unipc": ("UniPCMultistepScheduler", {}),
            "euler": ("EulerDiscreteScheduler", {}),
            "euler-a": ("EulerAncestralDiscreteScheduler", {}),
        }[method]
        scheduler = getattr(diffusers, kind)(num_train_timesteps=T, **options)
        scheduler.set_timesteps(SOLVER_STEPS)
        timestep = scheduler.timesteps[k]
        multistep = method in ("dpm++2m", "dpm++2m-sde", "unipc")
        plan = (TS.multistep_schedule(schedule, SOLVER_STEPS, scheduler="unipc" if method == "unipc" else "dpmsolver")
                if multistep else TS.euler_schedule(schedule, SOLVER_STEPS))
        batch = size[0]
        sigma, sigma_next, *older = (plan.sigmas[i].expand(batch).float() for i in (k, k + 1, k - 1, k - 2))
        sample = x if multistep else x * (1 + plan.sigmas[k] ** 2) ** 0.5
        for step in range(k):
            if not multistep:
                scheduler.scale_model_input(sample, scheduler.timesteps[step])
            scheduler.step(output, scheduler.timesteps[step], sample)
        state = {key: list(value) if isinstance(value, list) else value for key, value in vars(scheduler).items()}

        def diffusers_step():
            vars(scheduler).update({key: list(value) if isinstance(value, list) else value
                                    for key, value in state.items()})
            if not multistep:  # the Euler family's pipelines scale the model input at every step
                scheduler.scale_model_input(sample, timestep)
            return scheduler.step(output, timestep, sample).prev_sample

        def fastddpm_step():
            if method in ("dpm++2m", "dpm++2m-sde"):
                return F.dpm_solver_step(output, x, sigma, sigma_next, schedule, history=((history[0], older[0]),),
                                         solver="sde-dpmsolver++" if method.endswith("sde") else "dpmsolver++",
                                         time="sigma")
            if method == "unipc":
                return F.unipc_step(output, x, sigma, sigma_next, schedule, time="sigma",
                                    history=((history[0], older[0]), (history[1], older[1])))
            step = F.euler_ancestral_step if method == "euler-a" else F.euler_step
            return step(output, x, sigma, sigma_next, schedule, time="sigma")

        host = tuple(v for v in state.values() if isinstance(v, torch.Tensor) and v.numel() <= T + 1) + (timestep,)
        return x, {"fastddpm": Step(fastddpm_step, backend="triton"),
                   "reference": Step(fastddpm_step, backend="reference"),
                   "diffusers": Step(diffusers_step, host)}
    return build


CASES = (
    # read x0, write x_t | read pred, write grad (the backward launches nothing): 2 kernels
    Case("loss_simple", torch.float32, "full", 4, 2, loss_case("simple")),
    Case("loss_min_snr", torch.bfloat16, "full", 4, 2, loss_case("min_snr")),
    # read x_t and the model output, write x_{t-1}, noise drawn in the kernel
    Case("p_sample_step", torch.float32, "forward", 3, 1, p_sample_build),
    Case("ddim_step", torch.float32, "forward", 3, 1, ddim_build(0.0)),
    Case("ddim_step_eta1", torch.float32, "forward", 3, 1, ddim_build(1.0)),
    # read the model output, x0 and x_t
    Case("vb_terms", torch.float32, "forward", 3, 1, vb_build),
    # read x_t, the model output and the history, write x_prev and x0_hat
    Case("dpm++2m_step", torch.float32, "forward", 5, 1, solver_build("dpm++2m")),
    Case("dpm++2m-sde_step", torch.float32, "forward", 5, 1, solver_build("dpm++2m-sde")),
    Case("unipc_step", torch.float32, "forward", 6, 1, solver_build("unipc")),
    Case("euler_step", torch.float32, "forward", 4, 1, solver_build("euler")),
    Case("euler-a_step", torch.float32, "forward", 4, 1, solver_build("euler-a")),
)

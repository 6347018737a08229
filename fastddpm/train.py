"""`fastddpm train`: a DDPM trained end to end, then sampled and evaluated.

One process, or several under `torchrun` (DistributedDataParallel: gloo on CPU, nccl on CUDA;
each rank its own slice of every batch and its own noise; losses and metrics averaged across
ranks). The run folder `--out` holds:

- checkpoint.pt: model, EMA, optimizer, step, every rank's RNG state and the loss of every
  step, written atomically every `checkpoint_every` steps and at the end; `--resume` continues
  it exactly where it stopped (same batches, same noise: the weights are bit-identical to an
  uninterrupted run on the same machine);
- samples.png, loss.png, metrics.json: a grid of samples of the EMA model, the loss curve,
  the test split's bits/dim (negative ELBO) and, for the digits, how recognisable the samples
  are to a classifier trained on the real digits.

Ctrl-C (SIGINT) or SIGTERM stop at the next step boundary and save a checkpoint first. A
non-finite loss stops the run with the step that produced it; the checkpoint on disk is then
the last one whose every loss was finite.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from .data import BatchSampler, load_images, train_test_split
from .loss import DiffusionLoss
from .options import METHODS, PREDICTIONS, SCHEDULES, TIMESTEP_SAMPLERS, VARIANCES, WEIGHTINGS
from .schedule import NoiseSchedule
from .train_step import TrainStep
from .unet import PRESETS, UNet, compile_unet

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
CONFIDENT = 0.9  # a sample counts as a recognisable digit if the classifier gives it this probability


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; the defaults train the digits on 2 CPU cores in under 10 minutes."""
    data: str = "digits"  # "digits", a folder of images, or an .npy file
    out: str = "runs/digits"
    test_fraction: float = 0.1
    preset: str = "tiny"
    model_channels: int | None = None  # overrides the preset's width
    timesteps: int = 1000
    schedule: str = "linear"
    prediction: str = "eps"
    weighting: str = "simple"
    gamma: float = 5.0
    variance: str = "fixed_small"  # "learned_range": a 2C-channel model trained on the hybrid loss
    timestep_sampler: str = "uniform"
    steps: int = 2000
    batch_size: int = 128  # the global batch, split across processes
    lr: float = 1e-3
    warmup: int = 200
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.999
    seed: int = 0
    compile: bool = False
    log_every: int = 50
    checkpoint_every: int = 500
    num_samples: int = 100
    sample_method: str = "ddpm"  # ancestral sampling gives cleaner digits than DDIM at 100 steps
    sample_steps: int | None = 100  # respaced from T
    eta: float = 0.0
    elbo_timesteps: int | None = 100  # K-sample estimate of the bound; None: every t (slow)
    device: str | None = None
    threads: int | None = None

    def validate(self):
        positive = ("timesteps", "steps", "batch_size", "log_every", "checkpoint_every", "num_samples")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"--grad-clip must be > 0 (or omitted), got {self.grad_clip}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"--test-fraction must lie in [0, 1), got {self.test_fraction}")
        for name, value, choices in (("preset", self.preset, sorted(PRESETS)), ("schedule", self.schedule, SCHEDULES),
                                     ("prediction", self.prediction, PREDICTIONS),
                                     ("weighting", self.weighting, WEIGHTINGS),
                                     ("variance", self.variance, VARIANCES),
                                     ("timestep-sampler", self.timestep_sampler, TIMESTEP_SAMPLERS),
                                     ("sample-method", self.sample_method, METHODS)):
            if value not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}; got {value!r}")
        if self.compile and self.timestep_sampler != "uniform":
            raise ValueError("--timestep-sampler loss-second-moment updates its history outside the graph: "
                             "it cannot run with --compile")
        if self.sample_steps is not None and not 1 <= self.sample_steps <= self.timesteps:
            raise ValueError(f"--sample-steps must lie in [1, {self.timesteps}], got {self.sample_steps}")
        if self.elbo_timesteps is not None and not 2 <= self.elbo_timesteps <= self.timesteps:
            raise ValueError(f"--elbo-timesteps must lie in [2, {self.timesteps}], got {self.elbo_timesteps}")


# Settings a resumed run may change; any other must match the checkpoint.
RESUMABLE = {"out", "steps", "log_every", "checkpoint_every", "num_samples", "sample_method", "sample_steps", "eta",
             "elbo_timesteps", "device", "threads", "compile"}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not a fastddpm checkpoint."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; `step` is the first step that produced it."""

    def __init__(self, step, value, checkpoint):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        saved = (f"the last good checkpoint is {checkpoint}" if checkpoint
                 else "no checkpoint was saved before it")
        super().__init__(f"the loss became {value} at step {step}; training stopped and {saved}. "
                         "Try a lower --lr, gradient clipping (--grad-clip) or check the data")


class TrainingInterrupted(RuntimeError):
    """The run was stopped by a signal after saving a checkpoint at `step`."""

    def __init__(self, step, checkpoint):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted at step {step}; saved {checkpoint}: continue with --resume")


# -- the run -----------------------------------------------------------------------------------


def train(config, *, resume=False, progress=True, print_fn=print):
    """Train, sample and evaluate as `config` says; return the metrics (also in metrics.json)."""
    config.validate()
    with _distributed(config) as env:
        run = _Run(config, env, resume=resume, progress=progress, print_fn=print_fn)
        run.fit()
        return run.finish()


@dataclasses.dataclass
class _Env:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


@contextlib.contextmanager
def _distributed(config):
    """Rank, world size and device; a process group when launched by torchrun with several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    previous_threads = torch.get_num_threads()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(config.threads or default_threads(local_world))
    started_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started_group = True
    try:
        yield _Env(rank, world_size, device)
    finally:
        if started_group:
            dist.destroy_process_group()
        torch.set_num_threads(previous_threads)


class _Run:
    def __init__(self, config, env, *, resume, progress, print_fn):
        self.config, self.env, self.progress = config, env, progress
        self.print = print_fn if env.is_main else (lambda *args, **kwargs: None)
        self.checkpoint_path = os.path.join(config.out, CHECKPOINT_NAME)
        saved = None
        if resume:
            saved = load_checkpoint(self.checkpoint_path)
            self.config = config = _resumed_config(saved["config"], config)
        elif os.path.exists(self.checkpoint_path):
            raise CheckpointError(f"{config.out} already holds a run ({CHECKPOINT_NAME}): continue it with --resume, "
                                  "or choose another --out")
        device = env.device

        images, labels = load_images(config.data)
        self.train_images, self.test_images, self.train_labels, self.test_labels = train_test_split(
            images, labels, config.test_fraction, seed=config.seed)
        self.sampler = BatchSampler(self.train_images.shape[0], config.batch_size, rank=env.rank,
                                    world_size=env.world_size, seed=config.seed, device=device)
        self.train_on_device = self.train_images.to(device)
        self.schedule = make_schedule(config.schedule, config.timesteps)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = build_model(config, self.train_images.shape[1:]).to(device)
        loss_fn = DiffusionLoss(self.schedule, prediction=config.prediction, weighting=config.weighting,
                                gamma=config.gamma, variance=config.variance, timestep_sampler=config.timestep_sampler)
        self.timestep_sampler = loss_fn.timestep_sampler
        if self.timestep_sampler is not None:
            self.timestep_sampler.to(device)
        self.trainer = TrainStep(self.model, loss_fn, lr=config.lr, ema_decay=config.ema_decay,
                                 grad_clip=config.grad_clip, warmup_steps=config.warmup, compile=config.compile)
        if env.distributed:
            # TrainStep keeps the plain module (its EMA is a plain copy); the loss calls the DDP wrapper.
            from torch.nn.parallel import DistributedDataParallel
            ids = [device.index] if device.type == "cuda" else None
            self.trainer.model = DistributedDataParallel(self.model, device_ids=ids)
        # A different noise stream per rank.
        torch.manual_seed(config.seed * 7919 + 1 + env.rank)
        if device.type == "cuda":
            torch.cuda.manual_seed(config.seed * 7919 + 1 + env.rank)

        self.step = 0
        self.loss_history = []
        self.saved_step = None
        self.train_seconds = 0.0
        self.images_seen = 0
        if saved is not None:
            self._restore(saved)
        self.print(f"fastddpm train: {config.data} ({self.train_images.shape[0]} train / {self.test_images.shape[0]} "
                   f"test images of {tuple(self.train_images.shape[1:])}), UNet '{config.preset}' "
                   f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters, T={config.timesteps}, "
                   f"{env.world_size} process(es) on {device}"
                   + (f" ({torch.get_num_threads()} thread(s) each)" if device.type == "cpu" else "")
                   + (f", resumed at step {self.step}" if saved is not None else ""))

    # -- training loop ---------------------------------------------------------------------

    def fit(self):
        config, env = self.config, self.env
        if self.step >= config.steps:
            self.print(f"already trained for {self.step} steps (--steps {config.steps})")
            return
        bar = _progress_bar(total=config.steps, initial=self.step, enabled=self.progress and env.is_main)
        pending, interval_start, interval_steps = [], time.perf_counter(), 0
        stop = _StopFlag()
        with stop.installed():
            while self.step < config.steps:
                x0 = self.train_on_device[self.sampler.indices(self.step)]
                if config.ema_decay is not None:
                    self.trainer.ema_decay = ema_decay_at(self.step, config.ema_decay)
                pending.append(self.trainer.step(x0))
                self.step += 1
                interval_steps += 1
                bar.update(1)
                at_checkpoint = self.step % config.checkpoint_every == 0 or self.step == config.steps
                stopping = stop.requested if not env.distributed else False
                if self.step % config.log_every == 0 or at_checkpoint or stopping:
                    self._flush(pending)
                    pending = []
                    elapsed = time.perf_counter() - interval_start
                    self.train_seconds += elapsed
                    self.images_seen += interval_steps * self.sampler.global_batch
                    images_per_second = interval_steps * self.sampler.global_batch / max(elapsed, 1e-9)
                    window = self.loss_history[-config.log_every:]
                    bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", img_s=f"{images_per_second:.0f}")
                    if env.distributed:
                        stopping = _any_rank(stop.requested, env.device)
                    if at_checkpoint or stopping:
                        self.save()
                    if stopping:
                        bar.close()
                        raise TrainingInterrupted(self.step, self.checkpoint_path)
                    interval_start, interval_steps = time.perf_counter(), 0
        bar.close()

    def _flush(self, pending):
        """Average the pending steps' losses across ranks, check them, append them to the history."""
        losses = torch.stack(pending).float()
        if self.env.distributed:
            dist.all_reduce(losses)
            losses /= self.env.world_size
        values = losses.tolist()
        first_step = self.step - len(values) + 1
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(first_step + offset, value,
                                         self.checkpoint_path if self.saved_step is not None else None)
        self.loss_history.extend(values)

    # -- checkpoints -----------------------------------------------------------------------

    def save(self):
        """Write checkpoint.pt atomically (rank 0), with every rank's RNG state."""
        rng = {"cpu": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device)
        if self.env.distributed:
            all_rng = [None] * self.env.world_size
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        if self.env.is_main:
            trainer = self.trainer
            state = {
                "fastddpm_checkpoint": CHECKPOINT_FORMAT,
                "config": dataclasses.asdict(self.config),
                "unet_config": dict(self.model.config),
                "image_shape": tuple(self.train_images.shape[1:]),
                "step": self.step,
                "model": self.model.state_dict(),
                "ema": trainer.ema_model.state_dict() if trainer.ema_model is not None else None,
                "optimizer": trainer.optimizer.state_dict(),
                "loss_history": list(self.loss_history),
                "rng": all_rng,
                "world_size": self.env.world_size,
                "train_seconds": self.train_seconds,
                "images_seen": self.images_seen,
                "timestep_sampler": None if self.timestep_sampler is None else self.timestep_sampler.state_dict(),
            }
            os.makedirs(self.config.out, exist_ok=True)
            temporary = self.checkpoint_path + ".tmp"
            torch.save(state, temporary)
            os.replace(temporary, self.checkpoint_path)  # a crash mid-write leaves the previous checkpoint
        self.saved_step = self.step
        if self.env.distributed:
            dist.barrier()

    def _restore(self, saved):
        self.model.load_state_dict(saved["model"])
        if self.trainer.ema_model is not None:
            if saved["ema"] is None:
                raise CheckpointError(f"{self.checkpoint_path} holds no EMA weights but the run keeps an EMA")
            self.trainer.ema_model.load_state_dict(saved["ema"])
        self.trainer.optimizer.load_state_dict(saved["optimizer"])
        if self.timestep_sampler is not None:
            self.timestep_sampler.load_state_dict(saved["timestep_sampler"])
        self.step = self.trainer.num_steps = saved["step"]
        self.loss_history = list(saved["loss_history"])
        self.saved_step = saved["step"]
        self.train_seconds = saved["train_seconds"]
        self.images_seen = saved["images_seen"]
        if saved["world_size"] == self.env.world_size:
            rng = saved["rng"][self.env.rank]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.env.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.env.device)
        else:
            self.print(f"warning: the checkpoint was written by {saved['world_size']} process(es), this run has "
                       f"{self.env.world_size}: the noise streams restart (the run continues, not bit-exactly)")
            torch.manual_seed(self.config.seed * 7919 + 1 + self.env.rank + 104729 * self.step)

    # -- evaluation ------------------------------------------------------------------------

    def finish(self):
        config, env = self.config, self.env
        ema = self.trainer.ema_model if self.trainer.ema_model is not None else self.model
        ema.eval()
        network = compile_unet(ema) if config.compile else ema
        metrics = {"steps": self.step, "train_images": int(self.train_images.shape[0]),
                   "test_images": int(self.test_images.shape[0]), "world_size": env.world_size,
                   "device": str(env.device), "threads_per_process": torch.get_num_threads(),
                   "train_seconds": round(self.train_seconds, 1),
                   "final_loss": _mean(self.loss_history[-100:])}
        if self.train_seconds > 0:
            metrics["images_per_second"] = round(self.images_seen / self.train_seconds, 1)

        if self.test_images.shape[0] > 0:
            start = time.perf_counter()
            metrics["test_bpd"] = evaluate_bpd(
                network, self.test_images[env.rank::env.world_size].to(env.device), self.schedule,
                prediction=config.prediction, variance=config.variance, timesteps=config.elbo_timesteps,
                seed=config.seed + env.rank, distributed=env.distributed, progress=self.progress and env.is_main)
            metrics["test_bpd"]["elbo_timesteps"] = config.elbo_timesteps or config.timesteps
            metrics["elbo_seconds"] = round(time.perf_counter() - start, 1)
            self.print(f"test bits/dim: {metrics['test_bpd']['total_bpd']:.3f} "
                       f"(K={metrics['test_bpd']['elbo_timesteps']} timestep estimate of the negative ELBO, "
                       f"{self.test_images.shape[0]} test images)")

        if env.is_main:
            start = time.perf_counter()
            samples = draw_samples(network, config.num_samples, tuple(self.train_images.shape[1:]), self.schedule,
                                   method=config.sample_method, steps=config.sample_steps, eta=config.eta,
                                   prediction=config.prediction, variance=config.variance, seed=config.seed,
                                   device=env.device, progress=self.progress)
            metrics["sample_seconds"] = round(time.perf_counter() - start, 1)
            metrics["sampling"] = {"method": config.sample_method, "steps": config.sample_steps or config.timesteps,
                                   "eta": config.eta}
            save_grid(samples, os.path.join(config.out, "samples.png"))
            save_loss_curve(self.loss_history, os.path.join(config.out, "loss.png"))
            metrics["nearest_neighbour"] = nearest_neighbour_stats(samples, self.train_images, self.test_images)
            if config.data == "digits" and self.test_images.shape[0] > 0:
                metrics["recognisability"] = digit_recognisability(
                    samples, self.train_images, self.train_labels, self.test_images, self.test_labels)
                rec = metrics["recognisability"]
                self.print(f"recognisable digits: {rec['samples_recognisable_fraction']:.0%} of {config.num_samples} "
                           f"samples (classified with probability >= {CONFIDENT} and as close to the training set "
                           f"as 95% of real test digits; real test digits: {rec['real_test_recognisable_fraction']:.0%}"
                           f"); classes drawn {rec['sample_class_counts']}")
            with open(os.path.join(config.out, "metrics.json"), "w") as handle:
                json.dump(metrics, handle, indent=2)
            self.print(f"wrote {config.out}/samples.png, loss.png, metrics.json, {CHECKPOINT_NAME}")
        if env.distributed:
            dist.barrier()
        return metrics


# -- pieces shared with `fastddpm sample` and `fastddpm elbo` -----------------------------------


def default_threads(processes_on_this_machine=1):
    """CPU threads per process: the cores but one, shared among this machine's processes.

    OpenMP threads spin-wait for each other; when another process holds one of them, a step
    runs 4-10x slower (measured on 2 cores), while on an idle 2-core machine one thread is only
    1.7x slower than two. Leaving a core free keeps the run's speed whatever else runs.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cores - 1) // processes_on_this_machine)


def ema_decay_at(step, decay):
    """The EMA rate of a step: min(decay, (1 + step) / (10 + step)), diffusers' EMAModel warm-up,
    so that a short run's average is not dominated by its first, untrained weights."""
    return min(decay, (1 + step) / (10 + step))


def make_schedule(name, timesteps):
    if name == "cosine":
        return NoiseSchedule.cosine(timesteps)
    return NoiseSchedule.linear(timesteps)


def build_model(config, image_shape):
    """The preset's U-Net for images of `image_shape` (C, H, W), its attention kept at the same depths."""
    channels, height, width = image_shape
    preset = PRESETS[config.preset]
    levels = len(preset["channel_mult"])
    multiple = 2 ** (levels - 1)
    if height % multiple or width % multiple:
        raise ValueError(f"--preset {config.preset} needs image sides divisible by {multiple}; "
                         f"the images are {height}x{width}")
    depths = [int(round(math.log2(preset["image_size"] / r))) for r in preset["attention_resolutions"]]
    overrides = dict(in_channels=channels, image_size=height, learn_sigma=config.variance == "learned_range",
                     attention_resolutions=tuple(height // 2 ** d for d in depths if d < levels))
    if config.model_channels is not None:
        overrides["model_channels"] = config.model_channels
    return UNet.from_preset(config.preset, **overrides)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at `path` (a checkpoint file or a run folder), checked."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated files and foreign pickles raise many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{type(error).__name__}: {reason}") from error
    if not isinstance(state, dict) or state.get("fastddpm_checkpoint") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fastddpm checkpoint (written by `fastddpm train`)")
    required = {"config", "unet_config", "image_shape", "step", "model", "ema", "optimizer", "loss_history", "rng",
                "world_size", "train_seconds", "images_seen", "timestep_sampler"}
    missing = required - set(state)
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)}: corrupt checkpoint")
    return state


def model_from_checkpoint(state, *, ema=True, device="cpu"):
    """(model in eval mode, schedule, TrainConfig) of a loaded checkpoint; the EMA weights if kept."""
    config = TrainConfig(**state["config"])
    model = UNet(**state["unet_config"])
    weights = state["ema"] if ema and state["ema"] is not None else state["model"]
    model.load_state_dict(weights)
    return model.to(device).eval(), make_schedule(config.schedule, config.timesteps), config


def draw_samples(model, count, image_shape, schedule, *, method, steps, eta, prediction, variance, seed, device,
                 progress=True, batch_size=500):
    """`count` samples in [-1, 1], float32 on the CPU."""
    from .sampling import sample

    generator = torch.Generator(device).manual_seed(seed)
    batches = []
    with torch.no_grad():
        for start in range(0, count, batch_size):
            shape = (min(batch_size, count - start), *image_shape)
            batches.append(sample(model, shape, schedule, method=method, steps=steps, eta=eta, prediction=prediction,
                                  variance=variance,
                                  clip_denoised=True, generator=generator, progress=progress).float().cpu())
    return torch.cat(batches).clamp(-1, 1)


def evaluate_bpd(model, images, schedule, *, prediction, variance, timesteps, seed, distributed=False, progress=True,
                 batch_size=256):
    """Mean negative ELBO in bits/dim of `images` (this rank's share when distributed), averaged over ranks."""
    from .elbo import elbo_bpd

    device = images.device
    generator = torch.Generator(device).manual_seed(seed)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # total, prior, decoder (t = 0), count
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        result = elbo_bpd(model, batch, schedule, prediction=prediction, variance=variance, clip_denoised=True,
                          timesteps=timesteps, progress=progress, generator=generator)
        decoder = result["vb"][:, 0]  # column 0 is t = 0 for the full loop and the K-sample estimate
        sums += torch.stack([result["total_bpd"].double().sum(), result["prior_bpd"].double().sum(),
                             decoder.double().sum(), torch.tensor(float(batch.shape[0]), device=device)])
    if distributed:
        dist.all_reduce(sums)
    count = max(sums[3].item(), 1.0)
    return {"total_bpd": sums[0].item() / count, "prior_bpd": sums[1].item() / count,
            "decoder_bpd": sums[2].item() / count, "images": int(sums[3].item())}


def save_grid(samples, path, columns=None):
    """A PNG grid of images in [-1, 1] (N, C, H, W), pixels kept sharp."""
    from matplotlib.figure import Figure

    count, channels, height, width = samples.shape
    columns = columns or int(math.ceil(math.sqrt(count)))
    rows = int(math.ceil(count / columns))
    pad = 1
    canvas = np.ones((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), dtype=np.float32)
    pixels = ((samples.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = pad + row * (height + pad), pad + column * (width + pad)
        canvas[top:top + height, left:left + width] = pixels[index]
    scale = max(1, 512 // max(canvas.shape[:2]))
    figure = Figure(figsize=(canvas.shape[1] * scale / 100, canvas.shape[0] * scale / 100), dpi=100)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.axis("off")
    if channels == 1:
        axes.imshow(canvas[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        axes.imshow(canvas[:, :, :3], interpolation="nearest")
    _makedirs_for(path)
    figure.savefig(path, dpi=100)


def save_loss_curve(history, path, window=100):
    """The loss of every step and its running mean, on a log scale."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    steps = np.arange(1, len(history) + 1)
    axes.plot(steps, history, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
    if len(history) >= 2:
        window = max(1, min(window, len(history) // 5 or 1))
        running = np.convolve(history, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1:], running, color="tab:blue", linewidth=2, label=f"mean of {window} steps")
    if history and min(history) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    _makedirs_for(path)
    figure.savefig(path)


def nearest_distances(images, reference):
    """Per image, the RMS pixel distance to its nearest image of `reference`."""
    reference = reference.flatten(1).double()
    return torch.cdist(images.flatten(1).double(), reference).min(1).values / math.sqrt(reference.shape[1])


def nearest_neighbour_stats(samples, train_images, test_images, limit=10000):
    """How far samples lie from the training set, next to how far real held-out images lie.

    Samples as close to their nearest training image as real test images are lie on the data's
    manifold; a large fraction of near copies (closer than half the test images' median
    distance) warns of memorisation. Large data sets: the first `limit` images of each split.
    """
    train_images, test_images = train_images[:limit], test_images[:max(1, limit // 10)]
    sample_distance = nearest_distances(samples, train_images)
    stats = {"samples_mean_rms_distance": round(sample_distance.mean().item(), 4)}
    if test_images.shape[0] > 0:
        test_distance = nearest_distances(test_images, train_images)
        stats["real_test_mean_rms_distance"] = round(test_distance.mean().item(), 4)
        stats["samples_near_copies_fraction"] = round(
            (sample_distance < 0.5 * test_distance.median()).double().mean().item(), 4)
    return stats


def digit_recognisability(samples, train_images, train_labels, test_images, test_labels):
    """The fraction of samples that pass as digits: a logistic regression trained on the real
    digits assigns them a class with probability >= CONFIDENT, and they lie no farther from the
    training set than 95% of the real test digits do (a classifier alone is confident on noise too)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    def features(images):
        return ((images.double().clamp(-1, 1) + 1) / 2).flatten(1).numpy()

    # One BLAS thread: this small fit is fast alone and crawls when threads fight over busy cores.
    with threadpool_limits(1):
        classifier = LogisticRegression(max_iter=2000, C=10.0).fit(features(train_images), train_labels.numpy())
        test_probability = classifier.predict_proba(features(test_images))
        sample_probability = classifier.predict_proba(features(samples))
    test_distance = nearest_distances(test_images, train_images)
    sample_distance = nearest_distances(samples, train_images)
    distance_limit = torch.quantile(test_distance, 0.95).item()
    sample_confident = sample_probability.max(1) >= CONFIDENT
    sample_close = (sample_distance <= distance_limit).numpy()
    test_confident = test_probability.max(1) >= CONFIDENT
    return {
        "classifier": "LogisticRegression(C=10) on the train split, pixels in [0, 1]",
        "confidence_threshold": CONFIDENT,
        "distance_limit": round(distance_limit, 4),
        "classifier_test_accuracy": round(float((test_probability.argmax(1) == test_labels.numpy()).mean()), 4),
        "real_test_confident_fraction": round(float(test_confident.mean()), 4),
        "real_test_recognisable_fraction": round(
            float((test_confident & (test_distance <= distance_limit).numpy()).mean()), 4),
        "samples_confident_fraction": round(float(sample_confident.mean()), 4),
        "samples_close_fraction": round(float(sample_close.mean()), 4),
        "samples_recognisable_fraction": round(float((sample_confident & sample_close).mean()), 4),
        "sample_class_counts": np.bincount(sample_probability.argmax(1), minlength=10).tolist(),
    }


# -- helpers -----------------------------------------------------------------------------------


def _resumed_config(saved, given):
    """The saved settings, with the ones a resumed run may change taken from `given`; others must agree."""
    defaults = TrainConfig()
    merged = dict(saved)
    for field in dataclasses.fields(TrainConfig):
        value = getattr(given, field.name)
        if field.name in RESUMABLE:
            merged[field.name] = value
        elif value != getattr(defaults, field.name) and value != saved.get(field.name):
            raise ValueError(f"--{field.name.replace('_', '-')} {value!r} differs from the run being resumed "
                             f"({saved.get(field.name)!r}); a resumed run keeps its settings")
    return TrainConfig(**merged)


class _StopFlag:
    """SIGINT / SIGTERM set a flag the loop checks between steps; a second SIGINT kills as usual."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def installed(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _any_rank(flag, device):
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _progress_bar(total, initial, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def _mean(values):
    return sum(values) / len(values) if values else None


def _makedirs_for(path):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)

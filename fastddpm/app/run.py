"""`fastddpm train`: a DDPM trained end to end, then sampled and evaluated.

One process, or several under `torchrun` (DistributedDataParallel: gloo on CPU, nccl on CUDA;
each rank its own slice of every batch and its own noise; losses and metrics averaged across
ranks). The run folder `--out` holds:

- checkpoint.pt: model, EMA, optimizer, step, every rank's RNG state and the loss of every
  step, written atomically every `checkpoint_every` steps and at the end; `--resume` continues
  it exactly where it stopped (same batches, same noise: the weights are bit-identical to an
  uninterrupted run on the same machine);
- samples.png, loss.png, metrics.json: written by `report.finish`.

Ctrl-C (SIGINT) or SIGTERM stop at the next step boundary and save a checkpoint first. A
non-finite loss stops the run with the step that produced it; the checkpoint on disk is then
the last one whose every loss was finite.
"""
import dataclasses
import math
import os
import time

import torch

from .. import DiffusionLoss, TrainStep
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .config import absolute_data, resumed_config
from .data import BatchSampler, load_images, train_test_split
from .distributed import any_rank, barrier, distributed, gather, sum_over_ranks
from .errors import CheckpointError, NonFiniteLossError, TrainingInterrupted
from .model import build_model, make_schedule
from .report import finish
from .stop import StopFlag


def train(config, *, resume=False, progress=True, print_fn=print):
    """Train, sample and evaluate as `config` says; return the metrics (also in metrics.json)."""
    config = dataclasses.replace(config, data=absolute_data(config.data))
    config.validate()
    with distributed(config.device, config.threads) as env:
        run = Run(config, env, resume=resume, progress=progress, print_fn=print_fn)
        run.fit()
        return finish(run)


def ema_decay_at(step, decay):
    """The EMA rate of a step: min(decay, (1 + step) / (10 + step)), diffusers' EMAModel warm-up,
    so that a short run's average is not dominated by its first, untrained weights."""
    return min(decay, (1 + step) / (10 + step))


class Run:
    """The state of a run: data, model, trainer, step and loss history; `fit` trains it."""

    def __init__(self, config, env, *, resume, progress, print_fn):
        self.config, self.env, self.progress = config, env, progress
        self.print = print_fn if env.is_main else (lambda *args, **kwargs: None)
        self.checkpoint_path = os.path.join(config.out, CHECKPOINT_NAME)
        saved = None
        if resume:
            saved = load_checkpoint(self.checkpoint_path)
            self.config = config = resumed_config(saved["config"], config)
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

    def fit(self):
        config, env = self.config, self.env
        if self.step >= config.steps:
            self.print(f"already trained for {self.step} steps (--steps {config.steps})")
            return
        bar = _progress_bar(total=config.steps, initial=self.step, enabled=self.progress and env.is_main)
        pending, interval_start, interval_steps = [], time.perf_counter(), 0
        with StopFlag().installed() as stop:
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
                        stopping = any_rank(stop.requested, env.device)
                    if at_checkpoint or stopping:
                        self.save()
                    if stopping:
                        bar.close()
                        raise TrainingInterrupted(self.step, self.checkpoint_path)
                    interval_start, interval_steps = time.perf_counter(), 0
        bar.close()

    def _flush(self, pending):
        """Average the pending steps' losses across ranks, check them, append them to the history."""
        values = (sum_over_ranks(torch.stack(pending).float(), self.env) / self.env.world_size).tolist()
        first_step = self.step - len(values) + 1
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(first_step + offset, value,
                                         self.checkpoint_path if self.saved_step is not None else None)
        self.loss_history.extend(values)

    def save(self):
        """Write checkpoint.pt (rank 0), with every rank's RNG state."""
        rng = {"cpu": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device)
        all_rng = gather(rng, self.env)
        if self.env.is_main:
            ema = self.trainer.ema_model
            save_checkpoint({
                "config": dataclasses.asdict(self.config),
                "unet_config": dict(self.model.config),
                "image_shape": tuple(self.train_images.shape[1:]),
                "step": self.step,
                "model": self.model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": self.trainer.optimizer.state_dict(),
                "loss_history": list(self.loss_history),
                "rng": all_rng,
                "world_size": self.env.world_size,
                "train_seconds": self.train_seconds,
                "images_seen": self.images_seen,
                "timestep_sampler": None if self.timestep_sampler is None else self.timestep_sampler.state_dict(),
            }, self.checkpoint_path)
        self.saved_step = self.step
        barrier(self.env)

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


def _progress_bar(total, initial, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)

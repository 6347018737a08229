"""The end of a run: the EMA model's test bits/dim, samples, loss curve and metrics.json."""
import json
import os
import time

import torch

from .. import compile_unet
from .checkpoint import CHECKPOINT_NAME
from .digits import CONFIDENT, digit_recognisability
from .distributed import barrier
from .evaluate import draw_samples, evaluate_bpd, nearest_neighbour_stats
from .plots import save_grid, save_loss_curve
from .quality import FeatureSpace


def finish(run):
    """Evaluate a trained `run.Run`, write its outputs (rank 0) and return the metrics."""
    config, env = run.config, run.env
    ema = run.trainer.ema_model if run.trainer.ema_model is not None else run.model
    ema.eval()
    network = compile_unet(ema) if config.compile else ema
    recent = run.loss_history[-100:]
    metrics = {"steps": run.step, "train_images": int(run.train_images.shape[0]),
               "test_images": int(run.test_images.shape[0]), "world_size": env.world_size,
               "device": str(env.device), "threads_per_process": torch.get_num_threads(),
               "train_seconds": round(run.train_seconds, 1),
               "final_loss": sum(recent) / len(recent) if recent else None}
    if run.train_seconds > 0:
        metrics["images_per_second"] = round(run.images_seen / run.train_seconds, 1)

    if run.test_images.shape[0] > 0:
        start = time.perf_counter()
        metrics["test_bpd"] = evaluate_bpd(
            network, run.test_images[env.rank::env.world_size].to(env.device), run.schedule,
            prediction=config.prediction, variance=config.variance, timesteps=config.elbo_timesteps,
            seed=config.seed + env.rank, env=env, progress=run.progress and env.is_main)
        metrics["test_bpd"]["elbo_timesteps"] = config.elbo_timesteps or config.timesteps
        metrics["elbo_seconds"] = round(time.perf_counter() - start, 1)
        run.print(f"test bits/dim: {metrics['test_bpd']['total_bpd']:.3f} "
                  f"(K={metrics['test_bpd']['elbo_timesteps']} timestep estimate of the negative ELBO, "
                  f"{run.test_images.shape[0]} test images)")

    if env.is_main:
        start = time.perf_counter()
        samples = draw_samples(network, config.num_samples, tuple(run.train_images.shape[1:]), run.schedule,
                               method=config.sample_method, steps=config.sample_steps, eta=config.eta,
                               prediction=config.prediction, variance=config.variance, seed=config.seed,
                               device=env.device, progress=run.progress)
        metrics["sample_seconds"] = round(time.perf_counter() - start, 1)
        metrics["sampling"] = {"method": config.sample_method, "steps": config.sample_steps or config.timesteps,
                               "eta": config.eta}
        save_grid(samples, os.path.join(config.out, "samples.png"))
        save_loss_curve(run.loss_history, os.path.join(config.out, "loss.png"))
        metrics["nearest_neighbour"] = nearest_neighbour_stats(samples, run.train_images, run.test_images)
        if min(config.num_samples, run.test_images.shape[0]) >= 2:
            metrics["frechet"] = fd = FeatureSpace(run.train_images).compare(samples, run.test_images)
            run.print(f"Fréchet distance to the train split in {fd['features']}: {fd['samples_distance']:.3f} "
                      f"({fd['samples']} samples), real test images {fd['real_test_distance']:.3f}; in sets of "
                      f"{fd['compared_at']}: samples {fd['samples_distance_at_size']:.3f}, real test images "
                      f"{fd['real_test_distance_at_size']:.3f}")
        if config.data == "digits" and run.test_images.shape[0] > 0:
            metrics["recognisability"] = rec = digit_recognisability(
                samples, run.train_images, run.train_labels, run.test_images, run.test_labels)
            run.print(f"recognisable digits: {rec['samples_recognisable_fraction']:.0%} of {config.num_samples} "
                      f"samples (classified with probability >= {CONFIDENT} and as close to the training set "
                      f"as 95% of real test digits; real test digits: {rec['real_test_recognisable_fraction']:.0%}"
                      f"); classes drawn {rec['sample_class_counts']}")
        with open(os.path.join(config.out, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=2)
        run.print(f"wrote {config.out}/samples.png, loss.png, metrics.json, {CHECKPOINT_NAME}")
    barrier(env)
    return metrics

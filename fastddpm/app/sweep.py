"""`fastddpm quality`: a trained run's samples judged across sampling methods and step counts.

Every (method, steps) draws the same number of samples with one seed,
counts the model's calls and times the draw, then measures the samples' Fréchet distance to the
train split (app.quality, one feature space for the whole sweep) and, for the digits, the
recognisable fraction (app.digits); the real test split gives the reference of both.
"""
import json
import os
import time

import torch

from .checkpoint import model_from_checkpoint
from .data import load_images, train_test_split
from .digits import DigitJudge
from .errors import DataError
from .evaluate import draw_samples
from .plots import save_quality_plot
from .quality import FeatureSpace

DRAW_BATCH = 500  # samples per model call


def quality_sweep(state, plan, *, num_samples, seed, device, clip_denoised=None, ema=True, progress=True,
                  print_fn=print):
    """The rows of `plan` ((method, steps) pairs) for the run of checkpoint `state`, with the
    reference values and settings: the dict `fastddpm quality` writes as JSON. clip_denoised:
    `sample`'s (None: each method's default, on for DDPM and DDIM, off for the solvers)."""
    model, schedule, config = model_from_checkpoint(state, ema=ema, device=device)
    for method, steps in plan:
        if not 1 <= steps <= schedule.num_timesteps:
            raise ValueError(f"{method} at {steps} steps: steps must lie in [1, T={schedule.num_timesteps}]")
    if num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 (a covariance), got {num_samples}")
    if config.data != "digits" and not os.path.exists(config.data):
        raise DataError(f"the run's data {config.data!r} is not found (moved, or a path relative to the folder "
                        "it was trained from?)")
    images, labels = load_images(config.data)
    train_images, test_images, train_labels, test_labels = train_test_split(images, labels, config.test_fraction,
                                                                            seed=config.seed)
    if test_images.shape[0] < 2:
        raise ValueError(f"the run's test split holds {test_images.shape[0]} image(s); the reference needs 2 or more")
    space = FeatureSpace(train_images)
    size = min(num_samples, test_images.shape[0])
    judge = DigitJudge(train_images, train_labels, test_images, test_labels) if config.data == "digits" else None
    reference = {"images": int(test_images.shape[0]), "frechet_distance": round(space.distance(test_images), 4),
                 "frechet_distance_at_size": round(space.mean_distance(test_images, size), 4),
                 "recognisable_fraction": judge.real_test["real_test_recognisable_fraction"] if judge else None}

    calls = 0

    def count_call(module, inputs):
        nonlocal calls
        calls += 1

    hook = model.register_forward_pre_hook(count_call)
    batches = -(-num_samples // DRAW_BATCH)
    draw = dict(count=num_samples, image_shape=tuple(state["image_shape"]), schedule=schedule,
                prediction=config.prediction, variance=config.variance, eta=0.0, device=device, progress=progress,
                batch_size=DRAW_BATCH, clip_denoised=clip_denoised)
    draw_samples(model, **{**draw, "count": 2}, method="ddim", steps=2, seed=seed)  # first-call costs, untimed
    rows = []
    try:
        for method, steps in plan:
            calls = 0
            start = time.perf_counter()
            samples = draw_samples(model, **draw, method=method, steps=steps, seed=seed)
            seconds = time.perf_counter() - start
            rows.append({"method": method, "steps": steps, "model_calls": calls // batches,
                         "seconds": round(seconds, 2), "frechet_distance": round(space.distance(samples), 4),
                         "frechet_distance_at_size": round(space.mean_distance(samples, size), 4),
                         "recognisable_fraction": judge(samples)["samples_recognisable_fraction"] if judge else None})
            print_fn(_describe(rows[-1], size))
    finally:
        hook.remove()
    return {"num_samples": num_samples, "seed": seed, "clip_denoised": clip_denoised, "compared_at": size,
            "features": space.description, "reference": reference, "rows": rows, "device": str(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "trained_steps": state["step"],
            "run": state["config"]}


def plan_of(methods, steps, ddpm_steps):
    """Every method at every step count, then DDPM at `ddpm_steps` (pairs already there kept once)."""
    plan = [(method, k) for method in methods for k in steps]
    return plan + [("ddpm", k) for k in ddpm_steps if ("ddpm", k) not in plan]


def write_outputs(result, folder):
    """quality.json, quality.md (the table) and quality.png (the plot) in `folder`; their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, "quality" + suffix) for suffix in (".json", ".md", ".png")]
    with open(paths[0], "w") as handle:
        json.dump(result, handle, indent=2)
    with open(paths[1], "w") as handle:
        handle.write(markdown_table(result))
    save_quality_plot(result, paths[2])
    return paths


def markdown_table(result):
    """The rows as a markdown table, the real test split's reference first."""
    size, reference = result["compared_at"], result["reference"]
    percent = (lambda value: "–" if value is None else f"{value:.0%}")
    lines = [f"| method | steps | model calls | seconds | Fréchet distance ({result['num_samples']} samples) | "
             f"Fréchet distance (sets of {size}) | recognisable |",
             "|---|--:|--:|--:|--:|--:|--:|",
             f"| real test split ({reference['images']} images) | | | | {reference['frechet_distance']:.3f} | "
             f"{reference['frechet_distance_at_size']:.3f} | {percent(reference['recognisable_fraction'])} |"]
    for row in result["rows"]:
        lines.append(f"| {row['method']} | {row['steps']} | {row['model_calls']} | {row['seconds']:.1f} | "
                     f"{row['frechet_distance']:.3f} | {row['frechet_distance_at_size']:.3f} | "
                     f"{percent(row['recognisable_fraction'])} |")
    return "\n".join(lines) + "\n"


def _describe(row, size):
    recognisable = "" if row["recognisable_fraction"] is None else f", {row['recognisable_fraction']:.0%} recognisable"
    return (f"{row['method']} {row['steps']} steps: {row['model_calls']} model calls, {row['seconds']:.1f} s, "
            f"Fréchet distance {row['frechet_distance']:.3f} ({row['frechet_distance_at_size']:.3f} in sets of "
            f"{size}){recognisable}")

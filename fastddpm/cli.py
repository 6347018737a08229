"""The `fastddpm` command: train, sample, elbo, quality, bench, verify.

    fastddpm train [--data digits|FOLDER|FILE.npy] [--out runs/NAME] [--resume] ...
    fastddpm sample runs/NAME [--method METHOD] [--steps N] [--eta E] [--seed S] [--out grid.png]
    fastddpm elbo runs/NAME [--data ...] [--timesteps K]
    fastddpm quality runs/NAME [--methods M ...] [--steps 5 10 20 50] [--num-samples N] [--out FOLDER]
    fastddpm bench [--json PATH] [--plot PATH.png] [--traffic]
    fastddpm verify [--device cpu|cuda]

Every command that computes takes --device and --threads. Errors the user can fix (bad data, a
missing or corrupt checkpoint, a NaN loss) print one line, `fastddpm <command>: error: ...`,
and exit with status 1 (130 for an interrupted run).
"""
import argparse
import dataclasses
import inspect
import os
import sys

from . import options, sample
from .app import (CheckpointError, DataError, NonFiniteLossError, TrainConfig, TrainingInterrupted,
                  load_checkpoint, model_from_checkpoint, train)
from .app.config import CHOICES
from .app.data import load_images, train_test_split
from .app.distributed import cpu_threads, resolve_device
from .app.evaluate import draw_samples, evaluate_bpd
from .app.plots import save_grid
from .app.sweep import plan_of, quality_sweep, write_outputs

TRAIN_HELP = {
    "data": "'digits' (scikit-learn's 8x8 digits), a folder of images or an .npy file (N,H,W)/(N,C,H,W)",
    "out": "the run folder: checkpoint.pt, samples.png, loss.png, metrics.json",
    "test_fraction": "held-out fraction for the bits/dim (fixed split from --seed)",
    "preset": "U-Net architecture",
    "model_channels": "override the preset's base width",
    "timesteps": "diffusion steps T",
    "schedule": "noise schedule",
    "prediction": "what the model predicts",
    "weighting": "loss weighting over t",
    "gamma": "min-SNR clip for --weighting min_snr",
    "variance": "reverse-process variance; learned_range trains a 2C-channel model on the hybrid loss",
    "timestep_sampler": "how t is drawn: uniform, or importance-sampled by the loss's second moment",
    "steps": "total optimizer steps (with --resume: the new total)",
    "batch_size": "global batch, split across processes",
    "lr": "AdamW learning rate",
    "warmup": "linear learning-rate warm-up steps",
    "grad_clip": "max gradient norm ('none' disables)",
    "ema_decay": "EMA rate of the weights, warmed up as min(rate, (1+step)/(10+step)) ('none' disables)",
    "seed": "seed of the weights, data order, split and noise",
    "log_every": "steps between loss checks and progress-bar updates",
    "checkpoint_every": "steps between checkpoints",
    "num_samples": "images in samples.png",
    "sample_method": "sampler for samples.png",
    "sample_steps": "sampler steps ('none': all T)",
    "eta": "DDIM eta (0: deterministic)",
    "elbo_timesteps": "timesteps K of the test bits/dim estimate ('none': every t, slow)",
    "device": "cpu, cuda, cuda:1",
    "threads": "CPU threads per process",
}
# Defaults shown in words where the value (None) would say nothing.
DEFAULT_TEXT = {
    "model_channels": "the preset's",
    "device": "cuda if available; under torchrun cuda:LOCAL_RANK",
    "threads": "the cores but one, divided among the processes",
}


CLIP_CHOICES = {"auto": None, "on": True, "off": False}  # `fastddpm quality --clip-denoised`: sample's values


def _optional_float(text):
    return None if text.lower() == "none" else float(text)


def _optional_int(text):
    return None if text.lower() == "none" else int(text)


def _api_default(function, name):
    """The default of `function`'s argument `name`: the command's default is the API's."""
    return inspect.signature(function).parameters[name].default


def _add_train_arguments(parser):
    """Every TrainConfig field as an option whose default is None ("not given"), so --resume knows
    which settings were given; TrainConfig holds the real defaults, shown once in the help."""
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name == "compile":
            continue
        kind = {int | None: _optional_int, float | None: _optional_float, int: int, float: float}.get(field.type, str)
        choices = CHOICES[field.name]() if field.name in CHOICES else None
        shown = DEFAULT_TEXT.get(field.name, getattr(defaults, field.name))
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None, choices=choices,
                            metavar=None if choices else "X", help=f"{TRAIN_HELP[field.name]} (default: {shown})")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the model and loss (slow to start on CPU)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_compute_arguments(parser):
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"CPU threads (default: {DEFAULT_TEXT['threads'].split(',')[0]})")


def _config_from_args(args):
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in given.items() if value is not None})


def _build_parser():
    parser = argparse.ArgumentParser(prog="fastddpm", description="Fused Triton kernels for DDPM: train, sample, "
                                     "evaluate, benchmark and verify.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_parser = commands.add_parser("train", help="train a DDPM, then sample it and measure its bits/dim",
                                       description="Train a DDPM end to end (default: the digits, ~10 minutes on 2 "
                                       "CPU cores), then write samples.png, loss.png and metrics.json. Under torchrun "
                                       "it trains with DistributedDataParallel.")
    _add_train_arguments(train_parser)

    sample_parser = commands.add_parser("sample", help="a grid of samples from a checkpoint")
    sample_parser.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    method = _api_default(sample, "method")
    sample_parser.add_argument("--method", choices=options.METHODS, default=method, help=f"sampler (default: {method})")
    sample_parser.add_argument("--steps", type=_optional_int, default=100,
                               help="sampler steps, respaced from T ('none': all T; default: 100)")
    eta = _api_default(sample, "eta")
    sample_parser.add_argument("--eta", type=float, default=eta, help=f"DDIM eta (default: {eta})")
    sample_parser.add_argument("--num", type=int, default=64, help="number of samples (default: 64)")
    sample_parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    sample_parser.add_argument("--out", default="samples.png",
                               help="a .png grid (.png added to a name without extension), or .npy for the raw array "
                               "in [-1, 1] (default: samples.png)")
    sample_parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    _add_compute_arguments(sample_parser)
    sample_parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    elbo = commands.add_parser("elbo", help="a checkpoint's bits/dim (negative ELBO) on a data set")
    elbo.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    elbo.add_argument("--data", default=None,
                      help="'digits', a folder or an .npy, used whole (default: the run's test split)")
    elbo.add_argument("--timesteps", type=_optional_int, default=None,
                      help="K-sample estimate (default: every t, the full bound)")
    elbo.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (default: all)")
    elbo.add_argument("--batch-size", type=int, default=256, help="images per model call (default: 256)")
    elbo.add_argument("--seed", type=int, default=0, help="seed of the noise and timesteps (default: 0)")
    elbo.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    _add_compute_arguments(elbo)
    elbo.add_argument("--no-progress", action="store_true", help="no progress bars")

    quality = commands.add_parser("quality", help="a checkpoint's sample quality across methods and steps",
                                  description="Sample a run with every method at every step count and measure the "
                                  "samples' Fréchet distance to the train split (in its principal components), and "
                                  "for the digits their recognisable fraction, beside the real test split's; write "
                                  "quality.json, quality.md (the table) and quality.png (the plot).")
    quality.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    quality.add_argument("--methods", nargs="+", choices=options.METHODS, default=list(options.METHODS),
                         metavar="METHOD", help=f"samplers, of {', '.join(options.METHODS)} (default: all)")
    quality.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50], metavar="N",
                         help="step counts of every method (default: 5 10 20 50)")
    quality.add_argument("--ddpm-steps", nargs="*", type=int, default=[100, 1000], metavar="N",
                         help="more step counts of DDPM alone, the baseline (default: 100 1000; none: give no N)")
    quality.add_argument("--num-samples", type=int, default=1000, help="samples per method and step count "
                         "(default: 1000)")
    quality.add_argument("--seed", type=int, default=0, help="seed of the noise, the same for every row (default: 0)")
    quality.add_argument("--clip-denoised", choices=tuple(CLIP_CHOICES), default="auto",
                         help="clip x0_hat to [-1, 1]: auto (each method's default: on for DDPM and DDIM, off for "
                         "the solvers, as in diffusers), on or off for every method (default: auto)")
    quality.add_argument("--out", default=None, help="folder of the outputs (default: RUN/quality)")
    quality.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    _add_compute_arguments(quality)
    quality.add_argument("--no-progress", action="store_true", help="no progress bars")

    bench = commands.add_parser("bench", help="time every hot path (loss, sampling step, ELBO, train step)")
    bench.add_argument("--json", default=None, help="write the rows to this JSON file")
    bench.add_argument("--plot", default=None, help="bar chart of the speedup over eager PyTorch (PNG)")
    bench.add_argument("--only", nargs="+", default=None, metavar="NAME",
                       help="run only these benchmarks (loss, sampling, elbo, train_step)")
    bench.add_argument("--traffic", action="store_true",
                       help="also count launches and bytes per element, and time host µs per call, of every hot path")
    _add_compute_arguments(bench)

    verify = commands.add_parser("verify", help="every kernel against the float64 reference on this device")
    _add_compute_arguments(verify)
    return parser


def main(argv=None):
    args = _build_parser().parse_args(argv)
    handlers = {"train": _train, "sample": _sample, "elbo": _elbo, "quality": _quality, "bench": _bench,
                "verify": _verify}
    try:
        if args.command == "train":  # threads per process: the run sets them
            return _train(args) or 0
        with cpu_threads(args.threads):
            return handlers[args.command](args) or 0
    except TrainingInterrupted as error:
        print(f"fastddpm {args.command}: {error}", file=sys.stderr)
        return 130
    except (DataError, CheckpointError, NonFiniteLossError, ValueError, FileNotFoundError) as error:
        print(f"fastddpm {args.command}: error: {error}", file=sys.stderr)
        return 1


def _train(args):
    train(_config_from_args(args), resume=args.resume, progress=not args.no_progress)


def _sample(args):
    device = resolve_device(args.device)
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    state = load_checkpoint(args.checkpoint)
    model, schedule, config = model_from_checkpoint(state, ema=not args.no_ema, device=device)
    if args.steps is not None and not 1 <= args.steps <= schedule.num_timesteps:
        raise ValueError(f"--steps must lie in [1, T={schedule.num_timesteps}], got {args.steps}")
    samples = draw_samples(model, args.num, tuple(state["image_shape"]), schedule, method=args.method, steps=args.steps,
                           eta=args.eta, prediction=config.prediction, variance=config.variance, seed=args.seed,
                           device=device, progress=not args.no_progress)
    if args.out.endswith(".npy"):
        import numpy as np
        np.save(args.out, samples.numpy())
        written = args.out
    else:
        written = save_grid(samples, args.out)
    print(f"wrote {args.num} samples ({args.method}, {args.steps or schedule.num_timesteps} steps) to {written}")


def _elbo(args):
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)
    model, schedule, config = model_from_checkpoint(state, ema=not args.no_ema, device=device)
    if args.timesteps is not None and not 2 <= args.timesteps <= schedule.num_timesteps:
        raise ValueError(f"--timesteps must lie in [2, T={schedule.num_timesteps}], got {args.timesteps}")
    if args.data is None:
        if config.data != "digits" and not os.path.exists(config.data):
            raise DataError(f"the run's data {config.data!r} is not found (moved, or a path relative to the folder "
                            "it was trained from?): pass --data")
        images, labels = load_images(config.data)
        images = train_test_split(images, labels, config.test_fraction, seed=config.seed)[1]
        described = f"the test split of {config.data}"
    else:
        images, described = load_images(args.data)[0], args.data
    if args.limit is not None:
        images = images[:args.limit]
    if images.shape[0] == 0:
        raise ValueError(f"{described} holds no images to evaluate")
    if tuple(images.shape[1:2]) != (model.in_channels,):
        raise ValueError(f"{described} has {images.shape[1]} channel(s); the model was trained on {model.in_channels}")
    result = evaluate_bpd(model, images.to(device), schedule, prediction=config.prediction, variance=config.variance,
                          timesteps=args.timesteps, seed=args.seed, progress=not args.no_progress,
                          batch_size=args.batch_size)
    estimate = f"K={args.timesteps} estimate" if args.timesteps else f"all T={schedule.num_timesteps} timesteps"
    print(f"{described}: {result['total_bpd']:.4f} bits/dim ({estimate}, {result['images']} images; "
          f"prior {result['prior_bpd']:.4f}, decoder {result['decoder_bpd']:.4f})")


def _quality(args):
    state = load_checkpoint(args.checkpoint)
    run_folder = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
    result = quality_sweep(state, plan_of(args.methods, args.steps, args.ddpm_steps), num_samples=args.num_samples,
                           seed=args.seed, device=resolve_device(args.device),
                           clip_denoised=CLIP_CHOICES[args.clip_denoised], ema=not args.no_ema,
                           progress=not args.no_progress)
    paths = write_outputs(result, args.out or os.path.join(run_folder, "quality"))
    print(f"wrote {', '.join(paths)}")


def _bench(args):
    from .benchmarks.suite import main as bench_main
    return bench_main(json_path=args.json, plot_path=args.plot, only=args.only, device=args.device,
                      traffic=args.traffic)


def _verify(args):
    device = resolve_device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # The interpreter must be chosen before triton is imported, and importing fastddpm imported it.
        argv = [sys.executable, "-m", "fastddpm", "verify", *(["--device", args.device] if args.device else []),
                *(["--threads", str(args.threads)] if args.threads else [])]
        os.execve(sys.executable, argv, {**os.environ, "TRITON_INTERPRET": "1"})
    from .verify import verify
    if not verify(device=str(device)):
        print("fastddpm verify: error: some kernels differ from the reference beyond tolerance", file=sys.stderr)
        return 1
    return 0

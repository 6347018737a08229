"""The settings of a run (`TrainConfig`), checked, and the rules for resuming one."""
import dataclasses
import os

from .. import options
from ..unet import PRESETS


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; the defaults train the digits on 2 CPU cores in under 10 minutes."""
    data: str = "digits"  # "digits", a folder of images, or an .npy file (stored as an absolute path)
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
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        for field, choices in CHOICES.items():
            value = getattr(self, field)
            if value not in choices():
                raise ValueError(f"--{field.replace('_', '-')} must be one of {', '.join(choices())}; got {value!r}")
        if self.compile and self.timestep_sampler != "uniform":
            raise ValueError("--timestep-sampler loss-second-moment updates its history outside the graph: "
                             "it cannot run with --compile")
        if self.sample_steps is not None and not 1 <= self.sample_steps <= self.timesteps:
            raise ValueError(f"--sample-steps must lie in [1, {self.timesteps}], got {self.sample_steps}")
        if self.elbo_timesteps is not None and not 2 <= self.elbo_timesteps <= self.timesteps:
            raise ValueError(f"--elbo-timesteps must lie in [2, {self.timesteps}], got {self.elbo_timesteps}")


# The vocabulary of each named setting, read when used: a method added to fastddpm.options is
# a valid --sample-method (and `fastddpm sample --method`) without an edit here.
CHOICES = {
    "preset": lambda: tuple(sorted(PRESETS)),
    "schedule": lambda: options.SCHEDULES,
    "prediction": lambda: options.PREDICTIONS,
    "weighting": lambda: options.WEIGHTINGS,
    "variance": lambda: options.VARIANCES,
    "timestep_sampler": lambda: options.TIMESTEP_SAMPLERS,
    "sample_method": lambda: options.METHODS,
}

# Settings a resumed run may change; any other must match the checkpoint.
RESUMABLE = {"out", "steps", "log_every", "checkpoint_every", "num_samples", "sample_method", "sample_steps", "eta",
             "elbo_timesteps", "device", "threads", "compile"}


def absolute_data(source):
    """`source` as a run stores it: "digits", or an absolute path, so that `fastddpm elbo RUN`
    finds the data from any folder."""
    return source if source == "digits" else os.path.abspath(source)


def resumed_config(saved, given):
    """The saved settings, with the ones a resumed run may change taken from `given`; others must agree."""
    defaults = TrainConfig()
    merged = dict(saved)
    for field in dataclasses.fields(TrainConfig):
        value = getattr(given, field.name)
        if field.name in RESUMABLE:
            merged[field.name] = value
        elif value != getattr(defaults, field.name) and not _same(field.name, value, saved.get(field.name)):
            raise ValueError(f"--{field.name.replace('_', '-')} {value!r} differs from the run being resumed "
                             f"({saved.get(field.name)!r}); a resumed run keeps its settings")
    return TrainConfig(**merged)


def _same(name, given, saved):
    if name == "data" and saved is not None:  # runs written before paths were stored absolute
        return absolute_data(given) == absolute_data(saved)
    return given == saved

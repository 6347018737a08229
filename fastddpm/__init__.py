"""fastddpm: fused Triton kernels for DDPM training and sampling, with a thin PyTorch API."""
import fastddpm.kernels  # noqa: F401  registers the fastddpm:: custom ops

from . import functional, reference
from .backend import get_backend, set_backend, use_backend
from .elbo import elbo_bpd
from .guidance import ClassifierFreeGuidance
from .loss import DiffusionLoss
from .resample import LossSecondMomentSampler
from .respace import respace, space_timesteps
from .sampling import sample
from .schedule import NoiseSchedule
from .train_step import TrainStep
from .unet import UNet, compile_unet

__version__ = "0.2.0"
__all__ = ["NoiseSchedule", "DiffusionLoss", "LossSecondMomentSampler", "TrainStep", "UNet", "compile_unet",
           "sample", "space_timesteps", "respace", "elbo_bpd", "ClassifierFreeGuidance", "functional", "reference",
           "set_backend", "get_backend", "use_backend"]

"""fastddpm: fused Triton kernels for DDPM training and sampling, with a thin PyTorch API."""
import fastddpm.kernels  # noqa: F401  registers the fastddpm:: custom ops

from . import functional, reference
from .backend import get_backend, set_backend
from .elbo import LossSecondMomentSampler, elbo_bpd
from .loss import DiffusionLoss
from .sampling import respace, sample, space_timesteps
from .schedule import NoiseSchedule
from .train_step import TrainStep
from .unet import UNet, compile_unet

__version__ = "0.1.0"
__all__ = ["NoiseSchedule", "DiffusionLoss", "LossSecondMomentSampler", "TrainStep", "UNet", "compile_unet",
           "sample", "space_timesteps", "respace", "elbo_bpd", "functional", "reference", "set_backend",
           "get_backend"]

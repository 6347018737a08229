"""fastddpm: fused Triton kernels for DDPM training and sampling, with a thin PyTorch API."""
from . import functional, reference
from .backend import get_backend, set_backend
from .schedule import NoiseSchedule

import fastddpm.kernels  # noqa: F401,E402  registers the fastddpm:: custom ops

__version__ = "0.1.0"
__all__ = ["NoiseSchedule", "functional", "reference", "set_backend", "get_backend"]

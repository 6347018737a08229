"""The application behind `fastddpm train|sample|elbo|quality`: a DDPM trained end to end, then
sampled and evaluated, built on the library's public API only.

Importing it imports neither scikit-learn nor matplotlib: the digits, the recognisability
check and the plots load them when they are used.
"""
from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import TrainConfig
from .errors import CheckpointError, DataError, NonFiniteLossError, TrainingInterrupted
from .run import train

__all__ = ["TrainConfig", "train", "load_checkpoint", "model_from_checkpoint", "CheckpointError", "DataError",
           "NonFiniteLossError", "TrainingInterrupted"]

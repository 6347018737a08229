"""checkpoint.pt: a run's model, EMA, optimizer, step, every rank's RNG state and loss history,
written atomically and read back checked."""
import os
import warnings

import torch

from .. import UNet
from .config import TrainConfig
from .errors import CheckpointError
from .model import make_schedule

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
REQUIRED = {"config", "unet_config", "image_shape", "step", "model", "ema", "optimizer", "loss_history", "rng",
            "world_size", "train_seconds", "images_seen", "timestep_sampler"}


def save_checkpoint(state, path):
    """Write `state` (REQUIRED's keys) to `path`; a crash mid-write leaves the previous checkpoint."""
    missing = REQUIRED - set(state)
    if missing:
        raise ValueError(f"state lacks {sorted(missing)}")
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    temporary = path + ".tmp"
    torch.save({"fastddpm_checkpoint": CHECKPOINT_FORMAT, **state}, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at `path` (a checkpoint file or a run folder), checked."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before failing on them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated files and foreign pickles raise many types
        # torch's own message advises weights_only=False, which would run a foreign file's code
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt, or not written by "
                              "`fastddpm train`)") from error
    if not isinstance(state, dict) or state.get("fastddpm_checkpoint") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fastddpm checkpoint (written by `fastddpm train`)")
    missing = REQUIRED - set(state)
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

"""The schedule and U-Net a run's settings name."""
import math

from .. import NoiseSchedule, UNet
from ..unet import PRESETS


def make_schedule(name, timesteps):
    if name == "cosine":
        return NoiseSchedule.cosine(timesteps)
    return NoiseSchedule.linear(timesteps)


def build_model(config, image_shape):
    """The preset's U-Net for images of `image_shape` (C, H, W), its attention kept at the same depths."""
    channels, height, width = image_shape
    preset = PRESETS[config.preset]
    levels = len(preset["channel_mult"])
    multiple = 2 ** (levels - 1)
    if height % multiple or width % multiple:
        raise ValueError(f"--preset {config.preset} needs image sides divisible by {multiple}; "
                         f"the images are {height}x{width}")
    depths = [int(round(math.log2(preset["image_size"] / r))) for r in preset["attention_resolutions"]]
    overrides = dict(in_channels=channels, image_size=height, learn_sigma=config.variance == "learned_range",
                     attention_resolutions=tuple(height // 2 ** d for d in depths if d < levels))
    if config.model_channels is not None:
        overrides["model_channels"] = config.model_channels
    return UNet.from_preset(config.preset, **overrides)

"""Classifier-free guidance as a model wrapper (Ho & Salimans 2022): the conditional and the
unconditional call as one batch of 2B, mixed as uncond + scale (cond - uncond)."""
import torch

from ._checks import model_output
from .unet import unwrap_model

__all__ = ["ClassifierFreeGuidance"]


class ClassifierFreeGuidance:
    """fn(x_t, t) -> the guided model output of `model(x_t, t, **kwargs)`.

    The unconditional call gets `null_kwargs`, by default `model_kwargs` with "y" replaced by the
    null class `model.num_classes` (fastddpm's UNet embeds num_classes + 1 labels, the last being
    "no class"). With a learned variance (`learned_channels`: the output's first C of 2C channels
    are the mean part) only the mean part is guided; the variance part is the conditional one.
    """

    def __init__(self, model, guidance_scale, model_kwargs, null_kwargs=None, *, learned_channels=None, device=None):
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale must be a float, got {guidance_scale!r}")
        model_kwargs = dict(model_kwargs or {})
        if null_kwargs is None:
            num_classes = getattr(unwrap_model(model), "num_classes", None)
            if not isinstance(model_kwargs.get("y"), torch.Tensor) or num_classes is None:
                raise ValueError("guidance_scale needs a condition: model_kwargs['y'] and a model with num_classes "
                                 "(its null class), or null_kwargs for the unconditional call")
            null_kwargs = {**model_kwargs, "y": torch.full_like(model_kwargs["y"], num_classes)}
        if set(null_kwargs) != set(model_kwargs):
            raise ValueError(f"null_kwargs must have the keys of model_kwargs {sorted(model_kwargs)}, "
                             f"got {sorted(null_kwargs)}")
        self.model = model
        self.scale = float(guidance_scale)
        self.learned_channels = learned_channels
        # cond and uncond as one batch of 2B, built once
        self.kwargs = {key: torch.cat([value, null_kwargs[key]]).to(device) if isinstance(value, torch.Tensor)
                       else value for key, value in model_kwargs.items()}

    def __call__(self, x, t):
        out = model_output(self.model(torch.cat([x, x]), torch.cat([t, t]), **self.kwargs))
        cond, uncond = out.chunk(2)
        channels = self.learned_channels
        if channels is None or cond.shape[1] == channels:
            return torch.lerp(uncond, cond, self.scale)
        mean = torch.lerp(uncond[:, :channels], cond[:, :channels], self.scale)
        return torch.cat([mean, cond[:, channels:]], dim=1)


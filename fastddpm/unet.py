"""The DDPM U-Net (Ho et al. 2020) and its improved-DDPM variant, built to compile well.

Every shape decision is static Python, so `torch.compile` traces the whole network as one
graph; the timestep embedding is computed on the device from `t`, with no host sync.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .unet_layers import (Downsample, DownStage, MidBlock, ResBlock, SelfAttention, TimestepEmbedding, UpStage,
                          Upsample, zero_init)

DOWNSAMPLE_PADS = ("symmetric", "bottom_right")

PRESETS = {
    # Ho et al., CIFAR-10: 35.7M parameters.
    "ddpm-cifar10": dict(
        image_size=32, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attention_resolutions=(16,), dropout=0.1),
    # Ho et al., LSUN and CelebA-HQ 256: 113.7M parameters.
    "ddpm-256": dict(
        image_size=256, model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(16,), dropout=0.0),
    # Nichol & Dhariwal, CIFAR-10 (improved-diffusion's image_train flags): 52.5M parameters.
    # It was trained with T = 4000 and rescale_timesteps, so it expects t * 1000 / T.
    "improved-cifar10": dict(
        image_size=32, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
        attention_resolutions=(16, 8), dropout=0.3, num_heads=4, use_scale_shift_norm=True,
        learn_sigma=True, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        downsample_pad="symmetric"),
    # For CPU tests and 8x8 images (pass in_channels=1 for digits).
    "tiny": dict(
        image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(4,), dropout=0.0),
}


class UNet(nn.Module):
    """The DDPM U-Net; `forward(x, t, y=None)` returns the model output, shaped like x
    (with twice the channels when `learn_sigma`: [eps, variance], as improved-diffusion).

    Args:
        image_size: the training resolution; `attention_resolutions` are in pixels of it.
            Any input whose sides divide by 2 ** (len(channel_mult) - 1) is accepted.
        num_classes: class conditioning. The embedding has `num_classes + 1` rows: label
            `num_classes` is the null class for classifier-free guidance, and `y=None`
            means every sample is null. Train with labels dropped to `num_classes`.
        num_heads / num_head_channels: attention heads, either a fixed count or a fixed
            width per head (the number of heads then grows with the channels).
        flip_sin_to_cos, freq_shift: the timestep embedding convention (see
            `sinusoidal_embedding`); norm_eps: GroupNorm epsilon (1e-6 in Ho et al.).
        downsample_pad: "bottom_right" (Ho et al.) or "symmetric" (improved-diffusion).
    Output convolutions of every residual branch and the final conv start at zero, as in both
    papers, so a fresh model outputs zeros.
    """

    def __init__(self, *, in_channels=3, out_channels=None, image_size=32, model_channels=128,
                 channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), dropout=0.0,
                 num_heads=1, num_head_channels=None, use_scale_shift_norm=False, learn_sigma=False,
                 num_classes=None, norm_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
                 downsample_pad="bottom_right"):
        super().__init__()
        channel_mult = tuple(channel_mult)
        attention_resolutions = tuple(attention_resolutions)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, image_size=image_size,
            model_channels=model_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, dropout=dropout, num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            learn_sigma=learn_sigma, num_classes=num_classes, norm_groups=norm_groups, norm_eps=norm_eps,
            flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift, downsample_pad=downsample_pad)
        _check_config(self.config)
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = (out_channels or in_channels) * (2 if learn_sigma else 1)
        self.num_classes = num_classes
        self.size_multiple = 2 ** (len(channel_mult) - 1)
        attention_levels = {int(math.log2(image_size // res)) for res in attention_resolutions}
        embed_dim = 4 * model_channels
        norm = dict(norm_groups=norm_groups, norm_eps=norm_eps)

        def resblock(c_in, c_out):
            return ResBlock(c_in, c_out, embed_dim, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, **norm)

        def attention(channels):
            heads = channels // num_head_channels if num_head_channels else num_heads
            return SelfAttention(channels, heads, **norm)

        self.time_embed = TimestepEmbedding(model_channels, embed_dim, flip_sin_to_cos=flip_sin_to_cos,
                                            freq_shift=freq_shift)
        self.class_embed = nn.Embedding(num_classes + 1, embed_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        skip_channels = [model_channels]
        channels = model_channels
        self.down_stages = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            resnets, attentions = [], []
            for _ in range(num_res_blocks):
                resnets.append(resblock(channels, model_channels * mult))
                channels = model_channels * mult
                if level in attention_levels:
                    attentions.append(attention(channels))
                skip_channels.append(channels)
            is_last = level == len(channel_mult) - 1
            if not is_last:
                skip_channels.append(channels)
            downsample = None if is_last else Downsample(channels, downsample_pad)
            self.down_stages.append(DownStage(resnets, attentions, downsample))

        self.mid = MidBlock([resblock(channels, channels), resblock(channels, channels)], attention(channels))

        self.up_stages = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            resnets, attentions = [], []
            for _ in range(num_res_blocks + 1):
                resnets.append(resblock(channels + skip_channels.pop(), model_channels * channel_mult[level]))
                channels = model_channels * channel_mult[level]
                if level in attention_levels:
                    attentions.append(attention(channels))
            self.up_stages.append(UpStage(resnets, attentions, Upsample(channels) if level > 0 else None))

        self.norm_out = nn.GroupNorm(norm_groups, channels, eps=norm_eps)
        self.conv_out = zero_init(nn.Conv2d(channels, self.out_channels, 3, padding=1))

    @classmethod
    def from_preset(cls, name, **overrides):
        """A UNet of a named architecture ("ddpm-cifar10", "ddpm-256", "improved-cifar10",
        "tiny"), with any constructor argument overridden."""
        if name not in PRESETS:
            raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_diffusers(cls, diffusers_unet):
        """The same network and weights as a diffusers `UNet2DModel` of the DDPM layout
        (e.g. google/ddpm-cifar10-32): one resnet type, attention blocks or none per level."""
        model = cls(**_config_from_diffusers(dict(diffusers_unet.config)))
        param = next(diffusers_unet.parameters())
        model.to(device=param.device, dtype=param.dtype)
        model.load_diffusers_state_dict(diffusers_unet.state_dict())
        return model

    def load_diffusers_state_dict(self, state_dict):
        """Load the weights of a diffusers `UNet2DModel` state dict (see `from_diffusers`)."""
        self.load_state_dict(_map_diffusers_state_dict(state_dict), strict=True)

    def forward(self, x, t, y=None):
        """x: (B, C, H, W); t: (B,) int64 or float timesteps; y: (B,) int64 labels or None."""
        self._check_inputs(x, t, y)
        emb = self.time_embed(t)
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        emb = F.silu(emb)
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down_stages:
            h = stage(h, emb, skips)
        h = self.mid(h, emb)
        for stage in self.up_stages:
            h = stage(h, emb, skips)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _check_inputs(self, x, t, y):
        # Shape checks only: they are static under torch.compile and never sync.
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.size_multiple or x.shape[3] % self.size_multiple:
            raise ValueError(f"x height and width must be multiples of {self.size_multiple}, got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if y is not None and self.class_embed is None:
            raise ValueError("y was given but the model has no num_classes")
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")


class AutocastChannelsLast(nn.Module):
    """Runs a model on channels_last input under autocast; returns the input's dtype."""

    def __init__(self, model, autocast_dtype):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def forward(self, x, t, y=None):
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.model(x.contiguous(memory_format=torch.channels_last), t, y)
        return out.to(x.dtype)


def compile_unet(model, *, mode=None, dynamic=False, fullgraph=True, autocast_dtype="auto"):
    """The model in channels_last, wrapped in autocast and `torch.compile`d.

    On CUDA: bf16 autocast and mode "max-autotune-no-cudagraphs" (autotuned convolutions;
    no CUDA graphs, which would overwrite outputs a training step still holds). Elsewhere:
    float32 and the default mode. The parameters stay those of `model` (the optimizer's).
    """
    device_type = next(model.parameters()).device.type
    if autocast_dtype == "auto":
        autocast_dtype = torch.bfloat16 if device_type == "cuda" else None
    if mode is None and device_type == "cuda":
        mode = "max-autotune-no-cudagraphs"
    model.to(memory_format=torch.channels_last)
    return torch.compile(AutocastChannelsLast(model, autocast_dtype), mode=mode, dynamic=dynamic, fullgraph=fullgraph)


def unwrap_model(model):
    """The plain module under `torch.compile`, `compile_unet` and (Distributed)DataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, AutocastChannelsLast):
            model = model.model
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _check_config(c):
    levels = len(c["channel_mult"])
    if not isinstance(c["in_channels"], int) or c["in_channels"] < 1:
        raise ValueError(f"in_channels must be a positive int, got {c['in_channels']!r}")
    if levels == 0 or c["num_res_blocks"] < 1:
        raise ValueError("channel_mult must be non-empty and num_res_blocks at least 1")
    if c["model_channels"] % 2:
        raise ValueError(f"model_channels must be even (sin and cos halves), got {c['model_channels']}")
    if c["image_size"] % 2 ** (levels - 1):
        raise ValueError(f"image_size must be a multiple of 2 ** (len(channel_mult) - 1) = {2 ** (levels - 1)}, "
                         f"got {c['image_size']}")
    resolutions = [c["image_size"] // 2 ** level for level in range(levels)]
    if not set(c["attention_resolutions"]) <= set(resolutions):
        raise ValueError(f"attention_resolutions must be among the resolutions {resolutions}, "
                         f"got {c['attention_resolutions']}")
    widths = [c["model_channels"] * mult for mult in c["channel_mult"]]
    for width in widths:
        if width % c["norm_groups"]:
            raise ValueError(f"norm_groups={c['norm_groups']} must divide every width, not {width}")
    attention_widths = [w for w, res in zip(widths, resolutions) if res in c["attention_resolutions"]] + widths[-1:]
    for width in attention_widths:  # the middle block always has attention
        head_channels = c["num_head_channels"] or width // c["num_heads"]
        if width % c["num_heads"] or head_channels < 1 or width % head_channels:
            raise ValueError(f"num_heads / num_head_channels must divide the attention width {width}")
    if c["downsample_pad"] not in DOWNSAMPLE_PADS:
        raise ValueError(f"downsample_pad must be one of {DOWNSAMPLE_PADS}, got {c['downsample_pad']!r}")
    if c["num_classes"] is not None and (not isinstance(c["num_classes"], int) or c["num_classes"] < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {c['num_classes']!r}")


def _config_from_diffusers(config):
    """UNet constructor arguments equivalent to a diffusers UNet2DModel config."""
    expected = dict(time_embedding_type="positional", act_fn="silu", center_input_sample=False,
                    resnet_time_scale_shift="default", mid_block_type="UNetMidBlock2D", add_attention=True,
                    mid_block_scale_factor=1, class_embed_type=None, num_class_embeds=None,
                    downsample_type="conv", upsample_type="conv", attn_norm_num_groups=None)
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(f"diffusers config {key}={config[key]!r} is not supported (expected {value!r})")
    widths = list(config["block_out_channels"])
    levels = len(widths)
    down_attention = [kind == "AttnDownBlock2D" for kind in config["down_block_types"]]
    up_attention = [kind == "AttnUpBlock2D" for kind in reversed(config["up_block_types"])]
    known = {"DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"}
    if not set(config["down_block_types"]) | set(config["up_block_types"]) <= known or down_attention != up_attention:
        raise ValueError("diffusers down_block_types / up_block_types must mirror each other, "
                         f"using only {sorted(known)}")
    if any(w % widths[0] for w in widths):
        raise ValueError(f"diffusers block_out_channels must be multiples of the first, got {widths}")
    image_size = config["sample_size"]
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    if image_size is None:
        raise ValueError("diffusers config sample_size is needed to place the attention blocks")
    return dict(
        in_channels=config["in_channels"], out_channels=config["out_channels"], image_size=image_size,
        model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=config["layers_per_block"],
        attention_resolutions=tuple(image_size // 2 ** level for level in range(levels) if down_attention[level]),
        dropout=config.get("dropout", 0.0), num_heads=1, num_head_channels=config["attention_head_dim"],
        norm_groups=config["norm_num_groups"], norm_eps=config["norm_eps"],
        flip_sin_to_cos=config["flip_sin_to_cos"], freq_shift=config["freq_shift"],
        downsample_pad="bottom_right" if config["downsample_padding"] == 0 else "symmetric")


_DIFFUSERS_RENAMES = (
    ("time_embedding.", "time_embed."),
    ("down_blocks.", "down_stages."),
    ("up_blocks.", "up_stages."),
    ("mid_block.", "mid."),
    ("mid.attentions.0.", "mid.attention."),
    (".time_emb_proj.", ".emb_proj."),
    (".conv_shortcut.", ".skip."),
    (".downsamplers.0.", ".downsample."),
    (".upsamplers.0.", ".upsample."),
    (".group_norm.", ".norm."),
    (".to_out.0.", ".proj_out."),
    ("conv_norm_out.", "norm_out."),
)


def _map_diffusers_state_dict(state_dict):
    """Rename diffusers keys to ours; fuse to_q/to_k/to_v into one 1x1 qkv conv."""
    mapped, qkv_parts = {}, {}
    for key, value in state_dict.items():
        for old, new in _DIFFUSERS_RENAMES:
            key = key.replace(old, new)
        for part in ("to_q", "to_k", "to_v"):
            if f".{part}." in key:
                prefix, kind = key.split(f".{part}.")
                qkv_parts.setdefault((prefix, kind), {})[part] = value
                break
        else:
            mapped[key] = value[:, :, None, None] if _is_linear_in_attention(key, value) else value
    for (prefix, kind), parts in qkv_parts.items():
        fused = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]])
        mapped[f"{prefix}.qkv.{kind}"] = fused[:, :, None, None] if kind == "weight" else fused
    return mapped


def _is_linear_in_attention(key, value):
    return ".proj_out.weight" in key and value.ndim == 2

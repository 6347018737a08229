import math

import pytest
import torch
from helpers import relative_error
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding
from torch.utils.flop_counter import FlopCounterMode

from fastddpm.unet import PRESETS, UNet, compile_unet, unwrap_model
from fastddpm.unet_layers import sinusoidal_embedding

# Published counts: Ho et al. (35.7M CIFAR-10, 113.7M at 256), equal to diffusers'
# google/ddpm-cifar10-32 and google/ddpm-celebahq-256; improved-cifar10 counted from
# improved-diffusion's UNetModel built with its CIFAR-10 flags.
PARAM_COUNTS = {
    "ddpm-cifar10": 35_746_307,
    "ddpm-256": 113_673_219,
    "improved-cifar10": 52_546_438,
}

# google/ddpm-cifar10-32's config.json, which sets these away from UNet2DModel's defaults
# (flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, attention_head_dim=8, norm_eps=1e-5).
DDPM_CIFAR10_DIFFUSERS_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    norm_eps=1e-6, norm_num_groups=32, mid_block_scale_factor=1)


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def randomize_(model, std=0.05):
    """Non-zero values everywhere, including the zero-initialised output convs."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return randomize_(UNet.from_preset("tiny", in_channels=1)).eval()


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_preset_parameter_count(name):
    with torch.device("meta"):
        model = UNet.from_preset(name)
    assert param_count(model) == PARAM_COUNTS[name]


def test_ddpm_cifar10_count_matches_paper():
    with torch.device("meta"):
        assert abs(param_count(UNet.from_preset("ddpm-cifar10")) - 35.7e6) < 0.1e6
        assert abs(param_count(UNet.from_preset("ddpm-256")) - 113.7e6) < 0.1e6


def test_ddpm_cifar10_forward_flops():
    # 12.44 GFLOP per 32x32 image: convolutions, linears and attention matmuls.
    with torch.device("meta"):
        model = UNet.from_preset("ddpm-cifar10")
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 32, 32), torch.empty(1, dtype=torch.long))
    assert counter.get_total_flops() / 1e9 == pytest.approx(12.44, abs=0.01)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_forward_shape_on_meta(name):
    with torch.device("meta"):
        model = UNet.from_preset(name)
        size = PRESETS[name]["image_size"]
        x = torch.empty(2, 3, size, size)
        out = model(x, torch.empty(2, dtype=torch.long))
    channels = 6 if PRESETS[name].get("learn_sigma") else 3
    assert out.shape == (2, channels, size, size)


def test_tiny_forward_on_digits(tiny):
    x = torch.randn(3, 1, 8, 8)
    out = tiny(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert out.std() > 0.01


def test_other_sizes_divisible_by_the_downsampling_are_accepted(tiny):
    out = tiny(torch.randn(1, 1, 12, 16), torch.tensor([7]))
    assert out.shape == (1, 1, 12, 16)


def test_fresh_model_starts_at_zero_output():
    # Zero-initialised output convs (Ho et al., improved-diffusion).
    torch.manual_seed(0)
    out = UNet.from_preset("tiny")(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert out.abs().max() == 0


def test_learn_sigma_doubles_output_channels():
    torch.manual_seed(0)
    model = UNet.from_preset("tiny", in_channels=1, learn_sigma=True, use_scale_shift_norm=True, num_heads=2)
    assert model.out_channels == 2
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([3, 4])).shape == (2, 2, 8, 8)


def test_integer_and_float_timesteps_agree(tiny):
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([17, 999])
    torch.testing.assert_close(tiny(x, t), tiny(x, t.float()))


def test_timestep_changes_output(tiny):
    x = torch.randn(2, 1, 8, 8)
    assert relative_error(tiny(x, torch.tensor([10, 10])), tiny(x, torch.tensor([900, 900]))) > 1e-3


@pytest.mark.parametrize("flip, shift", [(False, 1), (True, 0)])
def test_sinusoidal_embedding_matches_diffusers(flip, shift):
    t = torch.tensor([0, 1, 250, 999])
    expected = get_timestep_embedding(t, 128, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    torch.testing.assert_close(sinusoidal_embedding(t, 128, flip_sin_to_cos=flip, freq_shift=shift), expected)


def test_sinusoidal_embedding_matches_improved_diffusion_formula():
    t = torch.tensor([3.0, 640.5])
    freqs = torch.exp(-math.log(10000) * torch.arange(64, dtype=torch.float32) / 64)
    args = t[:, None] * freqs[None]
    expected = torch.cat([args.cos(), args.sin()], dim=1)
    torch.testing.assert_close(sinusoidal_embedding(t, 128, flip_sin_to_cos=True, freq_shift=0), expected)


class TestClassConditioning:
    @pytest.fixture
    def model(self):
        torch.manual_seed(0)
        return randomize_(UNet.from_preset("tiny", in_channels=1, num_classes=10)).eval()

    def test_null_class_is_an_extra_embedding_row(self, model):
        assert model.class_embed.num_embeddings == 11

    def test_y_none_means_null_class(self, model):
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
        torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([10, 10])))

    def test_label_changes_output(self, model):
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
        assert relative_error(model(x, t, torch.tensor([3, 3])), model(x, t, torch.tensor([7, 7]))) > 1e-3
        assert relative_error(model(x, t, torch.tensor([3, 3])), model(x, t)) > 1e-3

    def test_labels_need_num_classes(self, tiny):
        with pytest.raises(ValueError, match="y"):
            tiny(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))


class TestBadInput:
    def test_wrong_channel_count(self, tiny):
        with pytest.raises(ValueError, match="x must be"):
            tiny(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))

    def test_size_not_divisible_in_forward(self, tiny):
        with pytest.raises(ValueError, match="x height and width"):
            tiny(torch.randn(2, 1, 9, 8), torch.tensor([1, 2]))

    def test_size_not_divisible_in_constructor(self):
        with pytest.raises(ValueError, match="image_size"):
            UNet.from_preset("ddpm-cifar10", image_size=36, attention_resolutions=())

    def test_timestep_shape(self, tiny):
        with pytest.raises(ValueError, match="t must"):
            tiny(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))

    def test_unknown_preset(self):
        with pytest.raises(ValueError, match="name"):
            UNet.from_preset("ddpm-cifar100")

    def test_attention_resolution_not_in_network(self):
        with pytest.raises(ValueError, match="attention_resolutions"):
            UNet.from_preset("tiny", attention_resolutions=(2,))

    def test_heads_must_divide_width(self):
        with pytest.raises(ValueError, match="num_heads"):
            UNet.from_preset("tiny", num_heads=3)


def test_every_parameter_receives_gradient(tiny):
    tiny.train()
    out = tiny(torch.randn(2, 1, 8, 8), torch.tensor([4, 800]))
    (out * torch.randn_like(out)).sum().backward()
    no_grad = [name for name, p in tiny.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == []


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    model = randomize_(UNet.from_preset("tiny", in_channels=1, dropout=0.5))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([4, 800])
    model.train()
    assert relative_error(model(x, t), model(x, t)) > 1e-3
    model.eval()
    torch.testing.assert_close(model(x, t), model(x, t))


def diffusers_unet(**overrides):
    torch.manual_seed(0)
    return randomize_(UNet2DModel(**{**DDPM_CIFAR10_DIFFUSERS_CONFIG, **overrides})).eval()


@pytest.mark.parametrize("overrides, batch", [
    (dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8), 2),
    (dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, attention_head_dim=16,
          downsample_padding=1, flip_sin_to_cos=True, freq_shift=0), 2),
    ({}, 1),  # the full google/ddpm-cifar10-32 architecture
])
@torch.no_grad()
def test_from_diffusers_gives_the_same_output(overrides, batch):
    reference = diffusers_unet(**overrides)
    model = UNet.from_diffusers(reference).eval()
    assert param_count(model) == param_count(reference)
    x = torch.randn(batch, 3, 32, 32)
    t = torch.randint(0, 1000, (batch,))
    expected = reference(x, t).sample
    assert relative_error(model(x, t), expected) < 1e-4


def test_from_diffusers_of_the_real_config_is_the_ddpm_cifar10_preset():
    with torch.device("meta"):
        converted = UNet.from_diffusers(UNet2DModel(**DDPM_CIFAR10_DIFFUSERS_CONFIG))
    preset = UNet.from_preset("ddpm-cifar10", dropout=0.0).config
    assert converted.config == {**preset, "out_channels": 3}


def test_from_diffusers_rejects_other_resnet_conventions():
    with torch.device("meta"):
        reference = UNet2DModel(**DDPM_CIFAR10_DIFFUSERS_CONFIG, resnet_time_scale_shift="scale_shift")
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        UNet.from_diffusers(reference)


def test_compile_unet_keeps_parameters_and_uses_channels_last(tiny):
    compiled = compile_unet(tiny)
    assert unwrap_model(compiled) is tiny
    conv_weight = tiny.conv_in.weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.compile
@torch.no_grad()
def test_compiled_unet_matches_eager(tiny):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    expected = tiny(x, t)
    compiled = compile_unet(tiny)
    out = compiled(x, t)
    assert out.dtype == torch.float32
    assert relative_error(out, expected) < 1e-4


def test_unwrap_model_sees_through_every_wrapper():
    from fastddpm.unet import unwrap_model

    model = UNet.from_preset("tiny", in_channels=1)
    assert unwrap_model(torch.nn.DataParallel(compile_unet(model))) is model

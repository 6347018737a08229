"""fastddpm.testing, the inputs verify, the benchmarks and the tests share: a plausible model's
output means the same eps_hat in every parameterization, and each part lies in its range."""
import pytest
import torch

from fastddpm import NoiseSchedule
from fastddpm import reference as R
from fastddpm.testing import SPREAD, plausible_eps, plausible_output, random_images, variance_half

SCHEDULE = NoiseSchedule.cosine(100)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_plausible_output_is_one_model_in_every_parameterization(prediction):
    shape = (4, 3, 6, 5)
    x0 = random_images(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0, 5, 50, 99])
    outputs = {}
    for variance in ("fixed_small", "learned_range"):
        outputs[variance] = plausible_output(x0, noise, t, SCHEDULE, prediction=prediction, variance=variance,
                                             variance_bound=1.2, generator=torch.Generator().manual_seed(2))
    mean, half = outputs["learned_range"].chunk(2, dim=1)
    assert outputs["fixed_small"].shape == shape and outputs["fixed_small"].dtype == torch.float64
    torch.testing.assert_close(mean, outputs["fixed_small"], rtol=0, atol=0)
    assert half.abs().max() <= 1.2 and half.abs().max() > 1.0  # uniform over the whole range given
    x_t = R.q_sample(x0, t, noise, SCHEDULE)
    _, eps_hat = R.x0_eps_from_output(mean, x_t, t, SCHEDULE, prediction)
    expected = plausible_eps(noise, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(eps_hat, expected, rtol=1e-9, atol=1e-9)


def test_the_parts_have_their_ranges_and_spread():
    g = torch.Generator().manual_seed(3)
    images = random_images((64, 3, 16, 16), generator=g)
    assert images.dtype == torch.float32 and -1 <= images.min() < -0.99 and 0.99 < images.max() <= 1
    half = variance_half((64, 3, 16, 16), generator=g)
    assert -1 <= half.min() < -0.99 and 0.99 < half.max() <= 1
    noise = torch.randn(64, 3, 16, 16, generator=g)
    error = plausible_eps(noise, generator=g) - noise
    assert abs(error.std().item() - SPREAD) < 0.01 and abs(error.mean().item()) < 0.01

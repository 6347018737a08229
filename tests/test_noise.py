"""The noise q-sample draws inside its kernel (Philox, `_common.standard_normal`), seen through
`functional.q_sample(x0, t, None, schedule, return_noise=True)`: its distribution, its
independence, and where its seed comes from.

Statistical bounds are 5 standard errors; the seeds are fixed, so each test is deterministic.
"""
import math

import pytest
import torch
from helpers import BF16_ULP, make_layout, use_backend
from scipy import stats

from fastddpm import NoiseSchedule
from fastddpm import functional as F
from fastddpm import reference as R

SCHEDULE = NoiseSchedule.linear(1000)
LAST = SCHEDULE.num_timesteps - 1  # sqrt_1m_ab ≈ 1: x_t is almost all noise


def added_noise(x0, t, x_t):
    """The noise q-sample added, recovered from x_t in float64: (x_t - sqrt_ab x0) / sqrt_1m_ab."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    sqrt_ab = SCHEDULE.sqrt_alphas_cumprod[t].reshape(shape)
    return (x_t.double() - sqrt_ab * x0.double()) / SCHEDULE.sqrt_one_minus_alphas_cumprod[t].reshape(shape)


def correlation(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


@pytest.fixture(scope="module")
def sample():
    """131072 normals (8 samples of 4x64x64) drawn by one q-sample at t = T-1, and x0, t, x_t."""
    with use_backend("triton"):
        x0 = torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(0))
        t = torch.full((8,), LAST)
        x_t, noise = F.q_sample(x0, t, None, SCHEDULE, seed=torch.tensor([20240611]), return_noise=True)
    return x0, t, x_t, noise


def test_the_noise_returned_is_the_noise_added(sample):
    x0, t, x_t, noise = sample
    torch.testing.assert_close(added_noise(x0, t, x_t), noise.double(), rtol=0, atol=1e-5)


def test_mean_and_variance(sample):
    z = sample[3].double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    per_sample = z.flatten(1)
    d = per_sample.shape[1]
    assert per_sample.mean(1).abs().max() < 5 / math.sqrt(d)
    assert (per_sample.var(1) - 1).abs().max() < 5 * math.sqrt(2 / d)


def test_normal_distribution(sample):
    """Kolmogorov-Smirnov, skew and kurtosis, the tails, and tl.randn's cut at |z| ~ 5.7
    (Box-Muller with u1 >= 1e-7 in Philox' uniform)."""
    z = sample[3].double().flatten().numpy()
    n = z.size
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert abs(z).max() <= 5.7
    beyond_3 = (abs(z) > 3).sum()
    expected = n * 2 * stats.norm.sf(3)
    assert abs(beyond_3 - expected) < 5 * math.sqrt(expected)


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 64, 64 * 64])
def test_no_correlation_between_neighbouring_elements(sample, lag):
    """Lags within and across Philox's groups of four, the next row and the next channel."""
    z = sample[3].flatten(1)
    bound = 5 / math.sqrt(z.numel())
    assert abs(correlation(z[:, lag:], z[:, :-lag])) < bound
    assert abs(correlation(z[:, lag:] ** 2, z[:, :-lag] ** 2)) < bound  # no shared Box-Muller radius


def test_no_correlation_between_samples_of_a_batch(sample):
    z = sample[3].flatten(1)
    bound = 5 / math.sqrt(z.shape[1])
    for a in range(z.shape[0]):
        for b in range(a + 1, z.shape[0]):
            assert abs(correlation(z[a], z[b])) < bound, (a, b)


def test_consecutive_calls_draw_fresh_uncorrelated_noise(triton_backend):
    x0 = torch.randn(2, 4, 32, 32)
    t = torch.full((2,), LAST)
    torch.manual_seed(0)
    first = F.q_sample(x0, t, None, SCHEDULE, return_noise=True)[1]
    second = F.q_sample(x0, t, None, SCHEDULE, return_noise=True)[1]
    assert not torch.equal(first, second)
    assert abs(correlation(first, second)) < 5 / math.sqrt(first.numel())


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (3, 6, 17)])
def test_same_seed_same_noise_whatever_the_dtype_or_layout(triton_backend, shape):
    """D = 189 and 102 elements per sample: not a multiple of Philox's group of four."""
    x0 = torch.randn(shape)
    t = torch.tensor([LAST, 500, 3][: shape[0]])
    seed = torch.tensor([987654321])
    _, expected = F.q_sample(x0, t, None, SCHEDULE, seed=seed, return_noise=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for layout in ("contiguous", "channels_last", "strided"):
            x_t, noise = F.q_sample(make_layout(x0.to(dtype), layout), t, None, SCHEDULE, seed=seed,
                                    return_noise=True)
            # bit-identical up to the final rounding (the interpreter truncates to bfloat16: conftest.BF16_ULP)
            ulp = BF16_ULP if dtype == torch.bfloat16 else 0
            torch.testing.assert_close(noise.float(), expected.to(dtype).float(), rtol=ulp, atol=0)
            if dtype == torch.float32:
                torch.testing.assert_close(added_noise(x0, t, x_t), expected.double(), rtol=0, atol=2e-4)


def test_manual_seed_makes_a_run_reproducible(triton_backend):
    x0 = torch.randn(2, 3, 8, 8)
    t = torch.tensor([LAST, 100])

    def run(seed):
        torch.manual_seed(seed)
        return F.q_sample(x0, t, None, SCHEDULE, return_noise=True)

    first, again, other = run(123), run(123), run(124)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_a_given_generator_is_used(triton_backend):
    x0 = torch.randn(2, 3, 8, 8)
    t = torch.tensor([LAST, 100])
    global_state = torch.get_rng_state()
    generator = torch.Generator().manual_seed(7)
    _, first = F.q_sample(x0, t, None, SCHEDULE, generator=generator, return_noise=True)
    _, again = F.q_sample(x0, t, None, SCHEDULE, generator=torch.Generator().manual_seed(7), return_noise=True)
    _, next_draw = F.q_sample(x0, t, None, SCHEDULE, generator=generator, return_noise=True)
    _, other = F.q_sample(x0, t, None, SCHEDULE, generator=torch.Generator().manual_seed(8), return_noise=True)
    assert torch.equal(first, again)
    assert not torch.equal(first, next_draw) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG was not touched


def test_bfloat16_never_loses_the_drawn_noise_at_small_t(triton_backend):
    """Linear schedule, t = 0…9: in bfloat16, ab rounds to 1 and sqrt(1 - ab) to 0 (math.md
    section 1). The kernel's float32 coefficients keep the noise: x_t - sqrt_ab x0 follows it."""
    x0 = torch.randn(10, 3, 16, 16).bfloat16()
    t = torch.arange(10)
    seed = torch.tensor([42])
    x_t, _ = F.q_sample(x0, t, None, SCHEDULE, seed=seed, return_noise=True)
    _, noise = F.q_sample(x0.float(), t, None, SCHEDULE, seed=seed, return_noise=True)  # the float32 noise
    exact = R.q_sample(x0.double(), t, noise.double(), SCHEDULE)
    torch.testing.assert_close(x_t.double(), exact, atol=1.6e-2, rtol=1.6e-2)
    added = x_t.double() - SCHEDULE.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1) * x0.double()
    for b in range(10):
        assert added[b].abs().max() > 0
        # 0.01 · eps against bfloat16 rounding of x_t (~0.003): clearly the noise
        assert correlation(added[b], noise[b]) > 0.8, b
    assert ((1 - SCHEDULE.alphas_cumprod[:10].to(torch.bfloat16)) ** 0.5)[0].item() == 0.0

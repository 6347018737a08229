"""pytest-benchmark suite of the loss path of a training step (see bench_loss.py), small sizes, CPU:

    pytest benchmarks/suites/test_bench_loss.py --benchmark-group-by=param:weighting,param:dtype

On CPU fastddpm runs its PyTorch path (backend "auto"), not the Triton kernels.
"""
import pytest
import torch

from fastddpm import NoiseSchedule
from fastddpm.benchmarks.bench_loss import (MIN_SNR_GAMMA, PROVIDERS, WEIGHTINGS, diffusers_scheduler, eager_loss,
                                           loss_paths, make_step, run)
from fastddpm.benchmarks.harness import FIELDS
from fastddpm import torch_ops
from fastddpm.loss import DiffusionLoss, NoiseState

SIZE = (8, 3, 32, 32)
SCHEDULE = NoiseSchedule.linear(1000)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_loss_step(benchmark, weighting, dtype, provider):
    x0 = torch.randn(SIZE, dtype=getattr(torch, dtype))
    pred = torch.randn(SIZE, dtype=x0.dtype, requires_grad=True)
    step = make_step(loss_paths(SCHEDULE, weighting)[provider], x0, pred)
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 1e-1)])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_eager_baseline_is_the_same_loss(weighting, dtype, rtol, atol):
    """For the same t and noise, diffusers' add_noise and loss compute what DiffusionLoss does
    (add_noise rounds coefficients, products and sum to the input dtype: in bfloat16 a few units
    of its last place of |x_t| <= 4)."""
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(SIZE, generator=g).to(dtype) for _ in range(3))
    t = torch.tensor([0, 1, 10, 100, 400, 700, 998, 999])
    scheduler = diffusers_scheduler(SCHEDULE)
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t), torch_ops.q_sample(x0, t, noise, SCHEDULE),
                               rtol=rtol, atol=atol)
    ours = DiffusionLoss(SCHEDULE, weighting=weighting, gamma=MIN_SNR_GAMMA).loss(pred, x0, NoiseState(t, None, noise))
    torch.testing.assert_close(ours, eager_loss(scheduler, weighting)(pred, noise, t), rtol=1e-5, atol=0)


def test_run_gives_long_format_rows():
    rows = run(sizes=[(2, 3, 8, 8)], dtypes=[torch.float32], device="cpu", weightings=["min_snr"],
               providers=["fastddpm", "eager"], reps=3)
    assert {tuple(sorted(row)) for row in rows} == {tuple(sorted(FIELDS))}
    assert {(row["provider"], row["metric"]) for row in rows} == {
        (provider, metric) for provider in ("fastddpm", "eager") for metric in ("time", "bytes", "bandwidth")}
    for row in rows:
        assert row["p20"] <= row["p50"] <= row["p80"] and row["p50"] > 0, row
    assert next(row for row in rows if row["metric"] == "bytes")["p50"] == 4 * 2 * 3 * 8 * 8 * 4

"""pytest-benchmark suite of the loss path of a training step (see bench_loss.py), small sizes, CPU:

    pytest benchmarks/test_bench_loss.py --benchmark-group-by=param:weighting,param:dtype

On CPU fastddpm runs its PyTorch path (backend "auto"), not the Triton kernels.
"""
import pytest
import torch

from fastddpm import NoiseSchedule
from fastddpm.benchmarks.bench_loss import PROVIDERS, WEIGHTINGS, loss_paths, make_step, run
from fastddpm.benchmarks.harness import FIELDS

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


def test_run_gives_long_format_rows():
    rows = run(sizes=[(2, 3, 8, 8)], dtypes=[torch.float32], device="cpu", weightings=["min_snr"],
               providers=["fastddpm", "eager"], reps=3)
    assert {tuple(sorted(row)) for row in rows} == {tuple(sorted(FIELDS))}
    assert {(row["provider"], row["metric"]) for row in rows} == {
        (provider, metric) for provider in ("fastddpm", "eager") for metric in ("time", "bytes", "bandwidth")}
    for row in rows:
        assert row["p20"] <= row["p50"] <= row["p80"] and row["p50"] > 0, row
    assert next(row for row in rows if row["metric"] == "bytes")["p50"] == 4 * 2 * 3 * 8 * 8 * 4

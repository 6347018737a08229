"""pytest-benchmark suite of one reverse step of the sampler (see bench_sampling.py), small sizes, CPU:

    pytest benchmarks/suites/test_bench_sampling.py --benchmark-group-by=param:dtype

On CPU fastddpm runs its PyTorch path (backend "auto"), not the Triton kernels.
"""
import pytest
import torch

from fastddpm import NoiseSchedule
from fastddpm import functional as F
from fastddpm.benchmarks.bench_sampling import PROVIDERS, run, step_providers
from fastddpm.benchmarks.improved_diffusion import TABLES, GaussianDiffusion
from fastddpm.benchmarks.harness import FIELDS

SIZE = (8, 3, 32, 32)
SCHEDULE = NoiseSchedule.linear(1000)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reverse_step(benchmark, dtype, provider):
    x = torch.randn(SIZE, dtype=getattr(torch, dtype))
    model_output = torch.randn(SIZE, dtype=x.dtype)
    t = torch.randint(1, 1000, (SIZE[0],))
    step = step_providers(SCHEDULE, x.device, providers=(provider,))[provider]
    x_prev = benchmark.pedantic(step, args=(model_output, x, t), rounds=20, warmup_rounds=2)
    assert x_prev.dtype == x.dtype and x_prev.shape == x.shape and bool(torch.isfinite(x_prev).all())


def test_eager_baseline_is_the_same_step():
    """The improved-diffusion-style step computes what functional.p_sample_step does (same noise)."""
    x, model_output = torch.randn(SIZE), torch.randn(SIZE)
    t = torch.tensor([0, 1, 2, 10, 100, 500, 900, 999])
    peer = GaussianDiffusion({name: getattr(SCHEDULE, name) for name in TABLES})
    torch.manual_seed(3)
    eager = peer.p_sample(model_output, x, t)
    torch.manual_seed(3)
    noise = torch.randn_like(x)
    ours = F.p_sample_step(model_output, x, t, SCHEDULE, noise=noise, clip_denoised=True)
    torch.testing.assert_close(eager, ours, rtol=1e-5, atol=1e-5)


def test_run_gives_long_format_rows():
    rows = run(sizes=[(2, 3, 8, 8)], dtypes=[torch.float32], device="cpu", providers=("fastddpm", "eager"), reps=3)
    assert {tuple(sorted(row)) for row in rows} == {tuple(sorted(FIELDS))}
    assert {(row["provider"], row["metric"]) for row in rows} == {
        (provider, metric) for provider in ("fastddpm", "eager") for metric in ("time", "bytes", "bandwidth")}
    for row in rows:
        assert row["p20"] <= row["p50"] <= row["p80"] and row["p50"] > 0, row
    assert next(row for row in rows if row["metric"] == "bytes")["p50"] == 3 * 2 * 3 * 8 * 8 * 4

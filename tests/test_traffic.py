"""The traffic counter (benchmarks/traffic.py) on kernels and ops whose counts are known by
construction, and the launches and bytes of every hot path and its peers, pinned.

When a hot path changes, `python -m fastddpm.benchmarks.traffic --size 4x3x16x16` prints the
new counts; a failing pin also prints its kernels one by one.
"""
import json

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fastddpm
from fastddpm import _checks
from fastddpm.benchmarks import host_overhead, paths, traffic
from fastddpm.benchmarks.harness import FIELDS
from fastddpm.benchmarks.traffic import count

N = 100  # elements of the hand-made tensors: not a multiple of BLOCK, so masks matter
BLOCK = 32


@triton.jit
def axpy_kernel(x_ptr, y_ptr, out_ptr, scale_ptr, n, EXTRA_LOAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(scale_ptr)  # a scalar, unmasked load: once per program
    x = tl.load(x_ptr + offs, mask=mask)
    if EXTRA_LOAD:
        x += tl.load(out_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, a * x + tl.load(y_ptr + offs, mask=mask), mask=mask)


def axpy(x, y, out, scale, extra_load=False, grid=None):
    axpy_kernel[grid or (triton.cdiv(N, BLOCK),)](x, y, out, scale, N, EXTRA_LOAD=extra_load, BLOCK=BLOCK)


@pytest.fixture
def vectors():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(N, generator=generator) for _ in range(3)] + [torch.tensor([2.0])]


def test_triton_launch_counts_masked_elements_and_scalar_loads(vectors):
    traffic = count(lambda: axpy(*vectors), numel=N)
    programs = triton.cdiv(N, BLOCK)
    assert traffic.launches == 1
    assert traffic.bytes == 3 * N * 4 + programs * 4  # x, y read and out written where the mask holds; a per program
    assert traffic.bytes_per_element == traffic.bytes / N
    assert traffic.kernels == [("triton.axpy_kernel", traffic.bytes)]
    x, y, out, scale = vectors
    torch.testing.assert_close(out, 2.0 * x + y)  # the kernel still ran


def test_an_added_load_changes_the_count(vectors):
    base = count(lambda: axpy(*vectors)).bytes
    assert count(lambda: axpy(*vectors, extra_load=True)).bytes == base + N * 4


def test_one_launch_per_grid_whatever_its_shape_and_element_sizes(vectors):
    halves = [v.to(torch.bfloat16) for v in vectors[:3]] + [vectors[3]]
    traffic = count(lambda: (axpy(*halves, grid=(4, 3)), axpy(*vectors)))
    # the (4, 3) grid runs every block 3 times: its bytes triple, its launch does not
    assert traffic.launches == 2
    assert traffic.bytes == 3 * (3 * N * 2 + 4 * 4) + 3 * N * 4 + 4 * 4


def test_aten_ops_by_construction():
    x, y = torch.randn(4, 25), torch.randn(4, 25)
    coef = torch.rand(4, 1)
    index, flag = torch.tensor([0, 3, 2]), torch.ones((), dtype=torch.bool)
    cases = [  # (fn, launches, bytes)
        (lambda: x + y, 1, 3 * N * 4),
        (lambda: x.clone().add_(y), 2, 2 * N * 4 + 3 * N * 4),  # clone, then read x and y and write x
        (lambda: torch.empty_like(x).fill_(1.0), 1, N * 4),
        (lambda: torch.randn_like(x), 1, N * 4),  # the _like input is not read
        (lambda: x.view(100).t().unsqueeze(0).expand(3, 100), 0, 0),
        (lambda: x.float(), 0, 0),
        (lambda: x.to(torch.bfloat16), 1, N * 4 + N * 2),
        (lambda: x * coef.expand_as(x), 1, 2 * N * 4 + 4 * 4),  # an expanded (B, 1) reads B elements
        (lambda: x.sum(), 1, N * 4 + 4),
        (lambda: x[index], 1, 3 * 8 + 2 * 3 * 25 * 4),  # a gather reads only what it gathers
        (lambda: x[:0] * 2, 0, 0),  # empty: no kernel
        (lambda: torch._assert_async(flag), 1, 1),
        (lambda: torch.tensor(2.0) * 3, 0, 0),  # made from Python numbers: host math
    ]
    for fn, launches, moved in cases:
        traffic = count(fn)
        assert (traffic.launches, traffic.bytes) == (launches, moved), traffic.kernels


def test_mse_loss_launches_what_aten_launches_on_cuda():
    pred, target = torch.randn(4, 25, requires_grad=True), torch.randn(4, 25)

    def step():
        pred.grad = None  # else the backward adds into the warm-up's gradient (one more kernel)
        F.mse_loss(pred, target).backward()

    traffic = count(step)
    # forward: elementwise into a temporary, then its mean; backward: the seed, zeros_like(input), the kernel
    assert [name for name, _ in traffic.kernels] == ["aten.mse_loss", "aten.ones_like", "aten.mse_loss_backward"]
    assert traffic.launches == 5
    assert traffic.bytes == (2 * N * 4 + 4 + 2 * N * 4) + 4 + (2 * N * 4 + 4 + N * 4 + N * 4)


@torch.library.custom_op("traffic_test::scaled_pair", mutates_args=())
def scaled_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 2, x * 3


@scaled_pair.register_fake
def _(x):
    return torch.empty_like(x), torch.empty_like(x)


scaled_pair.register_autograd(lambda ctx, grad_a, grad_b: 2 * grad_a + 3 * grad_b)


def test_custom_ops_count_their_insides_and_autograd_its_zero_fill():
    x = torch.randn(N, requires_grad=True)
    forward = count(lambda: scaled_pair(x))
    assert forward.kernels == [("aten.mul", 2 * N * 4), ("aten.mul", 2 * N * 4)]  # the op itself is no launch

    def step():
        x.grad = None
        scaled_pair(x)[0].sum().backward()

    traffic = count(step)
    names = [name for name, _ in traffic.kernels]
    # forward 2 muls and the sum; backward: the seed, zeros for the unused output, 2 muls and an add
    assert names == ["aten.mul", "aten.mul", "aten.sum", "aten.ones_like", "aten.zeros", "aten.mul", "aten.mul",
                     "aten.add"]
    assert ("aten.zeros", N * 4) in traffic.kernels


def test_host_tensors_launch_nothing_and_enter_kernels_as_arguments():
    table, x = torch.rand(1000, dtype=torch.float64), torch.randn(N)
    alpha = table[10]
    assert count(lambda: (1 - alpha) ** 0.5, host=(table, alpha)).launches == 0
    assert count(lambda: (1 - alpha) ** 0.5 * x, host=(table, alpha)).kernels == [("aten.mul", 2 * N * 4)]
    t = torch.tensor([3, 7])
    # a host table meeting a device index was copied to the device first (a no-op `.to` on the CPU)
    gathered = count(lambda: table.to(t.device)[t], host=(table,))
    assert gathered.kernels == [("host-to-device copy", 1000 * 8), ("aten.index", 2 * 8 + 2 * 2 * 8)]


def test_check_timesteps_is_counted_as_on_a_gpu():
    schedule = fastddpm.NoiseSchedule.linear(1000)
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0, 999])
    traffic = count(lambda: fastddpm.functional.q_sample(x0, t, noise, schedule))
    names = [name for name, _ in traffic.kernels]
    assert names[:5] == ["aten.ge", "aten.lt", "aten.bitwise_and", "aten.all", "aten._assert_async"]
    assert traffic.syncs == 0  # not the host branch's aminmax and item()
    assert _checks.torch is torch  # restored: on the CPU the check is exact again
    with pytest.raises(ValueError, match="t must lie in"):
        fastddpm.functional.q_sample(x0, torch.tensor([0, 1000]), None, schedule)


# Pinned (launches, bytes) at 4x3x16x16 (3072 elements) of every path: the current code's values.
PINNED = {
    ("loss_simple", "fastddpm"): (5, 49640),  # 16.16 B/element; floor 16
    ("loss_simple", "diffusers"): (15, 196908),  # 64.10
    ("loss_min_snr", "fastddpm"): (5, 24920),  # 8.11 (bfloat16); floor 8
    ("loss_min_snr", "diffusers"): (36, 258172),  # 84.04
    ("p_sample_step", "fastddpm"): (2, 37224),  # 12.12; floor 12
    ("p_sample_step", "diffusers"): (10, 270336),  # 88.00
    ("p_sample_step", "improved-diffusion"): (39, 409368),  # 133.26
    ("ddim_step", "fastddpm"): (1, 37184),  # 12.10; floor 12
    ("ddim_step", "diffusers"): (6, 172032),  # 56.00
    ("ddim_step_eta1", "fastddpm"): (2, 37256),  # 12.13; floor 12
    ("ddim_step_eta1", "diffusers"): (9, 245760),  # 80.00
    ("vb_terms", "fastddpm"): (2, 37040),  # 12.06; floor 12
    ("vb_terms", "improved-diffusion"): (99, 1646392),  # 535.94
    ("dpm++2m_step", "fastddpm"): (1, 61536),  # 20.03; floor 20
    ("dpm++2m_step", "diffusers"): (10, 294912),  # 96.00
    ("dpm++2m-sde_step", "fastddpm"): (2, 61608),  # 20.05; floor 20
    ("dpm++2m-sde_step", "diffusers"): (13, 368640),  # 120.00
    ("unipc_step", "fastddpm"): (1, 73888),  # 24.05; floor 24
    ("unipc_step", "diffusers"): (38, 700660),  # 228.08
    ("euler_step", "fastddpm"): (1, 49216),  # 16.02; floor 16
    ("euler_step", "diffusers"): (7, 208896),  # 68.00
    ("euler-a_step", "fastddpm"): (2, 49288),  # 16.04; floor 16
    ("euler-a_step", "diffusers"): (10, 282624),  # 92.00
}
# The budget of each path, seed draw included: at most this many launches, and bytes per element
# within 2% of the floor (docs/math.md section 7) once the per-program scalars (t, coefficients, the
# seed) are negligible, as at CIFAR-10 sizes.
BUDGET = {"loss_simple": 5, "loss_min_snr": 5, "p_sample_step": 3, "ddim_step": 3, "ddim_step_eta1": 3,
          "vb_terms": 3, "dpm++2m_step": 1, "dpm++2m-sde_step": 2, "unipc_step": 1, "euler_step": 1,
          "euler-a_step": 2}
SIZE = (4, 3, 16, 16)


@pytest.fixture(scope="module")
def counts():
    return {(case.op, provider): traffic for (case, provider), traffic in traffic.measure(size=SIZE).items()}


def test_every_path_is_pinned(counts):
    assert set(counts) == set(PINNED)


@pytest.mark.parametrize("path", PINNED, ids="-".join)
def test_pinned_launches_and_bytes(counts, path):
    measured = counts[path]
    assert (measured.launches, measured.bytes) == PINNED[path], f"{measured}: {measured.kernels}"
    assert measured.syncs == 0


def test_every_path_within_its_launch_budget_and_at_the_byte_floor():
    measured = traffic.measure(size=(8, 3, 32, 32))
    for (case, provider), counted in measured.items():
        if provider == "fastddpm":
            assert counted.launches <= BUDGET[case.op], (case.op, counted.kernels)
            floor = case.floor
            assert floor <= counted.bytes_per_element <= 1.02 * floor, (case.op, counted.bytes_per_element, floor)


def test_rows_are_long_format(counts):
    measured = traffic.measure([paths.CASES[3]], size=(2, 3, 4, 4))
    rows = traffic.rows(measured, (2, 3, 4, 4))
    assert all(set(row) == set(FIELDS) for row in rows)
    launches = {row["provider"]: row["p50"] for row in rows if row["metric"] == "launches"}
    assert launches == {"fastddpm": 1, "diffusers": 6, "floor": 1}


def test_cpu_samples_are_paired_repeat_by_repeat():
    """harness.cpu_samples: one sample per provider and repeat, in repeat order, so that the ratio
    of one repeat's samples holds however the machine's speed changes between repeats."""
    from fastddpm.benchmarks import harness

    clock, calls = [0.0], [0]

    def step(cost):
        def run():
            calls[0] += 1
            clock[0] += cost * (1 + (calls[0] - 1) // 2 % 5)  # the machine slows and recovers between repeats
        return run

    samples = harness.cpu_samples({"ours": step(1.0), "peer": step(3.0)}, 7, warmup=0, clock=lambda: clock[0])
    assert [len(values) for values in samples.values()] == [7, 7]
    assert [peer / ours for peer, ours in zip(samples["peer"], samples["ours"])] == pytest.approx([3.0] * 7)
    assert len(set(samples["ours"])) > 1  # the speed did change


def test_host_overhead_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(host_overhead, "INNER", 1)
    path = tmp_path / "rows.json"
    host_overhead.main(["--only", "ddim_step", "--reps", "2", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert all(row["p50"] > 0 and set(row) == set(FIELDS) for row in rows)
    assert {row["provider"] for row in rows if row["metric"] == "host_us"} == {
        "fastddpm", "fastddpm+launch", "reference", "diffusers"}
    assert {(row["provider"], row["mode"]) for row in rows if row["metric"] == "host_ratio"} == {
        (peer, f"vs {ours}") for peer in ("reference", "diffusers") for ours in ("fastddpm", "fastddpm+launch")}


def test_traffic_main_writes_rows(tmp_path, capsys):
    path = tmp_path / "rows.json"
    traffic.main(["--size", "2x3x4x4", "--only", "ddim_step", "--json", str(path)])
    assert "ddim_step" in capsys.readouterr().out
    rows = json.loads(path.read_text())
    assert {(row["provider"], row["metric"]) for row in rows} == {
        (provider, metric) for provider in ("fastddpm", "diffusers", "floor")
        for metric in ("launches", "bytes_per_element")}


def test_bench_traffic_flag_adds_the_rows(monkeypatch, tmp_path):
    from fastddpm.benchmarks import suite as bench
    from fastddpm.cli import main

    row = dict(op="ddim_step", provider="fastddpm", mode="forward", metric="launches", unit="launches",
               shape="16x3x32x32", dtype="float32", p50=11, p20=11, p80=11)
    monkeypatch.setattr(bench, "run_benchmark", lambda name, device: [])
    monkeypatch.setattr(bench, "traffic_rows", lambda print_fn: [row])
    path = tmp_path / "bench.json"
    assert main(["bench", "--only", "loss", "--traffic", "--json", str(path)]) == 0
    assert json.loads(path.read_text()) == [row]

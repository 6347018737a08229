"""The fused q-sample kernel (Triton's interpreter on CPU) against the float64 reference."""
import pytest
import torch
from helpers import BF16_ULP, SHAPES, TOLERANCES, make_layout, use_backend
from helpers import recorded_ops

import fastddpm
from fastddpm import NoiseSchedule
from fastddpm import functional as F
from fastddpm import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last", "strided"]


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.cosine(1000)


def inputs(shape, dtype, layout, T=1000):
    x0 = make_layout(torch.randn(shape).to(dtype), layout)
    noise = make_layout(torch.randn(shape).to(dtype), layout)
    t = torch.randint(0, T, (shape[0],))
    return x0, noise, t


def expected(x0, t, noise, schedule):
    return R.q_sample(x0.double(), t, noise.double(), schedule)


def assert_rounded_once(actual, exact):
    """Within float32 math of the exact value rounded once to actual's dtype."""
    torch.testing.assert_close(actual.double(), exact, **TOLERANCES[actual.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_given_noise_matches_reference(triton_backend, schedule, dtype, shape, layout):
    x0, noise, t = inputs(shape, dtype, layout)
    x_t = F.q_sample(x0, t, noise, schedule)
    assert x_t.dtype == dtype and x_t.shape == x0.shape
    assert_rounded_once(x_t, expected(x0, t, noise, schedule))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_drawn_noise_is_what_was_added(triton_backend, schedule, dtype, layout):
    x0, _, t = inputs((3, 4, 6, 5), dtype, layout)
    x_t, noise = F.q_sample(x0, t, None, schedule, return_noise=True)
    assert noise.dtype == dtype
    # the kernel adds the float32 noise; the returned copy is rounded to the dtype
    torch.testing.assert_close(x_t.double(), expected(x0, t, noise, schedule),
                               **{k: 2 * v for k, v in TOLERANCES[dtype].items()})
    assert noise.float().std() > 0.5


def test_drawn_noise_is_the_same_for_every_dtype_and_layout(triton_backend, schedule):
    x0 = torch.randn(2, 3, 8, 6)
    t = torch.tensor([10, 900])
    seed = torch.tensor([987654321])
    _, reference_noise = F.q_sample(x0, t, None, schedule, seed=seed, return_noise=True)
    for dtype in DTYPES:
        for layout in ("contiguous", "channels_last"):
            _, noise = F.q_sample(make_layout(x0.to(dtype), layout), t, None, schedule, seed=seed, return_noise=True)
            # bit-identical up to the final rounding (one bfloat16 ulp: see conftest.BF16_ULP)
            ulp = BF16_ULP if dtype == torch.bfloat16 else 0
            torch.testing.assert_close(noise.float(), reference_noise.to(dtype).float(), rtol=ulp, atol=0)


def test_output_keeps_channels_last(triton_backend, schedule):
    x0, noise, t = inputs((2, 3, 5, 5), torch.float32, "channels_last")
    assert F.q_sample(x0, t, noise, schedule).is_contiguous(memory_format=torch.channels_last)


def test_bfloat16_never_loses_the_noise_at_small_t(triton_backend, schedule):
    """diffusers' add_noise in bfloat16 casts ab first: sqrt(1 - ab) is 0 for t < 10 (linear)."""
    linear = NoiseSchedule.linear(1000)
    x0, noise = torch.randn(10, 3, 8, 8).bfloat16(), torch.randn(10, 3, 8, 8).bfloat16()
    t = torch.arange(10)
    x_t = F.q_sample(x0, t, noise, linear)
    exact = expected(x0, t, noise, linear)
    assert_rounded_once(x_t, exact)
    added = (x_t.double() - linear.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1) * x0.double())
    assert (added.flatten(1).abs().amax(1) > 0).all()
    # what diffusers' bfloat16 arithmetic gives: ab rounds to 1, no noise at all for t = 0
    ab_bf16 = linear.alphas_cumprod[:10].to(torch.bfloat16)
    assert ((1 - ab_bf16) ** 0.5)[0].item() == 0.0


def test_gradients(triton_backend, schedule):
    x0, noise, t = inputs((2, 3, 5, 7), torch.float64, "contiguous")
    x0 = x0.float().requires_grad_()
    noise = noise.float().requires_grad_()
    upstream = torch.randn(2, 3, 5, 7)
    (F.q_sample(x0, t, noise, schedule) * upstream).sum().backward()
    x0_ref, noise_ref = x0.detach().double().requires_grad_(), noise.detach().double().requires_grad_()
    (R.q_sample(x0_ref, t, noise_ref, schedule) * upstream.double()).sum().backward()
    torch.testing.assert_close(x0.grad.double(), x0_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(noise.grad.double(), noise_ref.grad, rtol=1e-6, atol=1e-6)


def test_gradient_through_drawn_noise_path(triton_backend, schedule):
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.tensor([5, 600])
    F.q_sample(x0, t, None, schedule).sum().backward()
    torch.testing.assert_close(x0.grad, schedule.sqrt_alphas_cumprod[t].float().reshape(-1, 1, 1, 1).expand(2, 3, 4, 4))


def test_opcheck(triton_backend, schedule):
    x0, noise, t = inputs((2, 3, 4, 4), torch.float32, "contiguous")
    table = schedule.kernel_table("cpu")
    seed = torch.tensor([7])
    random = torch.tensor([7, 2 ** 61 + 5, 123456789])  # (seed, r_0, r_1): t = r mod T
    op = torch.ops.fastddpm.q_sample.default
    torch.library.opcheck(op, (x0, t, noise, table, seed, False, False, False))
    for args in ((x0, t, None, table, seed, False, True, False), (x0, random, None, table, None, False, False, True)):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(triton_backend, schedule, backend):
    x0, noise, t = inputs((2, 3, 4, 4), torch.float32, "contiguous")

    def noised(x0, t, noise):
        return F.q_sample(x0, t, noise, schedule) * 2, F.q_sample(x0, t, None, schedule)

    torch._dynamo.reset()
    compiled = torch.compile(noised, fullgraph=True, backend=backend)
    given, drawn = compiled(x0, t, noise)
    assert_rounded_once(given / 2, expected(x0, t, noise, schedule))
    assert drawn.shape == x0.shape


def test_reference_backend_on_cpu_by_default(schedule):
    assert fastddpm.get_backend() in fastddpm.backend.BACKENDS
    from fastddpm.backend import use_triton
    fastddpm.set_backend("auto")
    assert not use_triton(torch.empty(1))


def test_triton_backend_without_interpreter_says_so(monkeypatch, triton_backend):
    from fastddpm.backend import use_triton
    monkeypatch.setattr(fastddpm.backend, "_INTERPRETER", False)  # as read at import without TRITON_INTERPRET
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(torch.empty(1))


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastddpm.set_backend("cuda")


def test_use_backend_restores_the_previous_backend_even_after_an_error(schedule):
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    before = fastddpm.get_backend()
    with pytest.raises(ValueError, match="t must"):
        with fastddpm.use_backend("torch"):
            assert fastddpm.get_backend() == "torch"
            fastddpm.functional.q_sample(x0, torch.tensor([0, 1000]), torch.randn_like(x0), schedule)
    assert fastddpm.get_backend() == before
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastddpm.use_backend("cuda"):
            pass
    assert fastddpm.get_backend() == before


# -- bad input: every argument, on both paths --------------------------------------------------


@pytest.mark.parametrize("t", [[0, 1000], [-1, 0]])
@pytest.mark.parametrize("noise", [False, True])
def test_out_of_range_t_fails_where_it_is_checked(schedule, t, noise):
    """The reference checks t on the host; the kernel checks it where it loads it (a device
    assert, which the interpreter raises), with no check op launched before it."""
    x0 = torch.randn(2, 3, 4)
    noise = torch.randn(2, 3, 4) if noise else None
    with use_backend("reference"), pytest.raises(ValueError, match=r"t must lie in \[0, 1000\), got values from"):
        F.q_sample(x0, torch.tensor(t), noise, schedule)
    with use_backend("triton"), pytest.raises(Exception, match=r"t must lie in \[0, T\)") as raised:
        with recorded_ops() as ops:
            F.q_sample(x0, torch.tensor(t), noise, schedule)
    assert "interpret" in type(raised.value).__module__ or "Interpreter" in type(raised.value).__name__
    assert not {"aminmax", "_assert_async", "ge", "lt"} & ops, ops


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("call, error, match", [
    (lambda s: F.q_sample(torch.randn(2, 3, 4), torch.tensor([1.0, 2.0]), None, s), TypeError, "t must be an int64"),
    (lambda s: F.q_sample(torch.randn(2, 3, 4), torch.tensor([1, 2, 3]), None, s), ValueError, r"t must have shape \(2,\)"),
    (lambda s: F.q_sample(torch.randn(2, 3, 4), [1, 2], None, s), TypeError, "t must be an int64 tensor"),
    (lambda s: F.q_sample(torch.randn(2, 3, 4), torch.tensor([1, 2]), torch.randn(2, 3, 5), s), ValueError,
     r"noise must have shape \(2, 3, 4\)"),
    (lambda s: F.q_sample(torch.randn(2, 3, 4).int(), torch.tensor([1, 2]), None, s), TypeError, "x0 must be float32"),
    (lambda s: F.q_sample(torch.randn(2), torch.tensor([1, 2]), None, s), ValueError, r"x0 must have shape \(B, ...\)"),
    (lambda s: F.q_sample(torch.randn(2, 3), torch.tensor([1, 2]), None, "linear"), TypeError, "schedule must be"),
    (lambda s: F.q_sample(torch.randn(2, 3), torch.tensor([1, 2]), None, s, generator=5), TypeError, "generator"),
    (lambda s: F.q_sample(torch.randn(2, 3), torch.tensor([1, 2]), None, s, seed=torch.tensor([1.5])), TypeError,
     "seed must be"),
    (lambda s: F.q_sample(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), None, s), ValueError, "must not be empty"),
])
def test_bad_input(schedule, backend, call, error, match):
    with use_backend(backend), pytest.raises(error, match=match):
        call(schedule)


def test_device_mismatch_is_named(schedule):
    x0 = torch.randn(2, 3, 4, device="meta")
    with pytest.raises(ValueError, match="t is on cpu but the data is on meta"):
        F.q_sample(x0, torch.tensor([1, 2]), None, schedule)


def test_compiles_for_gpus_with_vector_accesses():
    """What the JIT builds for a real launch: 16-byte aligned pointers, D divisible by 16."""
    from aot import DTYPES, assert_fast_ptx
    from fastddpm.kernels._common import launch_config

    specs, loads, stores = [], [], []
    for dtype in ("float32", "bfloat16"):
        data = "*" + DTYPES[dtype]
        _, block, num_warps = launch_config(torch.empty(8, 3, 32, 32, dtype=getattr(torch, dtype), device="meta"))
        per_tensor = block // (32 * num_warps) * getattr(torch, dtype).itemsize // 16  # 16-byte accesses a thread
        for draw, store, draw_t in ((False, False, False), (True, False, False), (True, True, False),
                                    (True, False, True)):
            specs.append(dict(
                module="fastddpm.kernels.q_sample", kernel="q_sample_kernel", num_warps=num_warps,
                signature={"x0_ptr": data, "noise_ptr": data, "out_ptr": data, "noise_out_ptr": data, "t_ptr": "*i64",
                           "t_out_ptr": "*i64", "table_ptr": "*fp32", "seed_ptr": "*i64", "D": "i32", "T": "i32",
                           "C": "i32", "HW": "i32"},
                constexprs={"DRAW_NOISE": draw, "STORE_NOISE": store, "DRAW_T": draw_t, "CHANNELS_LAST": False,
                            "BLOCK": block},
                divisible=["x0_ptr", "noise_ptr", "out_ptr", "noise_out_ptr", "D"]))
            loads.append((1 if draw else 2) * per_tensor)
            stores.append((2 if store else 1) * per_tensor)
    assert_fast_ptx(specs, loads, stores)


def test_launch_limits_are_clear_errors():
    from fastddpm.kernels._common import launch_config

    with pytest.raises(ValueError, match="batch size 70000 exceeds 65535"):
        launch_config(torch.empty(70000, 3, device="meta"))
    with pytest.raises(ValueError, match="elements per sample"):
        launch_config(torch.empty(1, 2 ** 31, device="meta"))
    grid, block, _ = launch_config(torch.empty(65535, 3, 9, device="meta"))
    assert grid == (1, 65535) and block == 128

"""The fused diffusion loss (kernels/loss.py, Triton's interpreter on CPU) against the float64
reference, and DiffusionLoss (fastddpm/loss.py) on both backends."""
import zlib

import pytest
import torch
from helpers import SHAPES, TOLERANCES, make_layout, use_backend
from torch._dynamo.utils import counters

from fastddpm import NoiseSchedule
from fastddpm import functional as F
from fastddpm import reference as R
from fastddpm.kernels import loss as loss_kernel
from fastddpm.loss import DiffusionLoss, NoiseState

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PREDICTIONS = ["eps", "x0", "v"]
WEIGHTINGS = ["simple", "vlb", "snr", "min_snr", "p2", "table"]
REDUCTIONS = ["mean", "sum", "none"]
SCHEDULE = NoiseSchedule.cosine(1000)
USER_TABLE = 0.5 + torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def weighting_arg(name):
    return USER_TABLE if name == "table" else name


def materialised_noise(x0, t, seed):
    """The float32 noise the kernels draw from `seed` (the same for every dtype and layout)."""
    return F.q_sample(x0.float(), t, None, SCHEDULE, seed=seed, return_noise=True)[1]


def loss_and_grad(loss_fn, pred, *args, reduction="mean", upstream=None, **options):
    """loss_fn(pred, *args) and dL/dpred with grad_output `upstream` (a (B,) vector for "none")."""
    pred = pred.detach().requires_grad_()
    loss = loss_fn(pred, *args, reduction=reduction, **options)
    (loss if upstream is None else loss * upstream).sum().backward()
    return loss.detach(), pred.grad


def upstream_for(reduction, batch, dtype=torch.float32):
    """Plain backward for "mean" (grad_output 1), a scalar 3 for "sum", random weights for "none"."""
    if reduction == "mean":
        return None
    if reduction == "sum":
        return torch.tensor(3.0, dtype=dtype)
    return torch.rand(batch, dtype=dtype) + 0.5


def check_against_reference(pred, x0, noise, t, *, seed=None, reduction="mean", **options):
    """The fused loss (noise given, or regenerated from seed) vs the float64 reference fed
    float64 copies of the same inputs (and of the noise the seed draws)."""
    upstream = upstream_for(reduction, pred.shape[0])
    loss, grad = loss_and_grad(F.diffusion_loss, pred, x0, noise, t, SCHEDULE, seed=seed, reduction=reduction,
                               upstream=upstream, **options)
    exact_noise = (noise if seed is None else materialised_noise(x0, t, seed)).double()
    exact_loss, exact_grad = loss_and_grad(R.diffusion_loss, pred.double(), x0.double(), exact_noise, t, SCHEDULE,
                                           reduction=reduction, upstream=None if upstream is None else upstream.double(),
                                           **options)
    assert loss.dtype == torch.float32 and loss.shape == exact_loss.shape
    # the same input values on both sides: the loss is float32 math whatever the input dtype
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=0)
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    tol = TOLERANCES[pred.dtype]["rtol"]  # rounded once to pred's dtype
    torch.testing.assert_close(grad.double(), exact_grad, rtol=tol, atol=tol * exact_grad.abs().max().item())


def inputs(shape, dtype=torch.float32, layout="contiguous"):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, layout)).encode()))
    pred, x0, noise = (make_layout(torch.randn(shape, generator=g).to(dtype), layout) for _ in range(3))
    t = torch.randint(0, SCHEDULE.num_timesteps, (shape[0],), generator=g)
    return pred, x0, noise, t


# -- values and gradients against the reference ---------------------------------------------


@pytest.mark.parametrize("noise_mode", ["given", "regenerated"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_matches_reference(triton_backend, prediction, weighting, dtype, noise_mode):
    pred, x0, noise, t = inputs((3, 2, 9, 11), dtype)
    seed = torch.tensor([1234]) if noise_mode == "regenerated" else None
    check_against_reference(pred, x0, None if seed is not None else noise, t, seed=seed, prediction=prediction,
                            weighting=weighting_arg(weighting))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_reduction_shape_and_layout(triton_backend, reduction, shape, layout):
    """v target (reads x0 and eps), noise regenerated; x0 keeps its own contiguous layout."""
    pred, x0, _, t = inputs(shape, layout=layout)
    check_against_reference(pred, x0.contiguous(), None, t, seed=torch.tensor([99]), reduction=reduction,
                            prediction="v", weighting="min_snr")


@pytest.mark.parametrize("upstream", ["expanded", "strided", "scalar"])
def test_grad_output_of_any_stride(triton_backend, upstream):
    """The backward reads grad_output where it lies: an expanded one (what `losses.sum()` hands
    back), a strided view, or a scalar, each against the reference's gradient."""
    pred, x0, noise, t = inputs((3, 2, 5, 7))
    weights = torch.rand(6, generator=torch.Generator().manual_seed(5)) + 0.5
    grad_output = {"expanded": weights[4].expand(3), "strided": weights[::2], "scalar": weights[1]}[upstream]
    reduction = "mean" if upstream == "scalar" else "none"
    grads = []
    for fn, cast in ((F.diffusion_loss, torch.float32), (R.diffusion_loss, torch.float64)):
        leaf = pred.detach().to(cast).requires_grad_()
        loss = fn(leaf, x0.to(cast), noise.to(cast), t, SCHEDULE, weighting="min_snr", reduction=reduction)
        torch.autograd.backward(loss, grad_output.to(cast))
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0].double(), grads[1], rtol=1e-5, atol=1e-5 * grads[1].abs().max().item())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_given_noise_in_other_layouts_bfloat16(triton_backend, reduction):
    pred, x0, noise, t = inputs((2, 3, 5, 7), torch.bfloat16, "channels_last")
    check_against_reference(pred, x0.contiguous(), make_layout(noise, "strided"), t, reduction=reduction,
                            prediction="v", weighting="snr")


def test_many_blocks_per_sample_and_batch_one(triton_backend):
    """D = 4920: three programs per sample, a partial last block; batch 1."""
    pred, x0, noise, t = inputs((1, 3, 40, 41))
    for reduction in REDUCTIONS:
        check_against_reference(pred, x0, None, t, seed=torch.tensor([5]), reduction=reduction, weighting="p2")
        check_against_reference(pred, x0, noise, t, reduction=reduction, prediction="x0", weighting="vlb")


def test_one_element_per_sample(triton_backend):
    """D = 1 (which the JIT specializes to a constant)."""
    pred, x0, noise, t = inputs((3, 1))
    for reduction in REDUCTIONS:
        check_against_reference(pred, x0, None, t, seed=torch.tensor([6]), reduction=reduction, prediction="v")


def test_half_prediction_with_float32_data(triton_backend):
    """bf16 autocast: the model output is bfloat16, x0 float32; the gradient is bfloat16."""
    pred, x0, noise, t = inputs((2, 3, 6, 6))
    check_against_reference(pred.bfloat16(), x0, None, t, seed=torch.tensor([8]), prediction="v")


def test_gradients_for_x0_and_noise(triton_backend):
    """target = a eps + c x0: dL/dx0 = -c dL/dpred, dL/dnoise = -a dL/dpred (v: a = sqrt_ab, c = -sqrt_1m_ab)."""
    pred, x0, noise, t = inputs((2, 3, 5, 7))
    upstream = torch.tensor([0.5, 2.0])
    grads = []
    for fn, dtype in ((F.diffusion_loss, torch.float32), (R.diffusion_loss, torch.float64)):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (pred, x0, noise)]
        (fn(*leaves, t, SCHEDULE, prediction="v", weighting="min_snr", reduction="none") * upstream.to(dtype)).sum() \
            .backward()
        grads.append([leaf.grad for leaf in leaves])
    for actual, exact in zip(*grads):
        torch.testing.assert_close(actual.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    x0_leaf = x0.clone().requires_grad_()
    F.diffusion_loss(pred.clone().requires_grad_(), x0_leaf, noise, t, SCHEDULE, prediction="eps").backward()
    assert x0_leaf.grad is None  # the eps target does not read x0


def test_float64_inputs_run_the_reference(triton_backend):
    pred, x0, noise, t = (x.double() if x.is_floating_point() else x for x in inputs((2, 3, 5, 7)))
    seed = torch.tensor([77])
    for given in (noise, None):
        loss = F.diffusion_loss(pred, x0, given, t, SCHEDULE, prediction="v", seed=None if given is not None else seed)
        used = noise if given is not None else materialised_noise(x0, t, seed).double()
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, R.diffusion_loss(pred, x0, used, t, SCHEDULE, prediction="v"),
                                   rtol=1e-12, atol=0)


def test_without_grad_the_loss_is_the_same(triton_backend):
    pred, x0, noise, t = inputs((2, 3, 5, 7))
    with torch.no_grad():
        plain = F.diffusion_loss(pred.requires_grad_(), x0, noise, t, SCHEDULE, weighting="snr")
    assert torch.equal(plain, F.diffusion_loss(pred, x0, noise, t, SCHEDULE, weighting="snr").detach())


# -- the regenerated noise, determinism --------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_regenerated_noise_is_the_noise_q_sample_added(triton_backend, layout):
    """Element for element: with pred = noise + delta, dL/dpred is 2 delta / D exactly where
    the kernel's eps equals the noise q-sample added, and O(1) off anywhere it does not."""
    x0 = make_layout(torch.randn(2, 3, 40, 41), layout)
    t = torch.tensor([3, 700])
    seed = torch.tensor([31337])
    x_t, noise = F.q_sample(x0, t, None, SCHEDULE, seed=seed, return_noise=True)
    assert torch.equal(x_t, F.q_sample(x0, t, noise, SCHEDULE))  # the returned noise is the one added
    pred = (noise + 0.01 * torch.randn_like(noise)).contiguous().requires_grad_()
    delta = pred.detach() - noise  # exact in float32
    F.diffusion_loss(pred, x0, None, t, SCHEDULE, seed=seed, reduction="sum").backward()
    torch.testing.assert_close(pred.grad, 2 * delta / delta[0].numel(), rtol=1e-6, atol=0)
    # and bit for bit the loss fed the materialised noise
    for reduction in REDUCTIONS:
        upstream = upstream_for(reduction, 2)
        regenerated = loss_and_grad(F.diffusion_loss, pred, x0, None, t, SCHEDULE, seed=seed, reduction=reduction,
                                    prediction="v", upstream=upstream)
        given = loss_and_grad(F.diffusion_loss, pred, x0, noise, t, SCHEDULE, reduction=reduction, prediction="v",
                              upstream=upstream)
        assert torch.equal(regenerated[0], given[0]) and torch.equal(regenerated[1], given[1])


def test_same_bits_twice(triton_backend):
    pred, x0, noise, t = inputs((3, 3, 40, 41), torch.bfloat16)
    seed = torch.tensor([11])
    for reduction in REDUCTIONS:
        upstream = upstream_for(reduction, 3)
        first, again = (loss_and_grad(F.diffusion_loss, pred, x0, None, t, SCHEDULE, seed=seed, prediction="v",
                                      weighting="min_snr", reduction=reduction, upstream=upstream) for _ in range(2))
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("prediction", ["v", "eps"])  # eps with a seed saves pred alone
def test_retain_graph_backward_twice_gives_the_same_gradient_twice(triton_backend, prediction, reduction, seeded):
    """The first backward hands its precomputed gradient to autograd; a second one recomputes it."""
    pred, x0, noise, t = inputs((2, 3, 5, 7))
    pred.requires_grad_()
    upstream = upstream_for(reduction, 2)
    loss = F.diffusion_loss(pred, x0, None if seeded else noise, t, SCHEDULE, prediction=prediction,
                            weighting="min_snr", reduction=reduction, seed=torch.tensor([5]) if seeded else None)
    total = loss if upstream is None else (loss * upstream).sum()
    total.backward(retain_graph=True)
    first = pred.grad.clone()
    total.backward()
    torch.testing.assert_close(pred.grad, 2 * first)
    exact_noise = materialised_noise(x0, t, torch.tensor([5])) if seeded else noise
    _, exact = loss_and_grad(R.diffusion_loss, pred.double(), x0.double(), exact_noise.double(), t, SCHEDULE,
                             prediction=prediction, weighting="min_snr", reduction=reduction,
                             upstream=None if upstream is None else upstream.double())
    torch.testing.assert_close(first.double(), exact, rtol=1e-5, atol=1e-7)


# -- the reference and the CPU path -----------------------------------------------------------


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_reference_and_cpu_path_gradcheck_in_float64(reference_backend, weighting):
    schedule = NoiseSchedule.linear(100)
    g = torch.Generator().manual_seed(1)
    pred, x0, noise = (torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([5, 80])
    table = USER_TABLE[:100] if weighting == "table" else weighting
    for prediction in PREDICTIONS:
        for fn in (R.diffusion_loss, F.diffusion_loss):
            for reduction in REDUCTIONS:
                assert torch.autograd.gradcheck(
                    lambda p, x, n: fn(p, x, n, t, schedule, prediction=prediction, weighting=table,
                                       reduction=reduction),
                    (pred.requires_grad_(), x0.requires_grad_(), noise.requires_grad_()))


def test_zero_terminal_snr_weights_are_finite_in_float32():
    schedule = NoiseSchedule.linear(1000, zero_terminal_snr=True)
    infinite = []
    for weighting in WEIGHTINGS[:-1]:
        for prediction in PREDICTIONS:
            if not torch.isfinite(schedule.loss_weight_table(weighting, prediction, 5.0, "cpu")).all():
                infinite.append((weighting, prediction))
    # the eps-space vlb weight betas² / (2 σ² alphas (1 - ab)) is infinite at alphas[T-1] = 0: capped
    assert infinite == [], infinite


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_zero_terminal_snr_loss_is_finite(triton_backend, prediction):
    schedule = NoiseSchedule.linear(1000, zero_terminal_snr=True)
    pred, x0, noise, t = inputs((2, 3, 5, 7))
    t = torch.tensor([0, 999])
    for weighting in ("simple", "vlb", "snr", "min_snr", "p2"):
        loss = F.diffusion_loss(pred.requires_grad_(), x0, None, t, schedule, seed=torch.tensor([3]),
                                prediction=prediction, weighting=weighting, reduction="none")
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all(), weighting
        pred.grad = None


# -- torch.library, torch.compile, the GPU build ------------------------------------------------


def test_opcheck(triton_backend):
    pred, x0, noise, t = inputs((2, 3, 4, 4))
    table, seed = SCHEDULE.kernel_table("cpu"), torch.tensor([7])
    weights = SCHEDULE.loss_weight_table("min_snr", "v", 5.0, "cpu")
    op = torch.ops.fastddpm.diffusion_loss.default
    pred = pred.requires_grad_()
    for args in ((pred, None, noise, t, table, weights, None, "eps", "mean", False, True),
                 (pred, x0, None, t, table, weights, seed, "v", "none", False, True),
                 (pred, x0, None, t, table, weights, None, "x0", "sum", False, True),
                 (pred.detach().contiguous(memory_format=torch.channels_last), x0.contiguous(
                     memory_format=torch.channels_last), None, t, table, weights, seed, "v", "mean", True, False)):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(triton_backend, backend):
    pred, x0, noise, t = inputs((2, 3, 4, 4))
    seed = torch.tensor([21])

    def losses(pred, x0, noise, t, seed):
        regenerated = F.diffusion_loss(pred, x0, None, t, SCHEDULE, prediction="v", weighting="min_snr", seed=seed)
        given = F.diffusion_loss(pred, x0, noise, t, SCHEDULE, weighting="snr", reduction="none")
        return regenerated * 3 + (given * torch.tensor([0.5, 2.0])).sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(losses, fullgraph=True, backend=backend)
    results = []
    for fn in (compiled, losses):
        leaf = pred.clone().requires_grad_()
        loss = fn(leaf, x0, noise, t, seed)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    assert not counters["graph_break"]
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-9)


def test_compiles_for_gpus_with_vector_accesses():
    """What the JIT builds for a real launch: 16-byte aligned pointers, D divisible by 16."""
    from aot import DTYPES, assert_fast_ptx
    from fastddpm.kernels._common import launch_config

    specs, loads, stores = [], [], []
    for dtype in ("float32", "bfloat16"):
        data = "*" + DTYPES[dtype]
        like = torch.empty(8, 3, 32, 32, dtype=getattr(torch, dtype), device="meta")
        _, block, num_warps = loss_kernel.loss_launch_config(like)
        per_tensor = block // (32 * num_warps) * getattr(torch, dtype).itemsize // 16  # 16-byte accesses a thread
        for prediction, draw in (("eps", True), ("eps", False), ("v", True), ("x0", False)):
            use_eps, use_x0 = loss_kernel.TARGET_TERMS[prediction]
            specs.append(dict(
                module="fastddpm.kernels.loss", kernel="diffusion_loss_kernel", num_warps=num_warps,
                signature={"pred_ptr": data, "x0_ptr": data, "noise_ptr": data, "grad_ptr": data,
                           "partial_ptr": "*fp32", "counter_ptr": "*i32", "loss_ptr": "*fp32", "t_ptr": "*i64",
                           "table_ptr": "*fp32", "weight_ptr": "*fp32", "seed_ptr": "*i64", "D": "i32", "T": "i32",
                           "C": "i32", "HW": "i32"},
                constexprs={"USE_EPS": use_eps, "USE_X0": use_x0, "DRAW_NOISE": draw, "STORE_GRAD": True,
                            "REDUCTION": 1, "CHANNELS_LAST": False, "BLOCK": block},
                divisible=["pred_ptr", "x0_ptr", "noise_ptr", "grad_ptr", "D"]))
            loads.append((1 + use_x0 + (use_eps and not draw)) * per_tensor)  # pred, x0, given noise
            stores.append(per_tensor)  # grad
        _, block, num_warps = launch_config(like)
        specs.append(dict(
            module="fastddpm.kernels.loss", kernel="scale_grad_kernel", num_warps=num_warps,
            signature={"grad_ptr": data, "grad_output_ptr": "*fp32", "grad_output_stride": "i32", "D": "i32"},
            constexprs={"BLOCK": block}, divisible=["grad_ptr", "D"]))
        loads.append(block // (32 * num_warps) * like.dtype.itemsize // 16)
        stores.append(block // (32 * num_warps) * like.dtype.itemsize // 16)
    assert_fast_ptx(specs, loads, stores)


# -- bad input to the new arguments -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("call, error, match", [
    (lambda x: F.diffusion_loss(x, x, None, torch.tensor([1, 2]), SCHEDULE, seed=torch.tensor([1.5])), TypeError,
     "seed must be a 1-element int64 tensor"),
    (lambda x: F.diffusion_loss(x, x, None, torch.tensor([1, 2]), SCHEDULE, seed=7), TypeError, "seed must be"),
    (lambda x: F.diffusion_loss(x, x, None, torch.tensor([1, 2]), SCHEDULE, seed=torch.tensor([1], device="meta")),
     ValueError, "seed is on meta"),
    (lambda x: F.diffusion_loss(x, x, x, torch.tensor([1, 2]), SCHEDULE, seed=torch.tensor([1])), ValueError,
     "either noise or seed"),
    (lambda x: F.diffusion_loss(x, x, None, torch.tensor([1, 2]), SCHEDULE), ValueError, "noise is None"),
])
def test_bad_seed(backend, call, error, match):
    with use_backend(backend):
        with pytest.raises(error, match=match):
            call(torch.randn(2, 3, 4))


def test_seed_on_the_reference_backend_says_so(reference_backend):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="needs the triton backend"):
        F.diffusion_loss(x, x, None, torch.tensor([1, 2]), SCHEDULE, seed=torch.tensor([1]))


# -- DiffusionLoss ----------------------------------------------------------------------------------


class TinyModel(torch.nn.Module):
    """A 3x3 conv and a timestep embedding: enough to train and to compile."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.embed = torch.nn.Embedding(1000, channels)

    def forward(self, x_t, t, scale=1.0):
        return self.conv(x_t) * scale + self.embed(t)[:, :, None, None]


@pytest.fixture(params=["triton", "reference"])
def any_backend(request):
    with use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_diffusion_loss_is_the_loss_of_its_noise(any_backend, prediction):
    """The model sees q_sample(x0, t, noise) and the loss is the reference's for that noise."""
    torch.manual_seed(0)
    model, x0 = TinyModel(), torch.randn(3, 3, 6, 5)
    loss_fn = DiffusionLoss(SCHEDULE, prediction=prediction, weighting="min_snr", reduction="none")
    x_t, t, state = loss_fn.noise(x0)
    assert t.dtype == torch.int64 and t.shape == (3,) and isinstance(state, NoiseState)
    noise = state.noise if any_backend == "reference" else materialised_noise(x0, t, state.seed)
    assert (state.seed is None) == (any_backend == "reference")
    torch.testing.assert_close(x_t, F.q_sample(x0, t, noise, SCHEDULE), rtol=1e-6, atol=1e-6)
    pred = model(x_t, t)
    loss = loss_fn.loss(pred, x0, state)
    exact = R.diffusion_loss(pred.double(), x0.double(), noise.double(), t, SCHEDULE, prediction=prediction,
                             weighting="min_snr", reduction="none")
    assert loss.shape == (3,)
    torch.testing.assert_close(loss.double(), exact, rtol=2e-5, atol=0)


def test_one_call_is_the_two_step_form(any_backend):
    model, x0 = TinyModel(), torch.randn(2, 3, 6, 6)
    loss_fn = DiffusionLoss(SCHEDULE, prediction="v")
    torch.manual_seed(5)
    one_call = loss_fn(model, x0, scale=0.5)
    torch.manual_seed(5)
    x_t, t, state = loss_fn.noise(x0)
    two_steps = loss_fn.loss(model(x_t, t, scale=0.5), x0, state)
    assert torch.equal(one_call, two_steps)
    torch.manual_seed(5)
    assert not torch.equal(loss_fn(model, x0), one_call)  # model_kwargs reached the model


def test_generator_makes_the_call_reproducible(any_backend):
    model, x0 = TinyModel(), torch.randn(2, 3, 6, 6)
    loss_fn = DiffusionLoss(SCHEDULE)
    state = torch.get_rng_state()
    first = loss_fn(model, x0, generator=torch.Generator().manual_seed(3))
    again = loss_fn(model, x0, generator=torch.Generator().manual_seed(3))
    other = loss_fn(model, x0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)


def test_diffusion_loss_trains_and_keeps_its_options(any_backend):
    torch.manual_seed(0)
    model, x0 = TinyModel(), torch.randn(2, 3, 6, 6)
    loss_fn = DiffusionLoss(SCHEDULE, prediction="x0", weighting=USER_TABLE, gamma=3, reduction="sum")
    assert loss_fn.schedule is SCHEDULE and "prediction='x0'" in repr(loss_fn)
    loss = loss_fn(model, x0)
    loss.backward()
    assert loss.shape == () and all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="tracing backward() needs torch._dynamo.config.trace_autograd_ops")
def test_compiled_training_step_has_one_graph_and_never_recompiles(any_backend):
    """model + DiffusionLoss + backward + SGD under fullgraph=True, the same graph every step;
    aot_eager draws the same random numbers as eager, so the losses match."""
    loss_fn = DiffusionLoss(SCHEDULE, prediction="v", weighting="min_snr")
    x0 = torch.randn(2, 3, 6, 6)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = TinyModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(x0):
            loss = loss_fn(model, x0)
            loss.backward()
            return loss.detach()

        torch._dynamo.reset()
        counters.clear()
        run = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        losses = []
        with torch._dynamo.config.patch(trace_autograd_ops=True, error_on_recompile=True):
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                losses.append(run(x0))
                optimizer.step()
        if compiled:
            assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
        results.append(torch.stack(losses))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("call, error, match", [
    (lambda: DiffusionLoss("linear"), TypeError, "schedule must be"),
    (lambda: DiffusionLoss(SCHEDULE, prediction="mu"), ValueError, "prediction must be one of"),
    (lambda: DiffusionLoss(SCHEDULE, weighting="karras"), ValueError, "weighting must be one of"),
    (lambda: DiffusionLoss(SCHEDULE, weighting=torch.ones(10)), ValueError, "weighting tensor must have length T=1000"),
    (lambda: DiffusionLoss(SCHEDULE, gamma=0), ValueError, "gamma must be a number > 0"),
    (lambda: DiffusionLoss(SCHEDULE, gamma="5"), ValueError, "gamma must be a number > 0"),
    (lambda: DiffusionLoss(SCHEDULE, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: DiffusionLoss(SCHEDULE)("model", torch.randn(2, 3, 4, 4)), TypeError, "model must be callable"),
    (lambda: DiffusionLoss(SCHEDULE)(TinyModel(), [1.0, 2.0]), TypeError, "x0 must be a torch.Tensor"),
    (lambda: DiffusionLoss(SCHEDULE)(TinyModel(), torch.randn(2, 3, 4, 4), generator=1), TypeError,
     "generator must be"),
    (lambda: DiffusionLoss(SCHEDULE).loss(torch.randn(2, 3), torch.randn(2, 3), (torch.tensor([1, 2]), None, None)),
     TypeError, "state must be the NoiseState"),
])
def test_diffusion_loss_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_launch_stopped_by_a_bad_t_leaves_the_next_loss_right(triton_backend):
    """The finishing program's arrival counter is zeroed again when a launch raises midway (here
    the device assert of an out-of-range t in the second sample, after the first counted in)."""
    pred, x0, noise, t = inputs((2, 3, 5, 7))
    for _ in range(64):  # every slot of the ring of counters
        with pytest.raises(Exception, match="t must lie in"):
            F.diffusion_loss(pred, x0, noise, torch.tensor([3, 1000]), SCHEDULE)
    exact = R.diffusion_loss(pred.double(), x0.double(), noise.double(), t, SCHEDULE)
    for _ in range(64):
        torch.testing.assert_close(F.diffusion_loss(pred, x0, noise, t, SCHEDULE).double(), exact, rtol=2e-5, atol=0)

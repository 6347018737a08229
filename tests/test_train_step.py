import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error, use_backend
from helpers import SYNC_OPS, recorded_calls
from torch._dynamo.utils import counters

from fastddpm.schedule import NoiseSchedule
from fastddpm.train_step import TrainStep
from fastddpm.unet import UNet


class StandInLoss:
    """DiffusionLoss's call contract: draws t and noise, calls model(x_t, t, **kw), eps-MSE."""

    def __init__(self, schedule):
        self.sqrt_ab = schedule.sqrt_alphas_cumprod.float()
        self.sqrt_1m_ab = schedule.sqrt_one_minus_alphas_cumprod.float()

    def __call__(self, model, x0, **model_kwargs):
        t = torch.randint(0, self.sqrt_ab.numel(), (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.sqrt_ab[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_ab[t].view(-1, 1, 1, 1) * noise
        return F.mse_loss(model(x_t, t, **model_kwargs), noise)


@pytest.fixture
def loss_fn():
    return StandInLoss(NoiseSchedule.linear(1000))


def tiny_model(**overrides):
    torch.manual_seed(0)
    model = UNet.from_preset("tiny", in_channels=1, **overrides)
    with torch.no_grad():
        for p in model.parameters():  # non-zero output convs, so every weight gets a gradient
            p.normal_(0.0, 0.05)
    return model


def digits_batch(batch=2):
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def total_grad_norm(params):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


def test_step_returns_detached_loss_and_updates_weights(loss_fn):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    loss = TrainStep(model, loss_fn).step(digits_batch())
    assert loss.shape == () and not loss.requires_grad and torch.isfinite(loss)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(changed)


def test_default_optimizer_is_fused_adamw_on_cpu(loss_fn):
    step = TrainStep(tiny_model(), loss_fn, lr=3e-4)
    assert isinstance(step.optimizer, torch.optim.AdamW)
    group = step.optimizer.param_groups[0]
    assert group["fused"] and not group["foreach"] and group["lr"] == 3e-4 and group["weight_decay"] == 0


def test_model_is_put_in_channels_last(loss_fn):
    model = tiny_model()
    TrainStep(model, loss_fn)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_ema_is_a_lerp_toward_the_new_weights(loss_fn):
    model = tiny_model()
    initial = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, loss_fn, ema_decay=0.75)
    step.step(digits_batch())
    for name, start, new in zip(step.ema_state_dict(), initial, model.parameters()):
        torch.testing.assert_close(step.ema_state_dict()[name], 0.75 * start + 0.25 * new.detach(), msg=name)
    assert not any(p.requires_grad for p in step.ema_model.parameters())


def test_no_ema_when_decay_is_none(loss_fn):
    assert TrainStep(tiny_model(), loss_fn, ema_decay=None).ema_model is None


@pytest.mark.parametrize("grad_clip", [1e-3, None])
def test_gradients_are_clipped_to_the_global_norm(loss_fn, grad_clip):
    model = tiny_model()
    TrainStep(model, loss_fn, grad_clip=grad_clip).step(digits_batch())
    norm = total_grad_norm(list(model.parameters()))
    if grad_clip is None:
        assert norm > 1e-2  # so the clipped case below tests something
    else:
        assert norm == pytest.approx(grad_clip, rel=1e-3)


def test_linear_warmup_of_the_learning_rate(loss_fn):
    step = TrainStep(tiny_model(), loss_fn, lr=1e-3, warmup_steps=4)
    lrs = []
    for _ in range(5):
        step.step(digits_batch())
        lrs.append(step.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_model_kwargs_reach_the_model(loss_fn):
    model = tiny_model(num_classes=10)
    TrainStep(model, loss_fn).step(digits_batch(), y=torch.tensor([3, 3]))
    rows_with_grad = (model.class_embed.weight.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert rows_with_grad == [3]


def test_training_lowers_the_loss_on_a_fixed_batch(loss_fn):
    model = tiny_model()
    x0 = digits_batch(4)
    step = TrainStep(model, loss_fn, lr=2e-3, ema_decay=None)
    probe = torch.Generator().manual_seed(2)
    t = torch.randint(0, 1000, (64,), generator=probe)
    noise = torch.randn(64, 1, 8, 8, generator=probe)
    x0_repeated = x0.repeat(16, 1, 1, 1)
    x_t = loss_fn.sqrt_ab[t].view(-1, 1, 1, 1) * x0_repeated + loss_fn.sqrt_1m_ab[t].view(-1, 1, 1, 1) * noise

    def probe_loss():
        with torch.no_grad():
            return F.mse_loss(model(x_t, t), noise).item()

    before = probe_loss()
    for _ in range(40):
        step.step(x0)
    assert probe_loss() < 0.7 * before


def test_compiled_step_matches_eager(loss_fn):
    # aot_eager runs the traced graph op by op: same RNG stream, so the same losses.
    results = []
    for compile_option in (False, {"backend": "aot_eager"}):
        torch._dynamo.reset()
        model = tiny_model()
        step = TrainStep(model, loss_fn, compile=compile_option)
        torch.manual_seed(3)
        losses = torch.stack([step.step(digits_batch()) for _ in range(2)])
        results.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = results
    torch.testing.assert_close(compiled_losses, eager_losses)
    assert relative_error(compiled_params, eager_params) < 1e-5


@pytest.mark.compile
def test_inductor_step_has_one_graph_and_never_recompiles(loss_fn):
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    step = TrainStep(model, loss_fn, compile=True)  # fullgraph=True: a graph break raises
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses = torch.stack([step.step(digits_batch()) for _ in range(3)])
    assert torch.isfinite(losses).all()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="tracing backward() needs torch._dynamo.config.trace_autograd_ops")
def test_forward_loss_backward_clip_and_ema_trace_as_one_graph(loss_fn):
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_backward_clip_ema(x0):
        loss = loss_fn(model, x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.05, foreach=True)
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-2)
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True, error_on_recompile=True):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            loss_backward_clip_ema(digits_batch())
            assert total_grad_norm(params) == pytest.approx(0.05, rel=1e-3)  # unclipped: above 0.1
            optimizer.step()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def real_diffusion_loss():
    return pytest.importorskip("fastddpm.loss").DiffusionLoss(NoiseSchedule.linear(1000), prediction="eps")


def test_with_the_real_diffusion_loss():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, real_diffusion_loss())
    losses = torch.stack([step.step(digits_batch()) for _ in range(2)])
    assert torch.isfinite(losses).all() and (losses > 0).all()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
def test_real_diffusion_loss_compiles_as_one_graph_without_recompiles(backend, request):
    request.getfixturevalue(backend)
    torch._dynamo.reset()
    counters.clear()
    step = TrainStep(tiny_model(), real_diffusion_loss(), compile={"backend": "aot_eager"})
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses = torch.stack([step.step(digits_batch()) for _ in range(3)])
    assert torch.isfinite(losses).all()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_step_is_capturable_no_sync_and_the_same_ops_every_step(backend):
    """What a CUDA graph of the step needs and a CPU can show: no host sync, and from the second
    step on the very same ops and allocations (shapes, dtypes) in the same order."""
    with use_backend(backend):
        step = TrainStep(tiny_model(), real_diffusion_loss(), warmup_steps=3)
        step.step(digits_batch())  # the first step builds the optimizer's state
        signatures = []
        for _ in range(2):
            with recorded_calls() as calls:
                step.step(digits_batch())
            signatures.append(calls)
    assert signatures[0] == signatures[1]
    assert not {name for name, _ in signatures[0]} & SYNC_OPS


def test_cuda_graph_needs_a_cuda_model(loss_fn):
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        TrainStep(tiny_model(), loss_fn, cuda_graph=True)

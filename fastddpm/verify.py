"""`fastddpm verify`: every kernel against the float64 reference on this device.

Runs each op on the Triton kernels (CUDA, or the interpreter on CPU) and on the reference
fed float64 copies of the same inputs, over a grid of shapes and dtypes, and prints a table
(op, dtype, shape, max abs error, relative error, tolerance, ok).
"""
import torch

from . import functional as F
from . import reference as R
from .backend import get_backend, set_backend
from .schedule import NoiseSchedule
from .testing import plausible_output, variance_half

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# relative-error bound ‖out − ref‖ / ‖ref‖ of one float32 computation rounded once to the dtype
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def with_grad(kernel_loss, reference_loss, output):
    """(per-sample loss and its gradient w.r.t. `output`, the same from the reference on a float64
    copy of `output`), each flattened into one vector."""
    value = kernel_loss(output)
    grad, = torch.autograd.grad(value.sum(), output)
    output64 = output.detach().double().requires_grad_()
    expected = reference_loss(output64)
    expected_grad, = torch.autograd.grad(expected.sum(), output64)
    return torch.cat([value.flatten(), grad.flatten().float()]), torch.cat([expected.flatten(), expected_grad.flatten()])


def _cases(schedule):
    """(op name, function(shape, dtype) -> (kernel result, float64 reference), dtypes) for every kernel."""
    T = schedule.num_timesteps

    def randn(shape, dtype):
        return torch.randn(shape, dtype=torch.float64).to(dtype)

    def q_sample(shape, dtype):
        x0, noise, t = randn(shape, dtype), randn(shape, dtype), torch.randint(0, T, (shape[0],))
        return F.q_sample(x0, t, noise, schedule), R.q_sample(x0.double(), t, noise.double(), schedule)

    def q_sample_drawn(shape, dtype):
        x0, t = randn(shape, dtype), torch.randint(0, T, (shape[0],))
        x_t, noise = F.q_sample(x0, t, None, schedule, return_noise=True)
        return x_t, R.q_sample(x0.double(), t, noise.double(), schedule)

    def posterior(shape, dtype):
        x0, x_t, t = randn(shape, dtype), randn(shape, dtype), torch.randint(0, T, (shape[0],))
        return F.q_posterior(x0, x_t, t, schedule)[0], R.q_posterior(x0.double(), x_t.double(), t, schedule)[0]

    def p_sample(prediction, variance, clip):
        def run(shape, dtype):
            out = randn(shape, dtype)
            if variance == "learned_range":
                out = torch.cat([out, variance_half(shape, dtype=torch.float64).to(dtype)], dim=1)
            x_t, noise, t = randn(shape, dtype), randn(shape, dtype), torch.randint(0, T, (shape[0],))
            options = dict(prediction=prediction, variance=variance, clip_denoised=clip)
            return (F.p_sample_step(out, x_t, t, schedule, noise=noise, **options),
                    R.p_sample_step(out.double(), x_t.double(), t, schedule, noise=noise.double(), **options))
        return run

    def ddim(prediction, eta):
        def run(shape, dtype):
            out, x_t, noise = randn(shape, dtype), randn(shape, dtype), randn(shape, dtype)
            t = torch.randint(0, T, (shape[0],))
            t_prev = t - torch.randint(1, 50, (shape[0],)).clamp(max=t + 1)
            options = dict(eta=eta, prediction=prediction)
            return (F.ddim_step(out, x_t, t, t_prev, schedule, noise=noise, **options),
                    R.ddim_step(out.double(), x_t.double(), t, t_prev, schedule, noise=noise.double(), **options))
        return run

    def loss(prediction, weighting):
        def run(shape, dtype):
            x0, noise = randn(shape, dtype), randn(shape, dtype)
            pred = randn(shape, dtype).requires_grad_()
            t = torch.randint(0, T, (shape[0],))
            options = dict(prediction=prediction, weighting=weighting, reduction="none")
            return with_grad(lambda p: F.diffusion_loss(p, x0, noise, t, schedule, **options),
                             lambda p: R.diffusion_loss(p, x0.double(), noise.double(), t, schedule, **options), pred)
        return run

    def hybrid(prediction, loss_type):
        def run(shape, dtype):
            x0, noise = randn(shape, dtype).clamp(-1, 1), randn(shape, dtype)
            t = torch.randint(0, T, (shape[0],))
            t[0] = 0
            out = plausible_output(x0.double(), noise.double(), t, schedule, prediction=prediction,
                                   variance="learned_range")  # keeps the bound's terms well conditioned
            out = out.to(dtype).requires_grad_()
            options = dict(prediction=prediction, loss=loss_type, reduction="none")
            return with_grad(lambda o: F.hybrid_loss(o, x0, noise, t, schedule, **options),
                             lambda o: R.hybrid_loss(o, x0.double(), noise.double(), t, schedule, **options), out)
        return run

    def vb(prediction, variance):
        def run(shape, dtype):
            x0, noise = randn(shape, dtype).clamp(-1, 1), torch.randn(shape, dtype=torch.float64)
            t = torch.randint(0, T, (shape[0],))
            t[0] = 0  # the decoder term
            out = plausible_output(x0.double(), noise, t, schedule, prediction=prediction, variance=variance).to(dtype)
            x_t = R.q_sample(x0.double(), t, noise, schedule).to(dtype)
            options = dict(prediction=prediction, variance=variance)
            return (F.vb_terms_bpd(out, x0, x_t, t, schedule, **options),
                    R.vb_terms_bpd(out.double(), x0.double(), x_t.double(), t, schedule, **options))
        return run

    cases = [("q_sample", q_sample), ("q_sample drawn noise", q_sample_drawn), ("q_posterior mean", posterior)]
    for prediction in ("eps", "x0", "v"):
        for variance in ("fixed_small", "fixed_large", "learned_range"):
            cases.append((f"p_sample_step {prediction} {variance}", p_sample(prediction, variance, False)))
        cases.append((f"p_sample_step {prediction} clipped", p_sample(prediction, "fixed_small", True)))
        cases.append((f"ddim_step {prediction} eta=0", ddim(prediction, 0.0)))
        cases.append((f"ddim_step {prediction} eta=1", ddim(prediction, 1.0)))
        for weighting in ("simple", "min_snr", "vlb"):
            cases.append((f"diffusion_loss+grad {prediction} {weighting}", loss(prediction, weighting)))
        for variance in ("fixed_small", "learned_range"):
            cases.append((f"vb_terms_bpd {prediction} {variance}", vb(prediction, variance)))
        for loss_type in ("hybrid", "kl"):
            # float32 only: the kernel rebuilds x_t rounded to the data's dtype (the x_t the model
            # saw), which a float64 reference of x0 and noise does not; tests/test_vlb.py covers half types
            cases.append((f"hybrid_loss+grad {prediction} {loss_type}", hybrid(prediction, loss_type),
                          (torch.float32,)))
    return [case if len(case) == 3 else case + (DTYPES,) for case in cases]


def verify(device=None, shapes=((2, 3, 8, 8), (3, 2, 5, 7), (1, 4, 16, 16)), dtypes=DTYPES, seed=0, print_fn=print):
    """Run every case; print the table; return True if every result is within tolerance."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    schedule = NoiseSchedule.linear(1000)
    previous = get_backend()
    set_backend("triton")
    rows, ok_all = [], True
    try:
        with torch.device(device):
            for name, run, case_dtypes in _cases(schedule):
                for dtype in (dtype for dtype in dtypes if dtype in case_dtypes):
                    for shape in shapes:
                        actual, expected = run(shape, dtype)
                        error = (actual.double().cpu() - expected.cpu())
                        max_abs = error.abs().max().item()
                        relative = (error.norm() / expected.norm().clamp(min=1e-300)).item()
                        # float16 gradients of tiny losses are subnormal: judge those by absolute error
                        close = relative <= TOLERANCE[dtype] or max_abs <= torch.finfo(dtype).smallest_normal
                        ok = close and bool(torch.isfinite(actual).all())
                        ok_all &= ok
                        rows.append((name, str(dtype).replace("torch.", ""), "x".join(map(str, shape)),
                                     f"{max_abs:.2e}", f"{relative:.2e}", f"{TOLERANCE[dtype]:.0e}",
                                     "ok" if ok else "FAIL"))
    finally:
        set_backend(previous)
    header = ("op", "dtype", "shape", "max abs err", "rel err", "tol", "ok")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print_fn("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    failures = sum(row[-1] != "ok" for row in rows)
    print_fn(f"{device}: {len(rows) - failures} passed, {failures} failed")
    return ok_all

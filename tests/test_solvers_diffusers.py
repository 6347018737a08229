"""The few-step solvers against diffusers' schedulers, step by step: the same tiny model, the same
starting noise and the same per-step noise, every step compared (float32, relative 1e-5)."""
import pytest
import torch
from helpers import use_backend

from fastddpm.functional import solvers as S
from fastddpm import timesteps as TS
from fastddpm import sample

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # diffusers' numpy-2 warnings
              # Triton's interpreter (numpy) warns on log(0) = -inf, the λ of the final σ = 0
              pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")]

T, B = 1000, 2
SHAPE = (B, 3, 4, 5)
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}
TOLERANCE = 1e-5


def tiny_model(seed=0):
    """A fixed random function of (x, t): a channel mix of x scaled by t, plus a term in t alone."""
    mix = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)) * 0.3

    def model(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        return 0.8 * x + torch.einsum("oc,bchw->bohw", mix, x) * torch.cos(t / 300) + 0.1 * torch.sin(t / 100)

    return model


def scheduler(name, prediction, **config):
    """A diffusers scheduler on fastddpm's default linear schedule (Heun's own default betas differ)."""
    cls = getattr(diffusers, name)
    return cls(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
               prediction_type=PREDICTIONS[prediction], **config)


def assert_close(ours, theirs, where):
    error = float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())
    assert error <= TOLERANCE, f"{where}: relative error {error:.2e}"


def per_sample(value, kind=None):
    return torch.as_tensor(value, dtype=kind).reshape(()).expand(B).clone()


# -- DPM-Solver++ and UniPC -------------------------------------------------------------------


def multistep_cases():
    for steps in (10, 25):
        for prediction in PREDICTIONS:
            for spacing in TS.SPACINGS:
                yield steps, prediction, spacing


@pytest.mark.parametrize("solver", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("order,solver_type", [(2, "midpoint"), (2, "heun"), (3, "midpoint")])
@pytest.mark.parametrize("steps,prediction,spacing", list(multistep_cases()))
def test_dpm_solver_matches_diffusers(schedule, solver, order, solver_type, steps, prediction, spacing):
    """Every step of DPMSolverMultistepScheduler, given the same variance_noise; for 3M SDE, diffusers'
    D2 coefficient is α_t ((φ - H)/H² - ½) where the derivation and k-diffusion's sample_dpmpp_3m_sde
    have + ½, so there each step starts from diffusers' state and differs by exactly α_t D2."""
    model, x = tiny_model(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    theirs = scheduler("DPMSolverMultistepScheduler", prediction, solver_order=order, algorithm_type=solver,
                       solver_type=solver_type, timestep_spacing=spacing)
    theirs.set_timesteps(steps)
    plan = TS.multistep_schedule(schedule, steps, spacing=spacing)
    orders = TS.dpm_solver_orders(steps, order)
    assert torch.equal(plan.timesteps, theirs.timesteps)
    noises = torch.randn((steps, *SHAPE), generator=torch.Generator().manual_seed(2))
    known_difference = solver == "sde-dpmsolver++" and order == 3
    ours, history = x.clone(), []
    for k, t in enumerate(plan.timesteps):
        t_prev = plan.timesteps[k + 1] if k + 1 < steps else -1
        if known_difference:  # diffusers' state, and its stored x0 predictions (oldest first) as our history
            ours = x.clone()
            stored = [m for m in theirs.model_outputs if m is not None][::-1]
            history = [(m, per_sample(plan.timesteps[k - 1 - i])) for i, m in enumerate(stored[:2])]
        x = theirs.step(model(x, t), t, x, variance_noise=noises[k]).prev_sample
        ours, x0_hat = S.dpm_solver_step(model(ours, per_sample(t)), ours, per_sample(t), per_sample(t_prev), schedule,
                                         history=history, order=orders[k], solver=solver, solver_type=solver_type,
                                         noise=noises[k], prediction=prediction)
        expected = x
        if known_difference and orders[k] == 3:
            expected = x + _diffusers_3m_sde_difference(theirs, k)
        assert_close(ours, expected, f"step {k}")
        if not known_difference:
            history = [(x0_hat, per_sample(t))] + history[:1]


def _diffusers_3m_sde_difference(theirs, k):
    """α_t D2 of diffusers' step k (our minus its D2 coefficient), from its stored x0 predictions."""
    sigmas = theirs.sigmas[k - 2:k + 2].double()
    lam = -sigmas.log()
    h, h0, h1 = lam[3] - lam[2], lam[2] - lam[1], lam[1] - lam[0]
    r0, r1 = h0 / h, h1 / h
    m2, m1, m0 = (m.double() for m in theirs.model_outputs)
    d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
    return (1 + sigmas[3] ** 2).rsqrt() * d2


@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("steps,prediction,spacing", list(multistep_cases()))
def test_unipc_matches_diffusers(schedule, steps, prediction, spacing, lower_order_final):
    model, x = tiny_model(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    theirs = scheduler("UniPCMultistepScheduler", prediction, timestep_spacing=spacing,
                       lower_order_final=lower_order_final)
    theirs.set_timesteps(steps)
    plan = TS.multistep_schedule(schedule, steps, spacing=spacing, scheduler="unipc")
    predictor, corrector = TS.unipc_orders(steps, 2, lower_order_final=lower_order_final)
    if not lower_order_final:
        predictor[-1] = 1  # diffusers' second order into σ = 0 divides by zero; ours is first order there
    ours, history = x.clone(), []
    for k, t in enumerate(plan.timesteps):
        t_prev = plan.timesteps[k + 1] if k + 1 < steps else -1
        x = theirs.step(model(x, t), t, x).prev_sample
        ours, x0_hat = S.unipc_step(model(ours, per_sample(t)), ours, per_sample(t), per_sample(t_prev), schedule,
                                    history=history, order=predictor[k], corrector_order=corrector[k],
                                    prediction=prediction)
        if lower_order_final or k < steps - 1:
            assert_close(ours, x, f"step {k}")
        history = [(x0_hat, per_sample(t))] + history[:1]


# -- Euler, Euler ancestral, Heun -----------------------------------------------------------------


EULER = {"euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
         "heun": "HeunDiscreteScheduler"}


def euler_cases():
    for method in EULER:
        for steps, prediction, spacing in multistep_cases():
            yield method, steps, prediction, spacing, False
        if method != "euler-a":  # EulerAncestralDiscreteScheduler has no Karras sigmas
            yield method, 10, "eps", "linspace", True
            yield method, 25, "v", "leading", True


@pytest.mark.parametrize("method,steps,prediction,spacing,karras", list(euler_cases()))
def test_euler_family_matches_diffusers(schedule, method, steps, prediction, spacing, karras):
    """diffusers' sample y is our x_t sqrt(1 + σ²). With Karras sigmas our steps run on diffusers' own
    sigmas (time="sigma"): its float32 table puts σ_min 8e-5 off, which test_timesteps allows for."""
    model, x_T = tiny_model(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    kwargs = {} if method == "euler-a" else {"use_karras_sigmas": karras}
    theirs = scheduler(EULER[method], prediction, timestep_spacing=spacing, **kwargs)
    theirs.set_timesteps(steps)
    plan = TS.euler_schedule(schedule, steps, spacing=spacing, karras=karras)
    # Heun's lists repeat each time but the first and last: [t0, t1, t1, t2, t2, …], sigmas ending in 0
    sigmas = torch.cat([theirs.sigmas[:-1:2], theirs.sigmas[-1:]]) if method == "heun" else theirs.sigmas
    if karras:
        times, time = sigmas.double(), "sigma"
    else:
        times, time = torch.cat([plan.timesteps.double(), torch.tensor([-1.0])]), "timestep"
        assert torch.equal(plan.timesteps, theirs.timesteps[::2] if method == "heun" else theirs.timesteps)
    model_t = theirs.timesteps[::2] if method == "heun" else theirs.timesteps
    generator, ours_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    y, ours = x_T * (1 + sigmas[0] ** 2).sqrt(), x_T.clone()
    for k in range(steps):
        t, t_prev = per_sample(times[k]), per_sample(times[k + 1])
        if method == "heun":
            for stage in range(1 if k == steps - 1 else 2):
                at = theirs.timesteps[2 * k + stage]
                y = theirs.step(model(theirs.scale_model_input(y, at), at), at, y).prev_sample
            mid, x0_first = S.heun_step(model(ours, per_sample(model_t[k])), ours, t, t_prev, schedule,
                                        prediction=prediction, time=time)
            ours = mid if k == steps - 1 else S.heun_step(
                model(mid, per_sample(model_t[k + 1])), mid, t, t_prev, schedule, x0_hat_first=x0_first,
                prediction=prediction, time=time)[0]
        else:
            at = theirs.timesteps[k]
            y = theirs.step(model(theirs.scale_model_input(y, at), at), at, y, generator=generator).prev_sample
            out = model(ours, per_sample(model_t[k]))
            if method == "euler":
                ours, _ = S.euler_step(out, ours, t, t_prev, schedule, prediction=prediction, time=time)
            else:
                noise = torch.randn(SHAPE, generator=ours_generator)  # what diffusers' randn_tensor draws
                ours, _ = S.euler_ancestral_step(out, ours, t, t_prev, schedule, noise=noise, prediction=prediction,
                                                 time=time)
        assert_close(ours, y / (1 + sigmas[k + 1].double() ** 2).sqrt(), f"step {k}")


# -- the sampling loop, and the kernels, against diffusers --------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("method", ["dpm++2m", "dpm++3m", "dpm++2m-sde", "euler", "euler-a", "heun", "unipc"])
def test_sample_solver_matches_diffusers(schedule, method, backend):
    """sample_solver's result equals a diffusers loop of 10 steps (linspace, eps), fed the same noise."""
    steps, model = 10, tiny_model()
    noise = torch.randn((steps, *SHAPE), generator=torch.Generator().manual_seed(4))
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    name = {**EULER, "unipc": "UniPCMultistepScheduler"}.get(method, "DPMSolverMultistepScheduler")
    config = {}
    if name == "DPMSolverMultistepScheduler":
        config = dict(solver_order=int(method[5]),
                      algorithm_type="sde-dpmsolver++" if "sde" in method else "dpmsolver++")
    theirs = scheduler(name, "eps", **config)
    theirs.set_timesteps(steps)
    y = x_T * theirs.init_noise_sigma
    generator = torch.Generator().manual_seed(5)  # EulerAncestralDiscreteScheduler draws randn(generator)
    for k, t in enumerate(theirs.timesteps):
        out = model(theirs.scale_model_input(y, t), t)
        extra = {"variance_noise": noise[k]} if "sde" in method else {}
        extra = {"generator": generator} if method == "euler-a" else extra
        y = theirs.step(out, t, y, **extra).prev_sample
    # the Euler family's diffusers sample is y = x_t sqrt(1 + σ²)
    start = x_T * theirs.init_noise_sigma / (1 + theirs.sigmas.max() ** 2).sqrt() if name in EULER.values() else x_T
    ours_generator = torch.Generator().manual_seed(5)

    def noise_fn(k, x):
        return torch.randn(SHAPE, generator=ours_generator) if method == "euler-a" else noise[k]

    with use_backend(backend):
        ours = sample(model, SHAPE, schedule, method=method, steps=steps, x_T=start.contiguous(), noise_fn=noise_fn,
                             progress=False)
    assert_close(ours, y, method)

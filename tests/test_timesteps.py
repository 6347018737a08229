"""fastddpm.timesteps against diffusers' set_timesteps: every scheduler, spacing, steps_offset, Karras and
uniform-logSNR sigmas, final_sigmas_type, and the per-step orders of the multistep schedulers."""
import pytest
import torch

from fastddpm import NoiseSchedule
from fastddpm import timesteps as TS

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy-2 warnings

T = 1000
STEPS = [1, 7, 10, 25, 50]
OFFSETS = [0, 1]


def scheduler(name, **config):
    cls = getattr(diffusers, name)
    return cls(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", **config)


def assert_sigmas(ours, theirs, rtol=2e-6):
    """diffusers' sigmas come from float32 alphas_cumprod: 1 - ab loses about 6e-8 absolute, so σ² = (1 - ab)/ab
    is off by about 6e-8/σ² relative near t = 0 (σ_0 = 0.01: 8e-5). Ours are float64."""
    theirs = theirs.double()
    allowed = (rtol + 1e-7 / theirs.clamp(min=1e-30) ** 2) * theirs
    assert ours.dtype == torch.float64 and ours.shape == theirs.shape
    assert bool(((ours - theirs).abs() <= allowed).all()), (ours - theirs).abs().max()


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("spacing", TS.SPACINGS)
@pytest.mark.parametrize("steps", STEPS + [333, 1000])
def test_discrete_timesteps_match_ddpm_and_ddim(name, spacing, steps):
    for offset in OFFSETS if steps < T else [0]:
        theirs = scheduler(name, timestep_spacing=spacing, steps_offset=offset)
        theirs.set_timesteps(steps)
        ours = TS.discrete_timesteps(T, steps, spacing, offset)
        assert ours.dtype == torch.int64 and torch.equal(ours, theirs.timesteps)
        if name == "DDPMScheduler":
            expected = torch.stack([torch.as_tensor(theirs.previous_timestep(t)) for t in theirs.timesteps])
            assert torch.equal(TS.ddpm_prev_timesteps(ours), expected)
        else:
            prev = theirs.timesteps - T // steps  # DDIMScheduler.step's prev_timestep, past 0 meaning ab_prev = 1
            assert torch.equal(TS.ddim_prev_timesteps(ours, T, steps), torch.where(prev >= 0, prev, -1))
            assert torch.equal(TS.ddim_prev_timesteps(ours, T, steps, set_alpha_to_one=False),
                               torch.where(prev >= 0, prev, 0))


def multistep_options():
    for karras, lu in ((False, False), (True, False), (False, True)):
        for final in TS.FINAL_SIGMAS:
            for name in ("dpmsolver", "unipc"):
                if not (lu and name == "unipc"):
                    yield karras, lu, final, name


@pytest.mark.parametrize("karras,lu_lambdas,final,name", list(multistep_options()))
@pytest.mark.parametrize("spacing", TS.SPACINGS)
def test_multistep_schedule_matches_dpm_solver_and_unipc(schedule, karras, lu_lambdas, final, name, spacing):
    for steps in STEPS:
        for offset in OFFSETS:
            config = dict(timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras,
                          final_sigmas_type=final)
            if name == "dpmsolver":
                theirs = scheduler("DPMSolverMultistepScheduler", use_lu_lambdas=lu_lambdas, **config)
            else:
                theirs = scheduler("UniPCMultistepScheduler", **config)
            theirs.set_timesteps(steps)
            ours = TS.multistep_schedule(schedule, steps, spacing=spacing, steps_offset=offset, karras=karras,
                                         lu_lambdas=lu_lambdas, final_sigmas_type=final, scheduler=name)
            assert ours.timesteps.dtype == torch.int64
            if karras or lu_lambdas:  # rounded from σ's fractional timestep: a tie may round either way
                exact = TS.sigma_to_t(ours.sigmas[:-1], TS.solver_sigmas(schedule))
                tie = ((exact - exact.floor()) - 0.5).abs() < 0.01
                assert torch.equal(ours.timesteps[~tie], theirs.timesteps[~tie])
                assert bool(((ours.timesteps - theirs.timesteps).abs() <= 1).all())
            else:
                assert torch.equal(ours.timesteps, theirs.timesteps)
            # Karras and log-uniform sigmas inherit σ_0's float32 error (8e-5) through their end point
            assert_sigmas(ours.sigmas, theirs.sigmas, rtol=1e-4 if karras or lu_lambdas else 2e-6)


@pytest.mark.parametrize("name,karras", [("EulerDiscreteScheduler", False), ("EulerDiscreteScheduler", True),
                                         ("HeunDiscreteScheduler", False), ("HeunDiscreteScheduler", True),
                                         ("EulerAncestralDiscreteScheduler", False)])  # it has no Karras sigmas
@pytest.mark.parametrize("spacing", TS.SPACINGS)
def test_euler_schedule_matches_the_euler_family(schedule, name, karras, spacing):
    finals = TS.FINAL_SIGMAS if name == "EulerDiscreteScheduler" else ("zero",)
    for steps in STEPS:
        for offset in OFFSETS:
            for final in finals:
                config = dict(timestep_spacing=spacing, steps_offset=offset)
                if name != "EulerAncestralDiscreteScheduler":
                    config["use_karras_sigmas"] = karras
                if name == "EulerDiscreteScheduler":
                    config["final_sigmas_type"] = final
                theirs = scheduler(name, **config)
                theirs.set_timesteps(steps)
                timesteps, sigmas = theirs.timesteps, theirs.sigmas
                if name == "HeunDiscreteScheduler":  # [t0, t1, t1, t2, t2, …]: each time but the ends twice
                    timesteps, sigmas = timesteps[::2], torch.cat([sigmas[:-1:2], sigmas[-1:]])
                ours = TS.euler_schedule(schedule, steps, spacing=spacing, steps_offset=offset, karras=karras,
                                         final_sigmas_type=final)
                assert ours.timesteps.dtype == torch.float32
                # Karras timesteps interpolate log σ of the float32 table, and inherit σ_min's error: < 0.01 apart
                torch.testing.assert_close(ours.timesteps, timesteps, rtol=0, atol=1e-2 if karras else 0)
                assert_sigmas(ours.sigmas, sigmas, rtol=1e-4 if karras else 2e-6)


def test_zero_terminal_snr_sigma_is_diffusers_stand_in():
    schedule = NoiseSchedule.linear(T, zero_terminal_snr=True)
    theirs = scheduler("EulerDiscreteScheduler", rescale_betas_zero_snr=True)
    sigmas = TS.solver_sigmas(schedule)
    assert schedule.alphas_cumprod[-1] == 0 and torch.isfinite(sigmas).all()
    torch.testing.assert_close(sigmas[-1], torch.tensor((1 - 2.0 ** -24) / 2.0 ** -24, dtype=torch.float64).sqrt())
    assert_sigmas(sigmas.flip(0), theirs.sigmas[:-1], rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 5, 14, 15, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("final", TS.FINAL_SIGMAS)
def test_dpm_solver_orders_follow_diffusers_step(schedule, steps, order, lower_order_final, final):
    """The order diffusers uses at each step, read from which update function its step() calls."""
    theirs = scheduler("DPMSolverMultistepScheduler", solver_order=order, lower_order_final=lower_order_final,
                       final_sigmas_type=final)
    theirs.set_timesteps(steps)
    used = []
    for level, method in enumerate(("dpm_solver_first_order_update", "multistep_dpm_solver_second_order_update",
                                    "multistep_dpm_solver_third_order_update"), start=1):
        original = getattr(theirs, method)
        setattr(theirs, method, lambda *args, _level=level, _original=original, **kwargs: (
            used.append(_level), _original(*args, **kwargs))[1])
    x = torch.randn(1, 1, 2, 2)
    for t in theirs.timesteps:
        x = theirs.step(0.5 * x, t, x).prev_sample
    assert TS.dpm_solver_orders(steps, order, lower_order_final=lower_order_final, final_sigmas_type=final) == used


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_unipc_orders_follow_diffusers_step(steps, order, lower_order_final):
    theirs = scheduler("UniPCMultistepScheduler", solver_order=order, lower_order_final=lower_order_final)
    theirs.set_timesteps(steps)
    predictor, corrector = [], []
    x = torch.randn(1, 1, 2, 2)
    for t in theirs.timesteps:
        corrector.append(theirs.this_order if theirs.step_index not in (None, 0) else 0)
        x = theirs.step(0.5 * x, t, x).prev_sample
        predictor.append(theirs.this_order)
    assert TS.unipc_orders(steps, order, lower_order_final=lower_order_final) == (predictor, corrector)


@pytest.mark.parametrize("call,match", [
    (lambda s: TS.discrete_timesteps(T, 0), "num_inference_steps"),
    (lambda s: TS.discrete_timesteps(T, T + 1), "at most 1000"),
    (lambda s: TS.discrete_timesteps(T, 10, "uniform"), "spacing"),
    (lambda s: TS.discrete_timesteps(T, 10, "leading", -1), "steps_offset"),
    (lambda s: TS.multistep_schedule(s, 999, spacing="leading", steps_offset=1), "timestep 1000"),
    (lambda s: TS.multistep_schedule(s, 10, final_sigmas_type="min"), "final_sigmas_type"),
    (lambda s: TS.multistep_schedule(s, 10, scheduler="deis"), "scheduler"),
    (lambda s: TS.multistep_schedule(s, 10, karras=True, lu_lambdas=True), "karras and lu_lambdas"),
    (lambda s: TS.multistep_schedule(s, 10, lu_lambdas=True, scheduler="unipc"), "lu_lambdas"),
    (lambda s: TS.euler_schedule("linear", 10), "schedule"),
    (lambda s: TS.dpm_solver_orders(10, 4), "order"),
    (lambda s: TS.unipc_orders(10, 3), "order"),
])
def test_bad_arguments_name_the_argument(schedule, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(schedule)

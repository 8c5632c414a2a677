"""DDIM / DPM-Solver / DPM-Solver++ against diffusers' own schedulers and against each other."""

import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DPMSolverMultistepScheduler

from diffalign.samplers import DDIMScheduler, DPMSolverPlusPlusScheduler, DPMSolverScheduler, sample


def toy_model(x, t):
    """Nonlinear stand-in for a network (output depends on x and t)."""
    return torch.sin(3 * x) * 0.5 + 0.1 * x * (float(t) / 1000)


def run_diffusers_float64(sched, x, steps):
    """diffusers' DPMSolverMultistepScheduler math in float64 (its step() upcasts only to float32)."""
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    n, c = len(sched.timesteps), sched.config
    for t in sched.timesteps:
        if sched.step_index is None:
            sched._init_step_index(t)
        i = sched.step_index
        final = i == n - 1 and ((c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        second = i == n - 2 and c.lower_order_final and n < 15
        m = sched.convert_model_output(toy_model(x, t), sample=x)
        sched.model_outputs = sched.model_outputs[1:] + [m]
        if c.solver_order == 1 or sched.lower_order_nums < 1 or final:
            x = sched.dpm_solver_first_order_update(m, sample=x)
        elif c.solver_order == 2 or sched.lower_order_nums < 2 or second:
            x = sched.multistep_dpm_solver_second_order_update(sched.model_outputs, sample=x)
        else:
            x = sched.multistep_dpm_solver_third_order_update(sched.model_outputs, sample=x)
        sched.lower_order_nums = min(sched.lower_order_nums + 1, c.solver_order)
        sched._step_index += 1
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize(
    "config",
    [
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"},
        {"use_karras_sigmas": True, "discrete_timesteps": True, "lower_order_final": False},
        {"prediction_type": "sample", "final_sigmas_type": "sigma_min"},
    ],
)
def test_dpm_solver_pp_multistep_matches_diffusers_float64(order, solver_type, config):
    ours_cfg = dict(config)
    ours_cfg.pop("discrete_timesteps", None)
    theirs = DPMSolverMultistepScheduler(solver_order=order, solver_type=solver_type, **ours_cfg)
    ours = DPMSolverPlusPlusScheduler(solver_order=order, solver_type=solver_type, **config)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (7, 20):  # third order in its diffusers form (see exponential.py)
        expected = run_diffusers_float64(theirs, x_T, steps)
        got = sample(ours, toy_model, x_T, steps)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert (got - expected).abs().max() < 1e-9  # same math: agreement far below the required 1e-5


def test_dpm_solver_pp_matches_diffusers_step_in_float32():
    theirs, ours = DPMSolverMultistepScheduler(solver_order=3), DPMSolverPlusPlusScheduler(solver_order=3)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    got, expected = sample(ours, toy_model, x_T, 12), sample(theirs, toy_model, x_T, 12)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_from_config_switches_between_diffusers_and_diffalign():
    theirs = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    ours = DPMSolverPlusPlusScheduler.from_config(theirs.config)
    assert ours.config.prediction_type == "v_prediction" and ours.config.beta_schedule == "scaled_linear"
    back = DPMSolverMultistepScheduler.from_config(ours.config)
    assert back.config.solver_order == ours.config.solver_order


def test_trailing_grid_ddim_matches_diffusers_ddim():
    theirs = DiffusersDDIM(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    ours = DDIMScheduler(timestep_spacing="trailing")
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    got, expected = sample(ours, toy_model, x_T, 10), sample(theirs, toy_model, x_T, 10)
    # diffusers' DDIM keeps alphas_cumprod in float32: agreement to float32 precision relative to |x| ~ 500
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


@pytest.mark.parametrize("mode", ["multistep", "singlestep"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_order_one_dpm_solver_and_dpm_solver_pp_equal_ddim(mode, prediction_type):
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ddim = sample(DDIMScheduler(prediction_type=prediction_type), toy_model, x_T, 9)
    for cls in (DPMSolverScheduler, DPMSolverPlusPlusScheduler):
        got = sample(cls(solver_order=1, solver_mode=mode, prediction_type=prediction_type), toy_model, x_T, 9)
        torch.testing.assert_close(got, ddim, rtol=0, atol=1e-10)


def test_singlestep_grid_counts_model_evaluations():
    for order in (2, 3):
        for nfe in (5, 6, 7, 10):
            s = DPMSolverScheduler(solver_order=order, solver_mode="singlestep")
            s.set_timesteps(nfe)
            assert len(s.timesteps) == nfe and len(s.sigmas) == nfe + 1
            assert (s.sigmas[:-1] > s.sigmas[1:]).all()


def test_sde_variant_is_seeded_and_differs_from_ode():
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    sde = DPMSolverPlusPlusScheduler(algorithm_type="sde")
    a = sample(sde, toy_model, x_T, 10, generator=torch.Generator().manual_seed(0))
    b = sample(sde, toy_model, x_T, 10, generator=torch.Generator().manual_seed(0))
    c = sample(DPMSolverPlusPlusScheduler(), toy_model, x_T, 10)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_dynamic_thresholding_keeps_cosine_schedule_bounded():
    def overshooting(x, t):  # a poor eps model: x0 = (x - sigma eps)/alpha explodes where alpha ~ 0
        return 0.9 * x

    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    config = {"beta_schedule": "squaredcos_cap_v2"}
    free = sample(DPMSolverPlusPlusScheduler(**config), overshooting, x_T, 10)
    clipped = sample(DPMSolverPlusPlusScheduler(thresholding=True, **config), overshooting, x_T, 10)
    assert free.abs().max() > 10
    assert clipped.abs().max() <= 1.0 + 1e-6


ZERO_WIDTH_VARIANTS = [
    ("dpm-solver++", {"solver_order": 2}), ("dpm-solver++", {"solver_order": 3}),
    ("dpm-solver++", {"solver_order": 3, "third_order_form": "taylor"}),
    ("dpm-solver++", {"solver_order": 2, "solver_type": "heun"}),
    ("dpm-solver++", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpm-solver++", {"solver_mode": "singlestep", "solver_order": 2}),
    ("dpm-solver++", {"solver_mode": "singlestep", "solver_order": 3}),
    ("dpm-solver", {}), ("dpm-solver", {"solver_mode": "multistep"}),
    ("dualfast:dpm-solver++", {}), ("ddim", {}), ("pndm", {}),
    # predictor-corrector samplers still correct the previous step at the last point; without it, the identity
    ("dpm-solver-v3", {"use_corrector": False}), ("unipc", {"use_corrector": False}),
    ("dc-solver", {"use_corrector": False}),
]


@pytest.mark.parametrize(("name", "options"), ZERO_WIDTH_VARIANTS, ids=lambda v: str(v))
def test_a_repeated_final_sigma_is_a_zero_length_step(name, options):
    """use_lu_lambdas with final_sigmas_type='sigma_min' (diffusers' grid) ends on two equal sigmas: the last step
    is the identity, exactly the solution over a zero-length interval, and everything stays finite."""
    from diffalign.models import digits_reference_model
    from diffalign.samplers import make_scheduler, trajectory

    config = {"use_lu_lambdas": True, "final_sigmas_type": "sigma_min"}
    model = digits_reference_model(config)
    sched = make_scheduler(name, config, **options)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = list(trajectory(sched, model, x_T, 20, generator=torch.Generator().manual_seed(1)))
    assert sched.noise_levels[-1].lambda_ == sched.noise_levels[-2].lambda_
    assert all(torch.isfinite(x).all() for x in states)
    assert torch.equal(states[-1], states[-2])

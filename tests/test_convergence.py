"""Convergence order of every sampler on the closed-form digits model (zero model error).

Grids are uniform in lambda (``use_lu_lambdas=True``): there every step shrinks like 1/NFE, so the asymptotic
order is visible. On diffusers' default time-uniform grid the steps near sigma_min barely shrink when the
step count doubles, and observed slopes stay far below the theoretical order at practical NFE. The error is
measured at sigma_min (the last grid point before the final jump to sigma = 0, whose size does not depend on
the step count) against an adaptive DOP853 solve accurate to ~1e-9.
"""

import functools
import math

import numpy as np
import pytest
import torch

from diffalign.models import digits_reference_model, solve_reference
from diffalign.samplers import DDIMScheduler, DPMSolverPlusPlusScheduler, DPMSolverScheduler

MODEL = digits_reference_model(prediction_type="epsilon")
X_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@functools.lru_cache
def exact(sigma_start: float, sigma_end: float) -> torch.Tensor:
    return solve_reference(MODEL, X_T, sigma_start, sigma_end)


def rms_error_at_sigma_min(sched, steps: int, exact_start: int = 0) -> tuple[int, float]:
    """(model evaluations, RMS error) of the sampler's state at sigma_min.

    With ``exact_start=k`` the first k states are replaced by the exact solution, so a multistep method's
    history starts exact instead of coming from its lower-order warm-up steps.
    """
    sched.set_timesteps(steps)
    sig = sched.sigmas.double().tolist()
    end = len(sig) - 2  # the last step jumps to sigma = 0: compare at sigmas[end] = sigma_min
    x = X_T
    for k, t in enumerate(sched.timesteps[:end]):
        lvl = sched.noise_levels[k]  # the model is evaluated at the exact noise level the solver assumes
        x = sched.step(MODEL.denoiser.posterior(x, lvl.alpha, lvl.sigma)[1], t, x).prev_sample
        if k + 1 < exact_start:
            x = exact(sig[0], sig[k + 1])
    ref = exact(sig[0], sig[end])
    return end, math.sqrt(torch.mean((x - ref) ** 2).item())


def observed_order(make, steps_list, exact_start: int = 0) -> float:
    nfe, err = zip(*(rms_error_at_sigma_min(make(), n, exact_start) for n in steps_list), strict=True)
    assert all(e > 1e-8 for e in err), f"errors {err} reach the reference accuracy; use fewer steps"
    return -np.polyfit(np.log(nfe), np.log(err), 1)[0]


LU = {"use_lu_lambdas": True, "lower_order_final": False}


@pytest.mark.parametrize(
    "name, make, steps, order",
    [
        ("ddim", lambda: DDIMScheduler(use_lu_lambdas=True), (20, 40, 80), 1),
        ("dpm-solver++ 1", lambda: DPMSolverPlusPlusScheduler(solver_order=1, **LU), (20, 40, 80), 1),
        ("dpm-solver++ 2M", lambda: DPMSolverPlusPlusScheduler(solver_order=2, **LU), (40, 80, 160), 2),
        ("dpm-solver++ 2S", lambda: DPMSolverPlusPlusScheduler(solver_order=2, solver_mode="singlestep", **LU),
         (41, 81, 161), 2),
        ("dpm-solver++ 3S", lambda: DPMSolverPlusPlusScheduler(solver_order=3, solver_mode="singlestep", **LU),
         (81, 161, 321), 3),
        ("dpm-solver 1", lambda: DPMSolverScheduler(solver_order=1, **LU), (20, 40, 80), 1),
        ("dpm-solver 2", lambda: DPMSolverScheduler(solver_order=2, **LU), (41, 81, 161), 2),
        ("dpm-solver 3", lambda: DPMSolverScheduler(solver_order=3, **LU), (81, 161, 321), 3),
        ("dpm-solver 2M", lambda: DPMSolverScheduler(solver_order=2, solver_mode="multistep", **LU),
         (40, 80, 160), 2),
    ],
)
def test_converges_at_theoretical_order(name, make, steps, order):
    slope = observed_order(make, steps)
    assert slope >= order - 0.3, f"{name}: observed order {slope:.2f} < {order} - 0.3"


@pytest.mark.parametrize("cls", [DPMSolverPlusPlusScheduler, DPMSolverScheduler])
def test_third_order_multistep_taylor_form_is_third_order(cls):
    make = lambda: cls(solver_order=3, solver_mode="multistep", third_order_form="taylor", **LU)  # noqa: E731
    assert observed_order(make, (80, 160, 320)) >= 3 - 0.3


@pytest.mark.parametrize("cls", [DPMSolverPlusPlusScheduler, DPMSolverScheduler])
def test_third_order_multistep_diffusers_form_is_second_order(cls):
    """The official/diffusers 3M weights the D2 term by half its Taylor value: local error O(h^3), so the
    global order is 2 even from exact starting values (documented finding; this pins it down)."""
    make = lambda: cls(solver_order=3, solver_mode="multistep", **LU)  # noqa: E731
    slope = observed_order(make, (80, 160, 320), exact_start=2)
    assert 2 - 0.3 <= slope < 2.6


def test_time_quadratic_spacing_converges_and_beats_time_uniform_for_dpm_solver_3():
    """DPM-Solver's time-quadratic grid (Sec. 3.4) concentrates steps at low noise; error must shrink with NFE."""
    from diffalign.samplers import sample

    errs = {}
    for spacing in ("linspace", "time_quadratic"):
        for n in (12, 24):
            sched = DPMSolverScheduler(solver_order=3, timestep_spacing=spacing, final_sigmas_type="sigma_min")
            sched.set_timesteps(n)
            ts = sched.timesteps.double()
            if spacing == "time_quadratic":  # t_i = (sqrt(T) (1 - i/N))^2: second differences are constant
                outer = ts[[0, 3, 6, 9]]
                assert outer[0] - 2 * outer[1] + outer[2] > 0
            lvl0, lvl_end = sched.noise_levels[0], sched.noise_levels[-1]
            ref = exact(lvl0.sigma / lvl0.alpha, lvl_end.sigma / lvl_end.alpha)
            errs[spacing, n] = torch.mean((sample(sched, MODEL, X_T, n) - ref) ** 2).item()
    assert errs["time_quadratic", 24] < errs["time_quadratic", 12] / 4
    assert errs["time_quadratic", 24] < errs["linspace", 24]


DEFAULT_ORDERS = {"ddim": 1, "dpm-solver": 3, "dpm-solver++": 2, "dpm-solver-v3": 2, "pndm": 2, "unipc": 3,
                  "dc-solver": 3, "gaussian-ei": 3}
"""Order of each sampler's default configuration at many steps (DPM-Solver: singlestep DPM-Solver-3; v3: above 20
steps DPM-Solver++(2M); PNDM: s-pndm; UniPC / DC-Solver: UniP-2 with the UniC corrector; Gaussian EI: third order,
no statistics)."""


@pytest.mark.parametrize("wrapped", [False, True], ids=["base", "dualfast"])
@pytest.mark.parametrize("name", sorted(DEFAULT_ORDERS))
def test_every_default_configuration_and_dualfast_wrapper_keeps_its_order_up_to_nfe_320(name, wrapped):
    from diffalign.samplers import make_scheduler

    full = f"dualfast:{name}" if wrapped else name
    slope = observed_order(lambda: make_scheduler(full, {"use_lu_lambdas": True}), (80, 160, 320))
    assert slope >= DEFAULT_ORDERS[name] - 0.3, f"{full}: observed order {slope:.2f}"

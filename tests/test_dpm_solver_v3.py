"""DPM-Solver-v3: reduction oracles, EMS estimation, convergence order, errors, config round trip, pipelines, CLI.

Convergence is measured as in tests/test_convergence.py (uniform-lambda grids, error at sigma_min against an
adaptive DOP853 solve). The v3 solution formula is exact for *any* statistics (l, s, b), so the order of the
discretization is measured with smooth synthetic statistics on a fine EMS grid (N = 3200: the trapezoid rule's
O(dlambda^2) bias, ~3e-6 here, stays below the errors measured); statistics estimated from 64 datapoints add
Monte-Carlo roughness in lambda that no polynomial extrapolation removes.
"""

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel

import diffalign.models
from diffalign.cli import main
from diffalign.models import digits_reference_model, solve_reference
from diffalign.models.registry import load_model
from diffalign.samplers import (
    SAMPLERS,
    DDIMScheduler,
    DPMSolverPlusPlusScheduler,
    DPMSolverV3Scheduler,
    make_scheduler,
    sample,
    trajectory,
)
from diffalign.samplers.dpm_solver_v3 import _cumtrapz
from diffalign.samplers.ems import (
    EMS,
    TRAJECTORY_FILE,
    compute_ems,
    compute_model_ems,
    ems_lambdas,
    load_ems,
    load_official_ems,
    model_eps_fn,
    model_trajectories,
    save_official_ems,
    schedule_lambda_range,
    select_ems_file,
)
from diffalign.sampling import sample_images

MODEL = digits_reference_model(prediction_type="epsilon")
X_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
LU = {"use_lu_lambdas": True, "lower_order_final": False}
REFERENCE_EMS = str(Path(diffalign.models.__file__).parent / "ems" / "reference_digits")  # shipped, N = 400


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The closed-form model is ~20x faster on one thread than on two contended ones."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits_ems(tmp_path_factory):
    out = tmp_path_factory.mktemp("ems") / "digits"
    ems = compute_model_ems(load_model("reference:digits"), 64, 40, out=out, progress=False)
    return out, ems


@pytest.fixture(scope="module")
def synthetic_ems(tmp_path_factory):
    """Smooth, non-trivial (l, s, b) on a fine grid; l -> 1 at high noise like real EMS."""
    lam_T, lam_0 = schedule_lambda_range({})
    lam = torch.linspace(lam_T, lam_0, 3201, dtype=torch.float64)
    a2 = torch.sigmoid(2 * lam)
    pattern = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    l = col((1 - a2) / (a2 * 0.09 + 1 - a2)) * (1 + 0.1 * pattern * col(a2))
    s = col(-0.5 * torch.tanh(lam / 2)) + 0.2 * pattern
    b = col(0.05 * torch.sin(lam)) * (1 + pattern)
    out = tmp_path_factory.mktemp("ems") / "synthetic"
    EMS(l, s, b, lam, {"schedule": None}).save(out)
    return out


# ------------------------------------------------------------------------------------------------ oracles
@pytest.mark.parametrize("config", [{}, {"use_lu_lambdas": True}, {"timestep_spacing": "trailing"}])
@pytest.mark.parametrize("steps", [5, 12])
def test_degenerated_order_1_is_ddim(config, steps):
    expected = sample(DDIMScheduler(**config), MODEL, X_T, steps)
    got = sample(DPMSolverV3Scheduler(degenerated=True, solver_order=1, use_corrector=False, **config), MODEL, X_T,
                 steps)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_degenerated_order_2_without_corrector_is_dpm_solver_pp_2m_in_taylor_form(steps):
    """The Vandermonde order-2 predictor integrates the linear Taylor term exactly: DPM-Solver++(2M) "heun",
    not the (default) "midpoint" form, which differs at O(h^3) per step."""
    v3 = sample(DPMSolverV3Scheduler(degenerated=True, solver_order=2, use_corrector=False), MODEL, X_T, steps)
    heun = sample(DPMSolverPlusPlusScheduler(solver_order=2, solver_type="heun"), MODEL, X_T, steps)
    midpoint = sample(DPMSolverPlusPlusScheduler(solver_order=2, solver_type="midpoint"), MODEL, X_T, steps)
    torch.testing.assert_close(v3, heun, rtol=0, atol=1e-12)
    assert (v3 - midpoint).abs().max() > 1e-3


@pytest.mark.parametrize("lower_order_final", [True, False])
def test_degenerated_order_3_is_dpm_solver_pp_3m_with_taylor_weights(lower_order_final):
    v3 = DPMSolverV3Scheduler(degenerated=True, solver_order=3, use_corrector=False,
                              lower_order_final=lower_order_final)
    pp = DPMSolverPlusPlusScheduler(solver_order=3, solver_type="heun", third_order_form="taylor",
                                    lower_order_final=lower_order_final)
    torch.testing.assert_close(sample(v3, MODEL, X_T, 12), sample(pp, MODEL, X_T, 12), rtol=0, atol=1e-12)


def test_degenerate_ems_file_reproduces_the_exact_integrals_up_to_the_trapezoid_rule(tmp_path):
    EMS.degenerate((), scheduler_config={}, num_points=3200).save(tmp_path)
    kw = {"solver_order": 3, "use_lu_lambdas": True}
    trapezoid = sample(DPMSolverV3Scheduler(ems_path=str(tmp_path), **kw), MODEL, X_T, 11)
    exact = sample(DPMSolverV3Scheduler(ems_path=str(tmp_path), degenerated=True, **kw), MODEL, X_T, 11)
    err = (trapezoid - exact).abs().max().item()
    assert 0 < err < 1e-5


# ------------------------------------------------------------------------------------------------ EMS
def test_digits_ems_shapes_round_trip_and_analytic_limits(digits_ems):
    out, ems = digits_ems
    assert ems.l.shape == ems.s.shape == ems.b.shape == (41, 1, 8, 8) and ems.lambdas.shape == (41,)
    assert all(torch.isfinite(a).all() for a in (ems.l, ems.s, ems.b))
    lam_T, lam_0 = schedule_lambda_range(load_model("reference:digits").scheduler_config)
    assert math.isclose(ems.lambda_T, lam_T) and math.isclose(ems.lambda_0, lam_0)
    again = load_ems(out)
    for name in ("l", "s", "b", "lambdas"):
        assert torch.equal(getattr(again, name), getattr(ems, name))
    header = json.loads((out / "ems.json").read_text())
    assert header["model"] == "reference:digits" and header["num_points"] == 40 and header["num_datapoints"] == 64
    assert header["sample_shape"] == [1, 8, 8] and header["guidance"] == 1.0 and header["schedule"]["beta_end"] == 0.02
    # Gaussian mixture (component std s0 = 0.3): sigma d eps/dx = sigma^2/v (I - a^2/v Cov_w(y)), v = a^2 s0^2 +
    # sigma^2. At the noisiest point a^2 ~ 4e-5, so l ~ 1; at the cleanest the posterior sits on one component
    # (Cov_w = 0), so l = sigma^2 / v exactly, whatever the probes.
    alpha_T, sigma_T = (1 + math.exp(-2 * lam_T)) ** -0.5, (1 + math.exp(2 * lam_T)) ** -0.5
    assert (ems.l[0] - sigma_T**2 / (alpha_T**2 * 0.09 + sigma_T**2)).abs().max() < 2e-4
    alpha_0, sigma_0 = (1 + math.exp(-2 * lam_0)) ** -0.5, (1 + math.exp(2 * lam_0)) ** -0.5
    expected = sigma_0**2 / (alpha_0**2 * 0.09 + sigma_0**2)
    torch.testing.assert_close(ems.l[-1], torch.full_like(ems.l[-1], expected), rtol=0.02, atol=0)
    # low noise: f = -sigma^2/v * (posterior component mean) is proportional to e^{-2 lambda}, so s -> -2
    assert abs(ems.s[-5:].median().item() + 2) < 0.1


def reference_eps(differentiable: bool):
    sched = MODEL.schedule

    def eps_fn(x, t):
        if not differentiable:
            t = t.detach()
        alpha, sigma = sched.alpha_sigma(t)
        return MODEL.denoiser.posterior(x, alpha, sigma)[1]

    return eps_fn


def test_time_derivative_by_jvp_and_by_finite_differences_agree():
    x0 = MODEL.denoiser.data[:16] + 0.3 * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1),
                                                      dtype=torch.float64)
    kw = {"progress": False, "batch_size": 16}
    by_jvp = compute_ems(reference_eps(True), x0, {}, 8, **kw)
    auto = compute_ems(reference_eps(False), x0, {}, 8, **kw)  # t detached: detected, central differences
    assert by_jvp.meta["time_derivative"] == "jvp" and auto.meta["time_derivative"] == "fd"
    assert auto.meta["fd_time_step"] == 1e-4  # in the header, so a resume with another step is refused
    torch.testing.assert_close(auto.l, by_jvp.l, rtol=0, atol=0)
    torch.testing.assert_close(auto.s, by_jvp.s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto.b, by_jvp.b, rtol=1e-5, atol=1e-5)


def test_interrupted_computation_resumes_to_the_same_result(tmp_path):
    x0 = MODEL.denoiser.data[:8].clone()
    kw = {"progress": False, "chunk_points": 2, "batch_size": 4}
    full = compute_ems(reference_eps(True), x0, {}, 6, **kw)
    calls = {"n": 0}

    def flaky(x, t):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return reference_eps(True)(x, t)

    with pytest.raises(KeyboardInterrupt):
        compute_ems(flaky, x0, {}, 6, out=tmp_path, **kw)
    assert (tmp_path / "ems.partial.safetensors").is_file() and not (tmp_path / "ems.safetensors").exists()
    resumed = compute_ems(reference_eps(True), x0, {}, 6, out=tmp_path, **kw)
    assert not (tmp_path / "ems.partial.safetensors").exists()
    for name in ("l", "s", "b"):
        torch.testing.assert_close(getattr(resumed, name), getattr(full, name), rtol=0, atol=1e-13)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        compute_ems(flaky, x0, {}, 6, out=tmp_path / "other", **kw)
    with pytest.raises(ValueError, match="different settings"):
        compute_ems(reference_eps(True), x0, {}, 6, out=tmp_path / "other", **kw, seed=1)


# ------------------------------------------------------------------------------------------------ convergence
@functools.lru_cache
def exact(sigma_start: float, sigma_end: float) -> torch.Tensor:
    return solve_reference(MODEL, X_T, sigma_start, sigma_end)


def rms_error_at_sigma_min(sched, steps: int, exact_start: int = 0) -> tuple[int, float]:
    sched.set_timesteps(steps)
    sig = sched.sigmas.double().tolist()
    end = len(sig) - 2
    x = X_T
    for k, t in enumerate(sched.timesteps[:end]):
        lvl = sched.noise_levels[k]
        x = sched.step(MODEL.denoiser.posterior(x, lvl.alpha, lvl.sigma)[1], t, x).prev_sample
        if k + 1 < exact_start:
            x = exact(sig[0], sig[k + 1])
    return end, math.sqrt(torch.mean((x - exact(sig[0], sig[end])) ** 2).item())


def observed_order(make, steps_list, exact_start: int = 0) -> float:
    nfe, err = zip(*(rms_error_at_sigma_min(make(), n, exact_start) for n in steps_list), strict=True)
    assert all(e > 1e-5 for e in err), f"errors {err} approach the trapezoid bias; use fewer steps"
    return -np.polyfit(np.log(nfe), np.log(err), 1)[0]


@pytest.mark.parametrize(
    "name, kwargs, steps, exact_start, low, high",
    [
        ("order 1", {"solver_order": 1, "use_corrector": False}, (41, 81, 161), 0, 0.7, 1.3),
        ("order 2", {"solver_order": 2, "use_corrector": False}, (41, 81, 161), 0, 1.7, 2.4),
        # from exact starting values: the order-1 warm-up step is O(h^2) locally where l != 1
        ("order 3", {"solver_order": 3, "use_corrector": False}, (41, 81, 161), 3, 2.7, 3.6),
        ("order 1 + corrector", {"solver_order": 1}, (41, 81, 161), 0, 1.7, 2.4),
        # the pseudo-order corrector's first derivative is a divided difference (error O(h)): global order 2
        ("order 3 + pseudo corrector", {"solver_order": 3}, (41, 81, 161), 3, 1.7, 2.4),
    ],
)
def test_convergence_order_with_smooth_statistics(synthetic_ems, name, kwargs, steps, exact_start, low, high):
    make = lambda: DPMSolverV3Scheduler(ems_path=str(synthetic_ems), **kwargs, **LU)  # noqa: E731
    slope = observed_order(make, steps, exact_start)
    assert low <= slope <= high, f"{name}: observed order {slope:.2f} not in [{low}, {high}]"


def test_estimated_digits_ems_samples_accurately(digits_ems):
    out, _ = digits_ems
    sig0 = float(make_scheduler("dpm-solver++").sigmas.max())
    errors = {}
    for steps in (10, 30):  # an explicit order keeps the EMS above EMS_MAX_STEPS
        sched = DPMSolverV3Scheduler(ems_path=str(out), solver_order=2, use_lu_lambdas=True)
        x = sample(sched, MODEL, X_T, steps)
        errors[steps] = torch.mean((x - exact(float(sched.sigmas[0]), 0.0)) ** 2).item()
    assert sig0 > 0 and errors[30] < errors[10] / 4, errors


# ------------------------------------------------------------------------------------------------ corrector
def test_half_corrector_only_corrects_where_t_is_at_most_one_half():
    plain = list(trajectory(DPMSolverV3Scheduler(degenerated=True, use_corrector=False), MODEL, X_T, 10))
    sched = DPMSolverV3Scheduler(degenerated=True, half_corrector=True)
    half = list(trajectory(sched, MODEL, X_T, 10))
    first = next(i for i, t in enumerate(sched.timesteps) if float(t) <= 500)  # the first corrected point
    for i in range(first):  # x after step i depends on corrections at points <= i only
        torch.testing.assert_close(half[i], plain[i], rtol=0, atol=0)
    assert (half[first] - plain[first]).abs().max() > 1e-6


def test_ems_used_at_another_guidance_falls_back_to_the_degenerated_statistics(digits_ems):
    path = str(digits_ems[0])
    same = sample(DPMSolverV3Scheduler(ems_path=path, guidance_scale=1.0), MODEL, X_T, 8)
    assert torch.equal(same, sample(DPMSolverV3Scheduler(ems_path=path), MODEL, X_T, 8))
    other = sample(DPMSolverV3Scheduler(ems_path=path, guidance_scale=7.5), MODEL, X_T, 8)
    fallback = DPMSolverV3Scheduler(degenerated=True, guidance_scale=7.5)  # no EMS grid to snap to either
    assert torch.equal(other, sample(fallback, MODEL, X_T, 8))


def test_a_directory_of_ems_sets_is_chosen_by_guidance(tmp_path, digits_ems):
    unguided = load_ems(digits_ems[0])
    shutil.copytree(digits_ems[0], tmp_path / "model")
    guided = EMS(unguided.l * 0.9 + 0.1, unguided.s, unguided.b, unguided.lambdas, {**unguided.meta, "guidance": 7.5})
    guided.save(tmp_path / "model" / "guidance_7.5")
    path = str(tmp_path / "model")
    assert select_ems_file(path, 7.5) == tmp_path / "model" / "guidance_7.5" / "ems.safetensors"
    assert select_ems_file(path, None) == select_ems_file(path, 1.0) == tmp_path / "model" / "ems.safetensors"
    at_7 = sample(DPMSolverV3Scheduler(ems_path=path, guidance_scale=7.5), MODEL, X_T, 8)
    assert torch.equal(at_7, sample(DPMSolverV3Scheduler(ems_path=str(tmp_path / "model" / "guidance_7.5"),
                                                         guidance_scale=7.5), MODEL, X_T, 8))
    assert not torch.equal(at_7, sample(DPMSolverV3Scheduler(ems_path=path, degenerated=True, guidance_scale=7.5),
                                        MODEL, X_T, 8))
    assert torch.equal(sample(DPMSolverV3Scheduler(ems_path=path, guidance_scale=1.0), MODEL, X_T, 8),
                       sample(DPMSolverV3Scheduler(ems_path=str(digits_ems[0])), MODEL, X_T, 8))
    at_3 = sample(DPMSolverV3Scheduler(ems_path=path, guidance_scale=3.0), MODEL, X_T, 8)  # no set: degenerated
    assert torch.equal(at_3, sample(DPMSolverV3Scheduler(degenerated=True, guidance_scale=3.0), MODEL, X_T, 8))


def test_corrector_is_off_by_default_at_large_guidance_as_the_authors_stable_diffusion_sampler(tmp_path, digits_ems):
    path = str(digits_ems[0])
    assert DPMSolverV3Scheduler(ems_path=path)._corrector_on()
    assert DPMSolverV3Scheduler(degenerated=True, guidance_scale=3.0)._corrector_on()
    assert not DPMSolverV3Scheduler(ems_path=path, guidance_scale=7.5)._corrector_on()  # unguided EMS: fallback
    assert not DPMSolverV3Scheduler(degenerated=True, guidance_scale=7.5)._corrector_on()
    assert DPMSolverV3Scheduler(ems_path=path, guidance_scale=7.5, use_corrector=True)._corrector_on()
    unguided = load_ems(digits_ems[0])
    EMS(unguided.l, unguided.s, unguided.b, unguided.lambdas, {**unguided.meta, "guidance": 7.5}).save(tmp_path / "g")
    assert not DPMSolverV3Scheduler(ems_path=str(tmp_path / "g"), guidance_scale=7.5)._corrector_on()
    assert DPMSolverV3Scheduler(ems_path=str(tmp_path / "g"), guidance_scale=7.5, use_corrector=True)._corrector_on()


# ------------------------------------------------------------------------------------------------ few steps
FEW_STEP = {"solver_order": 3, "predictor_pseudo": True, "corrector_pseudo": False, "lower_order_final": False}


@pytest.mark.parametrize("steps", [3, 5])
def test_default_at_five_steps_or_fewer_without_guidance_is_the_authors_nfe5_configuration(digits_ems, steps):
    path = str(digits_ems[0])
    default = sample(DPMSolverV3Scheduler(ems_path=path), MODEL, X_T, steps)
    assert torch.equal(default, sample(DPMSolverV3Scheduler(ems_path=path, **FEW_STEP), MODEL, X_T, steps))
    assert torch.equal(sample(DPMSolverV3Scheduler(ems_path=path, guidance_scale=1.0), MODEL, X_T, steps), default)
    order_2 = sample(DPMSolverV3Scheduler(ems_path=path, solver_order=2), MODEL, X_T, steps)
    assert (default - order_2).abs().max() > 1e-4  # an explicit order runs as configured


def test_default_is_order_2_above_five_steps_and_with_guidance(digits_ems):
    path = str(digits_ems[0])
    for steps in (6, 10):
        assert torch.equal(sample(DPMSolverV3Scheduler(ems_path=path), MODEL, X_T, steps),
                           sample(DPMSolverV3Scheduler(ems_path=path, solver_order=2), MODEL, X_T, steps))
    guided = {"degenerated": True, "guidance_scale": 3.0}
    assert torch.equal(sample(DPMSolverV3Scheduler(**guided), MODEL, X_T, 5),
                       sample(DPMSolverV3Scheduler(solver_order=2, **guided), MODEL, X_T, 5))
    sched = DPMSolverV3Scheduler(ems_path=path)
    for steps, order in ((5, 3), (8, 2), (4, 3)):  # the plan follows the latest set_timesteps
        sched.set_timesteps(steps)
        assert sched._plan.order == order


# ------------------------------------------------------------------------------------------------ many steps
# NFE 5-20 in the EMS range (the authors' grid of step counts), then DPM-Solver++(2M) up to 320
MANY_NFES = (5, 6, 8, 10, 12, 15, 20, 21, 25, 40, 80, 160, 320)


def test_default_is_never_worse_than_dpm_solver_pp_from_5_to_320_steps():
    """Shipped EMS of the closed-form model, diffusers' default grid, float64, MSE at sigma = 0 (the benchmark's
    measure). With the EMS at every step count v3 was 1.8x / 13x / 17x worse at NFE 40 / 80 / 320 (the statistics'
    noise, and the final jump to sigma = 0 dominating) and could not run 320 steps (they snap to 271 EMS points)."""
    x_T = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grid = DPMSolverPlusPlusScheduler()
    grid.set_timesteps(5)  # every grid starts at t = 999
    x_exact = solve_reference(MODEL, x_T, float(grid.sigmas[0]), 0.0)
    mse = lambda x: torch.mean((x - x_exact) ** 2).item()  # noqa: E731
    for steps in MANY_NFES:
        v3 = DPMSolverV3Scheduler(ems_path=REFERENCE_EMS)
        got, base = mse(sample(v3, MODEL, x_T, steps)), mse(sample(DPMSolverPlusPlusScheduler(), MODEL, x_T, steps))
        assert got <= 1.05 * base, (steps, got, base)
        assert len(v3.timesteps) == steps


def test_default_converges_at_order_2_from_80_to_320_steps():
    """Local slopes of the RMS error at sigma_min on a logSNR grid (as the convergence tests); with the EMS at
    every step count they were 0.97 and 0.71."""
    errors = [rms_error_at_sigma_min(DPMSolverV3Scheduler(ems_path=REFERENCE_EMS, use_lu_lambdas=True), n)
              for n in (80, 160, 320)]
    (n0, e0), (n1, e1), (n2, e2) = errors
    slopes = [math.log(e0 / e1) / math.log(n1 / n0), math.log(e1 / e2) / math.log(n2 / n1)]
    assert min(slopes) >= 1.9, slopes


def test_many_step_default_is_dpm_solver_pp_2m_and_an_explicit_order_keeps_the_ems():
    for config in ({}, {"use_lu_lambdas": True}, {"use_karras_sigmas": True}):
        v3 = sample(DPMSolverV3Scheduler(ems_path=REFERENCE_EMS, **config), MODEL, X_T, 24)
        pp = sample(DPMSolverPlusPlusScheduler(**config), MODEL, X_T, 24)
        torch.testing.assert_close(v3, pp, rtol=0, atol=1e-12)
    explicit = DPMSolverV3Scheduler(ems_path=REFERENCE_EMS, solver_order=2)
    assert (sample(explicit, MODEL, X_T, 24) - v3).abs().max() > 1e-4 and explicit._plan.statistics
    corrected = sample(DPMSolverV3Scheduler(ems_path=REFERENCE_EMS, use_corrector=True), MODEL, X_T, 24)
    assert (corrected - sample(DPMSolverV3Scheduler(ems_path=REFERENCE_EMS), MODEL, X_T, 24)).abs().max() > 1e-6


@pytest.mark.parametrize(("steps", "options"), [(20, {"use_corrector": False}), (20, {}), (20, {"degenerated": True}),
                                                 (30, {})], ids=str)
def test_a_repeated_final_sigma_is_a_zero_length_step_with_ems(steps, options):
    """use_lu_lambdas with final_sigmas_type='sigma_min' ends on two equal sigmas, which snap to one EMS point: the
    last step is the identity after the last point's corrector, and the trajectory up to there is the one of the
    same grid without the repeated point."""
    config = {"use_lu_lambdas": True, "final_sigmas_type": "sigma_min", "ems_path": REFERENCE_EMS, **options}
    sched = DPMSolverV3Scheduler(**config)
    states = list(trajectory(sched, MODEL, X_T, steps))
    assert sched.noise_levels[-1].lambda_ == sched.noise_levels[-2].lambda_ and len(states) == steps
    shorter = DPMSolverV3Scheduler(**config)  # the same points once each: the last real step ends at sigma_min
    shorter.set_timesteps(sigmas=sched.sigmas[:-2].double().tolist())
    assert shorter.sigmas[-1] == sched.sigmas[-1] and len(shorter.timesteps) == steps - 1
    x = X_T
    for k, t in enumerate(shorter.timesteps):
        x = shorter.step(MODEL(x, t), t, x).prev_sample
        torch.testing.assert_close(x, states[k], rtol=0, atol=1e-12)
    if not sched._corrector_on() or not sched._plan.statistics:
        assert torch.equal(states[-1], states[-2])
    else:  # the last evaluation corrects x at sigma_min, and nothing else moves it
        assert torch.isfinite(states[-1]).all() and 0 < (states[-1] - states[-2]).abs().max() < 1e-2


def test_pseudo_order_predictor_differs_from_the_vandermonde_one_only_at_order_3(digits_ems):
    path = str(digits_ems[0])
    run = lambda **kw: sample(DPMSolverV3Scheduler(ems_path=path, use_corrector=False, **kw), MODEL, X_T, 8)  # noqa: E731
    assert torch.equal(run(solver_order=2, predictor_pseudo=True), run(solver_order=2))
    assert (run(solver_order=3, predictor_pseudo=True) - run(solver_order=3)).abs().max() > 1e-5


# ------------------------------------------------------------------------------------------------ errors
def test_missing_ems_file_says_how_to_compute_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffalign ems compute"):
        DPMSolverV3Scheduler(ems_path=str(tmp_path / "nowhere"))


def test_ems_for_another_sample_shape_is_rejected_in_step(digits_ems):
    sched = DPMSolverV3Scheduler(ems_path=str(digits_ems[0]))
    sched.set_timesteps(5)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"EMS .* shape \(1, 8, 8\).*\(4, 8, 8\)"):
        sched.step(x, sched.timesteps[0], x)


def test_ems_for_another_noise_schedule_is_rejected(digits_ems):
    with pytest.raises(ValueError, match="another noise schedule.*beta_schedule"):
        DPMSolverV3Scheduler(ems_path=str(digits_ems[0]), beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_fewer_than_one_model_evaluation_is_rejected(bad):
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
        DPMSolverV3Scheduler(degenerated=True).set_timesteps(bad)


def test_non_finite_statistics_are_rejected(tmp_path, digits_ems):
    ems = load_ems(digits_ems[0])
    s = ems.s.clone()
    s[7, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in s at grid points \\[7\\]"):
        EMS(ems.l, s, ems.b, ems.lambdas, {})
    from safetensors.torch import save_file

    save_file({"l": ems.l, "s": s, "b": ems.b.clone(), "lambdas": ems.lambdas}, str(tmp_path / "ems.safetensors"))
    with pytest.raises(ValueError, match="non-finite"):
        DPMSolverV3Scheduler(ems_path=str(tmp_path))


def test_grid_finer_than_the_ems_grid_is_rejected(digits_ems):
    sched = DPMSolverV3Scheduler(ems_path=str(digits_ems[0]), solver_order=2, use_lu_lambdas=True)
    with pytest.raises(ValueError, match="snap to only .* EMS grid \\(N=40\\)"):
        sched.set_timesteps(60)
    default = DPMSolverV3Scheduler(ems_path=str(digits_ems[0]), use_lu_lambdas=True)
    default.set_timesteps(60)  # beyond EMS_MAX_STEPS the default uses no EMS, so nothing snaps
    assert len(default.timesteps) == 60


# ------------------------------------------------------------------------------------------------ API
def test_registered_and_usable_without_ems():
    assert SAMPLERS["dpm-solver-v3"] is DPMSolverV3Scheduler
    x = sample(make_scheduler("dpm-solver-v3"), MODEL, X_T, 6)
    assert torch.isfinite(x).all()


def test_snapped_grid_is_what_pipelines_see(digits_ems):
    sched = DPMSolverV3Scheduler(ems_path=str(digits_ems[0]))
    sched.set_timesteps(8)
    ems = load_ems(digits_ems[0])
    lams = [lvl.lambda_ for lvl in sched.noise_levels[:-1]]
    on_grid = [(lam - ems.lambda_T) / (ems.lambda_0 - ems.lambda_T) * 40 for lam in lams]
    assert all(abs(p - round(p)) < 1e-9 for p in on_grid)
    torch.testing.assert_close(sched.sigmas[:-1].double(), torch.tensor([math.exp(-lam) for lam in lams],
                                                                        dtype=torch.float64), rtol=1e-6, atol=0)
    assert sched.sigmas[-1] == 0 and len(sched.timesteps) == 8 and sched.timesteps[0] == 999


def test_save_config_from_pretrained_round_trip(tmp_path, digits_ems):
    sched = DPMSolverV3Scheduler(ems_path=str(digits_ems[0]), solver_order=3, half_corrector=True,
                                 use_lu_lambdas=True)
    sched.save_config(tmp_path)
    again = DPMSolverV3Scheduler.from_pretrained(tmp_path)
    assert again.config.ems_path == str(digits_ems[0]) and again.config.solver_order == 3
    torch.testing.assert_close(sample(again, MODEL, X_T, 10), sample(sched, MODEL, X_T, 10), rtol=0, atol=0)


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def test_works_in_ddpm_pipeline_degenerated_and_with_ems_of_the_unet(tmp_path):
    unet = tiny_unet()
    pipe = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    # EMS of the UNet itself (JVPs through attention and group norm; float32, time derivative by AD)
    data = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ems = compute_ems(lambda x, t: unet(x, t).sample, data, pipe.scheduler.config, 20, out=tmp_path, progress=False)
    assert ems.meta["time_derivative"] == "jvp"
    for extra in ({"degenerated": True}, {"ems_path": str(tmp_path)}):
        pipe.scheduler = DPMSolverV3Scheduler.from_config(pipe.scheduler.config, **extra)
        images = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
        assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_cli_ems_compute(tmp_path, capsys):
    out = tmp_path / "ems"
    code = main(["ems", "compute", "--model", "reference:digits", "--num-datapoints", "8", "--grid", "6", "--out",
                 str(out), "--seed", "3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "N=6" in capsys.readouterr().out
    header = json.loads((out / "ems.json").read_text())
    assert header["model"] == "reference:digits" and header["seed"] == 3 and header["datapoints"] == "data"
    assert load_ems(out).l.shape == (7, 1, 8, 8)
    code = main(["ems", "compute", "--model", "reference:digits", "--num-datapoints", "8", "--grid", "6", "--out",
                 str(tmp_path / "g"), "--guidance", "3", "--datapoints", "samples", "--quiet"])
    assert code == 0 and json.loads((tmp_path / "g" / "ems.json").read_text())["guidance"] == 3.0
    capsys.readouterr()
    code = main(["ems", "compute", "--model", "reference:digits", "--num-datapoints", "8", "--grid", "6", "--out",
                 str(tmp_path / "t"), "--guidance", "3", "--datapoints", "trajectories", "--quiet"])
    assert code == 0 and "solving the trajectories" in capsys.readouterr().out
    assert json.loads((tmp_path / "t" / "ems.json").read_text())["datapoints"] == "trajectories"


# ------------------------------------------------------------------------------------------------ official layout
def test_official_layout_round_trip_samples_identically(tmp_path, digits_ems):
    path, ems = digits_ems
    config = load_model("reference:digits").scheduler_config
    save_official_ems(ems, tmp_path / "default")
    for name, key in (("l.npz", "l"), ("sb.npz", "s"), ("sb.npz", "b")):  # what the official sampler needs
        with np.load(tmp_path / "default" / name) as z:
            assert z[key].dtype == np.float32
    save_official_ems(ems, tmp_path / "official", dtype="float64")
    with np.load(tmp_path / "official" / "l.npz") as z:
        assert z.files == ["l"] and z["l"].shape == (41, 1, 8, 8) and z["l"].dtype == np.float64
    back = load_official_ems(tmp_path / "official", config, guidance=1.0, model="reference:digits")
    for k in ("l", "s", "b"):
        assert torch.equal(getattr(back, k), getattr(ems, k))
    torch.testing.assert_close(back.lambdas, ems.lambdas, rtol=0, atol=1e-12)
    back.save(tmp_path / "imported")
    run = lambda p: sample(make_scheduler("dpm-solver-v3", config, ems_path=str(p)), MODEL, X_T, 6)  # noqa: E731
    torch.testing.assert_close(run(tmp_path / "imported"), run(path), rtol=0, atol=1e-12)


def test_official_layout_errors_are_clear(tmp_path, digits_ems):
    _, ems = digits_ems
    config = load_model("reference:digits").scheduler_config
    with pytest.raises(FileNotFoundError, match="l.npz"):
        load_official_ems(tmp_path, config)
    np.savez(tmp_path / "l.npz", l=np.ones((5, 1, 8, 8)))
    np.savez(tmp_path / "sb.npz", s=np.zeros((5, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"\['b'\]"):
        load_official_ems(tmp_path, config)
    np.savez(tmp_path / "sb.npz", s=np.zeros((5, 1, 8, 8)), b=np.array([object()] * 5, dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):  # never unpickled
        load_official_ems(tmp_path, config)
    np.savez(tmp_path / "sb.npz", s=np.zeros((4, 1, 8, 8)), b=np.zeros((4, 1, 8, 8)))
    with pytest.raises(ValueError, match="shape"):
        load_official_ems(tmp_path, config)
    narrow = EMS(ems.l, ems.s, ems.b, ems.lambdas * 0.5, dict(ems.meta))
    with pytest.raises(ValueError, match="official"):
        save_official_ems(narrow, tmp_path / "x")


def test_cli_ems_export_and_import(tmp_path, capsys, digits_ems):
    path, ems = digits_ems
    assert main(["ems", "export", str(path), "--out", str(tmp_path / "off32")]) == 0
    with np.load(tmp_path / "off32" / "sb.npz") as z:
        assert z["s"].dtype == np.float32
    assert main(["ems", "export", str(path), "--out", str(tmp_path / "off"), "--float64"]) == 0
    assert main(["ems", "import", str(tmp_path / "off"), "--scheduler", "reference:digits", "--guidance", "1",
                 "--out", str(tmp_path / "imp")]) == 0, capsys.readouterr().err
    back = load_ems(tmp_path / "imp")
    assert torch.equal(back.s, ems.s) and back.meta["guidance"] == 1.0
    assert back.meta["schedule"] == ems.meta["schedule"]
    (tmp_path / "sched.json").write_text(json.dumps(dict(load_model("reference:digits").scheduler_config)))
    assert main(["ems", "import", str(tmp_path / "off"), "--scheduler", str(tmp_path / "sched.json"),
                 "--out", str(tmp_path / "imp2")]) == 0
    assert main(["ems", "import", str(tmp_path / "off"), "--scheduler", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "imp3")]) == 2
    assert "scheduler config" in capsys.readouterr().err


def test_guided_ems_of_the_unconditional_network_option(tmp_path):
    named = load_model("reference:digits")
    kw = dict(guidance=3.0, datapoints="samples", progress=False)
    guided = compute_model_ems(named, 8, 4, **kw)
    uncond = compute_model_ems(named, 8, 4, network="unconditional", **kw)
    assert uncond.meta["network"] == "unconditional" and uncond.meta["guidance"] == 3.0
    assert "network" not in guided.meta
    assert not torch.allclose(uncond.l, guided.l)
    with pytest.raises(ValueError, match="network"):
        compute_model_ems(named, 8, 4, network="conditional", **kw)


def test_finite_difference_derivatives_agree_with_jvps_far_below_the_monte_carlo_error():
    named = load_model("builtin:digits")  # float32, no forward-mode AD (double-VJP JVPs)
    jvp_ems = compute_model_ems(named, 16, 4, progress=False)
    fd_ems = compute_model_ems(named, 16, 4, derivatives="fd", progress=False)
    other_seed = compute_model_ems(named, 16, 4, seed=1, progress=False)
    assert fd_ems.meta["derivatives"] == "fd" and fd_ems.meta["time_derivative"] == "fd"
    assert fd_ems.meta["fd_steps"] == [1e-2, 1e-3]
    for k in ("l", "s", "b"):
        fd_err = (getattr(fd_ems, k) - getattr(jvp_ems, k)).abs().median()
        mc_err = (getattr(other_seed, k) - getattr(jvp_ems, k)).abs().median()
        assert fd_err < 0.05 * mc_err, (k, float(fd_err), float(mc_err))
    with pytest.raises(ValueError, match="derivatives"):
        compute_model_ems(named, 16, 4, derivatives="complex-step", progress=False)


def test_grid_derivatives_do_not_alias_a_fast_time_wiggle_into_b():
    """A model term sin(t) (period ~6 timesteps, like a UNet's fastest time-embedding sinusoid) is sampled at
    arbitrary phases by a grid whose cells span ~24-48 timesteps: its exact derivative aliases into b, while
    differences over one grid cell telescope in the integral of b, which is what the solver uses."""
    x0 = MODEL.denoiser.data[:16].clone()
    smooth = reference_eps(True)

    def wiggly(x, t):
        return smooth(x, t) + 1e-3 * torch.sin(t).reshape(-1, 1, 1, 1)

    kw = {"progress": False, "batch_size": 16}

    def integral_of_b(ems):
        return _cumtrapz(ems.b, ems.lambdas)  # the sampler's own trapezoid integral

    def wiggle_effect(derivatives):
        with_wiggle = compute_ems(wiggly, x0, {}, 40, derivatives=derivatives, **kw)
        without = compute_ems(smooth, x0, {}, 40, derivatives=derivatives, **kw)
        return float((integral_of_b(with_wiggle) - integral_of_b(without)).abs().max()), with_wiggle

    by_jvp, _ = wiggle_effect("jvp")
    by_grid, ems = wiggle_effect("grid")
    assert by_grid < 0.05 * by_jvp, (by_grid, by_jvp)
    half_cell = float(ems.lambdas[1] - ems.lambdas[0]) / 2
    assert ems.meta["derivatives"] == "grid" and ems.meta["fd_steps"] == [1e-4, pytest.approx(half_cell)]
    with pytest.raises(ValueError, match="fd_lambda_step"):
        compute_ems(smooth, x0, {}, 4, derivatives="grid", fd_lambda_step=1e-3, **kw)


def test_a_directory_with_only_guided_ems_warns_when_the_guidance_is_unknown(tmp_path, digits_ems, caplog):
    unguided = load_ems(digits_ems[0])
    EMS(unguided.l, unguided.s, unguided.b, unguided.lambdas, {**unguided.meta, "guidance": 7.5}).save(
        tmp_path / "model" / "guidance_7.5")
    with caplog.at_level("WARNING", logger="diffalign.samplers.dpm_solver_v3"):
        DPMSolverV3Scheduler(ems_path=str(tmp_path / "model"))
    assert "holds no unguided EMS" in caplog.text and "guidance 7.5" in caplog.text


SHIPPED_EMS = sorted(p.parent for p in (Path(diffalign.models.__file__).parent / "ems").glob("**/ems.safetensors"))


@pytest.mark.parametrize("directory", SHIPPED_EMS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_ems_are_used_by_their_model_out_of_the_box(directory):
    """Each shipped set matches its model (name, sample shape, schedule) and is what ``dpm-solver-v3`` samples with
    at that set's guidance: not the degenerated fallback, and close to it (both approximate the same ODE)."""
    model_dir = directory if directory.parent.name == "ems" else directory.parent
    ems = load_ems(directory)
    named = load_model(ems.meta["model"])
    assert model_dir.name == named.name.replace(":", "_")
    assert ems.sample_shape == tuple(named.sample_shape)
    guidance = float(ems.meta.get("guidance", 1.0))
    label = 1 if guidance != 1.0 else None
    kw = {"num_images": 2, "label": label, "guidance": guidance, "progress": False}
    with_ems = sample_images(named, "dpm-solver-v3", 8, **kw)
    plain = dict(named.sampler_overrides)
    named.sampler_overrides = {**plain, "dpm-solver-v3": {"degenerated": True}}
    try:
        degenerated = sample_images(named, "dpm-solver-v3", 8, **kw)
    finally:
        named.sampler_overrides = plain
    assert torch.isfinite(with_ems).all()
    diff = (with_ems - degenerated).abs().mean().item()
    assert 1e-4 < diff < 0.1, diff


def test_trajectories_follow_the_exact_guided_ode_with_second_order_error():
    named = load_model("reference:digits")
    lambdas = ems_lambdas(named.scheduler_config, 10)
    sigma = [math.exp(-float(lam)) for lam in lambdas]

    def error(substeps):
        states, labels = model_trajectories(named, 3, lambdas, 3.0, progress=False, substeps=substeps)
        assert states.shape == (11, 3, 1, 8, 8) and labels.tolist() == [0, 1, 2]
        exact = {j: solve_reference(named.model, states[0], sigma[0], sigma[j], labels, 3.0) for j in (5, 10)}
        return max(float((states[j] - e).abs().max()) for j, e in exact.items())

    coarse, fine = error(2), error(8)
    assert fine < 1e-2
    assert coarse / fine > 16 * 0.6, (coarse, fine)  # 4x the steps: ~16x smaller (second order)


def test_ems_from_trajectories(tmp_path):
    named = load_model("reference:digits")
    kw = dict(guidance=3.0, progress=False, out=tmp_path)
    ems = compute_model_ems(named, 8, 4, datapoints="trajectories", **kw)
    assert ems.meta["datapoints"] == "trajectories" and ems.meta["guidance"] == 3.0
    assert not (tmp_path / TRAJECTORY_FILE).exists()  # removed with the partial sums
    states, labels = model_trajectories(named, 8, ems.lambdas, 3.0, progress=False)
    eps_fn, config = model_eps_fn(named, 3.0), named.scheduler_config
    again = compute_ems(eps_fn, states[-1], config, 4, labels=labels, trajectories=states, progress=False)
    assert torch.allclose(again.l, ems.l) and torch.allclose(again.s, ems.s)  # the states are what is averaged
    samples = compute_model_ems(named, 8, 4, datapoints="samples", guidance=3.0, progress=False)
    assert not torch.allclose(samples.s, ems.s)
    with pytest.raises(ValueError, match=r"trajectories must have shape \[N \+ 1, K"):
        compute_ems(eps_fn, states[-1], config, 5, labels=labels, trajectories=states, progress=False)
    with pytest.raises(ValueError, match="datapoints"):
        compute_model_ems(named, 8, 4, datapoints="paths", progress=False)


def test_trajectories_are_kept_for_a_resumed_computation(tmp_path, monkeypatch):
    import diffalign.samplers.ems as ems_module

    named = load_model("reference:digits")
    kw = dict(guidance=3.0, datapoints="trajectories", out=tmp_path, progress=False)
    solves = []
    solve, compute = ems_module.model_trajectories, ems_module.compute_ems
    monkeypatch.setattr(ems_module, "model_trajectories", lambda *a, **k: solves.append(1) or solve(*a, **k))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ems_module, "compute_ems", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compute_model_ems(named, 8, 4, **kw)
    assert (tmp_path / TRAJECTORY_FILE).is_file() and len(solves) == 1
    with pytest.raises(KeyboardInterrupt):  # other settings: solved again
        compute_model_ems(named, 8, 4, **{**kw, "guidance": 2.0})
    assert len(solves) == 2
    monkeypatch.setattr(ems_module, "compute_ems", compute)
    ems = compute_model_ems(named, 8, 4, **{**kw, "guidance": 2.0})
    assert len(solves) == 2 and ems.meta["trajectory_seconds"] > 0
    assert not (tmp_path / TRAJECTORY_FILE).exists()

"""UniPC, DC-Solver and DualFast: agreement with diffusers, reduction oracles, convergence, calibration, errors."""

import functools
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import UniPCMultistepScheduler
from test_convergence import LU, observed_order

from diffalign.cli import build_parser, main
from diffalign.models import digits_reference_model
from diffalign.samplers import (
    SAMPLERS,
    DCSolverScheduler,
    DDIMScheduler,
    UniPCScheduler,
    dualfast_class,
    get_scheduler_class,
    make_scheduler,
    sample,
)
from diffalign.samplers.calibrate import calibrate_dc_ratios, exact_trajectory, fit_cpr, fit_cpr_files
from diffalign.samplers.dc_solver import cpr_predict, dynamic_compensation, load_cpr
from diffalign.samplers.unipc import unipc_rhos

MODEL = digits_reference_model()
X64 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
BASES = sorted(n for n in SAMPLERS if not n.startswith("dualfast:"))


@functools.lru_cache
def v_model(betas: tuple) -> object:
    return digits_reference_model(dict(betas), prediction_type="v_prediction")


# ------------------------------------------------------------------------------------------------ UniPC
DIFFUSERS_CASES = [
    ({"solver_order": 2}, "eps"),
    ({"solver_order": 3}, "eps"),
    ({"solver_order": 2, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, "eps"),
    ({"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, "v"),
    ({"solver_order": 2, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, "v"),
    ({"solver_order": 3, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, "v"),
    ({"solver_order": 2, "predict_x0": False, "final_sigmas_type": "sigma_min"}, "eps"),
    ({"solver_order": 2, "disable_corrector": [0, 3], "lower_order_final": False, "final_sigmas_type": "sigma_min"},
     "eps"),
]


def _model_for(config, kind):
    if kind == "v":
        betas = tuple(sorted((k, v) for k, v in config.items() if k.startswith("beta")))
        return v_model(betas), {"prediction_type": "v_prediction"}
    return MODEL, {}


@pytest.mark.parametrize("config, kind", DIFFUSERS_CASES)
def test_unipc_matches_diffusers_float32(config, kind):
    model, extra = _model_for(config, kind)
    x = X64.float()
    for steps in (6, 10):
        got = sample(UniPCScheduler(**config, **extra), model, x, steps)
        expected = sample(UniPCMultistepScheduler(**config, **extra), model, x, steps)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("config, kind", DIFFUSERS_CASES[:6])
def test_unipc_matches_diffusers_float64(config, kind):
    """diffusers' UniPC internals driven in float64 (its sigmas upcast) agree to rounding."""
    model, extra = _model_for(config, kind)
    theirs = UniPCMultistepScheduler(**config, **extra)
    theirs.set_timesteps(8)
    theirs.sigmas = theirs.sigmas.double()
    x = X64
    for t in theirs.timesteps:
        x = theirs.step(model(x, t), t, x).prev_sample
    got = sample(UniPCScheduler(**config, **extra), model, X64, 8)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, x, rtol=0, atol=1e-10)


def test_unipc_bh1_and_noise_prediction_last_step_to_zero_is_finite():
    """diffusers 0.42.1 gives NaN here (B(h) * 0 with h = inf at sigma = 0); ours takes a first-order last step."""
    for config in ({"solver_type": "bh1"}, {"predict_x0": False}):
        assert torch.isnan(sample(UniPCMultistepScheduler(**config), MODEL, X64.float(), 6)).any()
        ours = sample(UniPCScheduler(**config), MODEL, X64, 6)
        ref = sample(UniPCScheduler(**config, final_sigmas_type="sigma_min"), MODEL, X64, 6)
        assert torch.isfinite(ours).all() and (ours - ref).abs().max() < 0.5


def test_unipc_rho_systems():
    # as h -> 0 (bh2) g_k / B(h) -> k! phi_{k+1}(0) = (1/2, 1/3): UniP-3 at equal steps (r = -1, -2) solves that
    rho = unipc_rhos([-1.0, -2.0], 1e-4, "bh2", corrector=False)
    np.testing.assert_allclose(np.array([[1, 1], [-1, -2]]) @ rho, [0.5, 1 / 3], atol=1e-3)
    assert unipc_rhos([], -0.3, "bh1", corrector=False) == []
    assert unipc_rhos([], -0.3, "bh1", corrector=True) == [0.5]


def test_unipc_convergence_order():
    """Lambda-uniform grids (see tests/test_convergence.py for why): UniPC-2 converges at order 3 (UniC raises
    UniP-2's order by one; measured: UniPC-2 2.91, UniP-2 alone 1.92, UniPC-1 1.96 over 40-160 steps)."""
    slope = observed_order(lambda: UniPCScheduler(solver_order=2, **LU), (40, 80, 160))
    assert 3 - 0.3 <= slope < 3.7, slope


# ------------------------------------------------------------------------------------------------ DC-Solver
DC_CONFIGS = [{}, {"solver_order": 3, "solver_type": "bh1"}, {"predict_x0": False},
              {"use_corrector": False}, {"disable_corrector": [0]}, {"lower_order_final": False}]


@pytest.mark.parametrize("config", DC_CONFIGS)
def test_dc_solver_with_unit_ratios_is_unipc_exactly(config, tmp_path):
    path = tmp_path / "ones.json"
    path.write_text(json.dumps([1.0] * 7))
    expected = sample(UniPCScheduler(**config), MODEL, X64, 7)
    for dc in (DCSolverScheduler(**config), DCSolverScheduler(dc_ratios_path=str(path), **config)):
        torch.testing.assert_close(sample(dc, MODEL, X64, 7), expected, rtol=0, atol=0)
    # the differentiable path (a tensor ratio of 1, as in calibration) is exact too
    dc = DCSolverScheduler(**config)
    dc.set_timesteps(7)
    dc.dc_ratios_list = [torch.tensor(1.0, dtype=torch.float64)] * 7
    x = X64
    for t in dc.timesteps:
        x = dc.step(MODEL(x, t), t, x).prev_sample
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_dc_ratios_change_the_trajectory_and_predictor_only_variant():
    ratios = [1.0, 1.0, 1.1, 0.9, 1.05, 1.0, 1.0]
    for config in ({}, {"use_corrector": False}):
        base = sample(UniPCScheduler(**config), MODEL, X64, 7)
        dc = sample(DCSolverScheduler(dc_ratios=ratios, **config), MODEL, X64, 7)
        assert 1e-4 < (dc - base).abs().max() < 1.0


def test_dynamic_compensation_is_lagrange_interpolation_in_time():
    times = [999.0, 799.0, 599.0]
    f = lambda t: torch.full((2,), 0.3 + 1e-3 * t - 2e-6 * t * t)  # noqa: E731
    outs = [f(t) for t in times]
    for rho in (0.0, 0.7, 1.0, 1.3):
        t_query = times[-2] + rho * (times[-1] - times[-2])
        torch.testing.assert_close(dynamic_compensation(outs, times, rho, 2), f(t_query))
    rho = torch.tensor(1.2, requires_grad=True)
    dynamic_compensation(outs, times, rho, 2).sum().backward()
    assert rho.grad is not None and rho.grad != 0


def test_dc_solver_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DCSolverScheduler(dc_ratios_path=str(tmp_path / "missing.json"))
    path = tmp_path / "r.json"
    path.write_text(json.dumps([1.0, 1.0, 1.1, 0.9, 1.0, 1.0]))
    sched = DCSolverScheduler(dc_ratios_path=str(path))
    with pytest.raises(ValueError, match="ratios for 6 steps, not for 5 steps"):
        sched.set_timesteps(5)
    with pytest.raises(ValueError, match="too small"):
        sched.set_timesteps(2)
    with pytest.raises(ValueError, match="has 3 ratios but the sampler runs 5"):
        DCSolverScheduler(dc_ratios=[1.0, 1.0, 1.0]).set_timesteps(5)
    with pytest.raises(ValueError, match="too small"):
        cpr_predict(np.zeros(36), 2, 7.5)
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"format": "diffalign-dc-ratios", "entries": [
        {"nfe": 5, "guidance": 7.5, "ratios": [1, 1, 1.1, 1, 1], "config": {"solver_order": 3}}]}))
    with pytest.raises(ValueError, match="calibrated with solver_order=3"):
        DCSolverScheduler(dc_ratios_path=str(table), guidance_scale=7.5).set_timesteps(5)
    with pytest.raises(ValueError, match="guidance 7.5, not for 5 steps / guidance 2.0"):
        DCSolverScheduler(dc_ratios_path=str(table), guidance_scale=2.0).set_timesteps(5)
    with pytest.raises(ValueError, match="too small"):
        calibrate_dc_ratios(DCSolverScheduler(), MODEL, X64, 2, [X64] * 3)


# ------------------------------------------------------------------------------------------------ calibration
def test_calibration_reduces_the_loss_on_the_closed_form_model():
    model = digits_reference_model()
    labels = torch.arange(3)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sched = DCSolverScheduler(guidance_scale=5.0)
    sched.set_timesteps(5)
    truth = exact_trajectory(model, sched, x_T, labels, 5.0, tol=1e-7)
    result = calibrate_dc_ratios(sched, lambda x, t: model.guided(x, t, labels, 5.0), x_T, 5, truth, iters=12)
    assert result.ratios[:2] == [1.0, 1.0] and len(result.ratios) == 5
    assert sum(result.loss_final) < sum(result.loss_initial)
    assert result.seconds < 30
    # the calibrated ratios, used by the scheduler alone (no model in step()), reproduce the calibrated run
    plain = DCSolverScheduler(guidance_scale=5.0, dc_ratios=result.ratios)
    out = sample(plain, lambda x, t: model.guided(x, t, labels, 5.0), x_T, 5)
    ones = sample(DCSolverScheduler(), lambda x, t: model.guided(x, t, labels, 5.0), x_T, 5)
    assert torch.mean((out - truth[-1]) ** 2) < torch.mean((ones - truth[-1]) ** 2)



def test_calibration_on_an_explicit_grid_compensates_that_grid():
    model, grid = digits_reference_model(), [80.0, 12.0, 3.0, 0.9, 0.25]
    fn = lambda x, t: model.guided(x, t, None, 1.0)  # noqa: E731
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sched = DCSolverScheduler()
    sched.set_timesteps(sigmas=grid)
    truth = exact_trajectory(model, sched, x_T, tol=1e-7)
    result = calibrate_dc_ratios(DCSolverScheduler(), fn, x_T, 5, truth, iters=12, sigmas=grid)
    assert len(result.ratios) == 5 and sum(result.loss_final) < sum(result.loss_initial)
    out = sample(DCSolverScheduler(dc_ratios=result.ratios), fn, x_T, sigmas=grid)
    ones = sample(DCSolverScheduler(), fn, x_T, sigmas=grid)
    assert torch.mean((out - truth[-1]) ** 2) < torch.mean((ones - truth[-1]) ** 2)

def test_calibration_nan_loss_stops_with_a_clear_message():
    sched = DCSolverScheduler()
    sched.set_timesteps(4)
    truth = [X64] + [torch.full_like(X64, float("nan"))] * 4
    with pytest.raises(FloatingPointError, match="calibration loss is nan at step 2"):
        calibrate_dc_ratios(sched, MODEL, X64, 4, truth, iters=2)


def test_cpr_fit_reproduces_its_training_points(tmp_path):
    rng = np.random.default_rng(0)
    coeffs = rng.normal(scale=0.1, size=36)
    entries = [{"nfe": n, "guidance": g, "ratios": cpr_predict(coeffs, n, g)}
               for n in (5, 6, 8, 10, 12) for g in (1.0, 4.0, 7.5)]
    cpr = fit_cpr(entries)
    assert cpr["max_abs_residual"] < 1e-8 and cpr["rank"] == 36
    for e in entries:
        np.testing.assert_allclose(cpr_predict(np.array(cpr["coeffs"]), e["nfe"], e["guidance"]), e["ratios"],
                                   atol=1e-8)
    # through files and the CLI, and as the scheduler's source of ratios for an unseen configuration
    table = tmp_path / "ratios.json"
    table.write_text(json.dumps({"format": "diffalign-dc-ratios", "entries": entries}))
    assert main(["calibrate", "cpr", "--inputs", str(table), "--out", str(tmp_path / "cpr.json")]) == 0
    loaded, fixed = load_cpr(tmp_path / "cpr.json")
    sched = DCSolverScheduler(cpr_path=str(tmp_path / "cpr.json"), guidance_scale=6.0)
    sched.set_timesteps(7)
    np.testing.assert_allclose(sched.dc_ratios_list, cpr_predict(coeffs, 7, 6.0), atol=1e-8)
    assert fit_cpr_files([table], tmp_path / "again.json")["num_points"] == sum(e["nfe"] - 2 for e in entries)


def test_calibrate_cli_parses_the_documented_options():
    args = build_parser().parse_args(["calibrate", "dc-solver", "--model", "reference:digits", "--steps", "5",
                                      "--guidance", "7.5", "--num-datapoints", "10", "--out", "r.json", "--iters",
                                      "40", "--lr", "0.1", "--bound", "tanh"])
    assert (args.steps, args.guidance, args.num_datapoints, args.iters, args.lr, args.bound) == (5, 7.5, 10, 40, 0.1,
                                                                                                  "tanh")
    assert main(["calibrate", "dc-solver", "--steps", "2", "--out", "never.json"]) == 2  # NFE too small


def test_shipped_ratios_for_reference_digits_are_picked_up_by_the_bench_config():
    from diffalign.models.registry import load_model

    named = load_model("reference:digits")
    overrides = named.sampler_overrides["dc-solver"]
    for guidance in (1.0, 7.5):
        for nfe in (5, 6, 8, 10):
            sched = make_scheduler("dc-solver", {**named.scheduler_config, **overrides}, guidance_scale=guidance)
            sched.set_timesteps(nfe)
            assert sched.dc_ratios_list[:2] == [1.0, 1.0] and any(r != 1.0 for r in sched.dc_ratios_list)
    sched = make_scheduler("dc-solver", {**named.scheduler_config, **overrides}, guidance_scale=3.0)
    sched.set_timesteps(7)  # not calibrated: predicted by the shipped CPR
    assert len(sched.dc_ratios_list) == 7


# ------------------------------------------------------------------------------------------------ DualFast
@pytest.mark.parametrize("base", BASES)
def test_dualfast_with_zero_coefficient_is_the_base_sampler_exactly(base):
    expected = sample(make_scheduler(base), MODEL, X64, 8)
    for schedule in ("first-order", "linear", "step-scaled", "constant"):
        got = sample(make_scheduler(f"dualfast:{base}", dualfast_scale=0.0, dualfast_schedule=schedule), MODEL,
                     X64, 8)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(sample(make_scheduler(f"dualfast:{base}", dualfast_schedule="linear"), MODEL, X64, 8),
                           expected)
    default = sample(make_scheduler(f"dualfast:{base}"), MODEL, X64, 8)
    if base == "ddim":  # the default mixes on first-order bases only ...
        assert not torch.equal(default, expected)
    else:  # ... and is the identity on bases of order >= 2
        torch.testing.assert_close(default, expected, rtol=0, atol=0)


@pytest.mark.parametrize("reference", ["previous", "first"])
def test_dualfast_ddim_step_is_ddim_with_the_mixed_noise_prediction(reference):
    c = 0.4
    sched = make_scheduler("dualfast:ddim", dualfast_scale=c, dualfast_schedule="constant",
                           dualfast_reference=reference)
    ref = DDIMScheduler()
    sched.set_timesteps(5)
    ref.set_timesteps(5)
    x, x_ref, prev = X64, X64, None
    for t in sched.timesteps:
        eps = MODEL(x, t)
        mixed = eps if prev is None else (1 + c) * eps - c * prev
        x_next = sched.step(eps, t, x).prev_sample
        x_ref = ref.step(mixed, t, x).prev_sample
        torch.testing.assert_close(x_next, x_ref, rtol=0, atol=1e-12)
        x = x_next
        prev = eps if reference == "previous" or prev is None else prev
    assert sched.dualfast_coefficient(0) == c  # the first step has no cached prediction and is plain DDIM


# sum and sum of squares of sample(dualfast:<base>, MODEL, X64, 8) with the paper's ramp, from the version whose
# default it was; compared to 1e-7 relative, above float rounding that differs between CPUs (3e-9 seen) and far below
# what any change of the update does
PAPER_READING_OUTPUTS = {"dpm-solver++": (-99.75874270942693, 210.1211321832703),
                         "unipc": (-99.501311772264, 211.42532300816595)}


@pytest.mark.parametrize("base", sorted(PAPER_READING_OUTPUTS))
def test_dualfast_paper_reading_stays_selectable_and_reproduces_its_old_outputs(base):
    """``dualfast_schedule="linear"``: the base fed eps~ = (1 + c_i) eps_i - c_i eps_(i-1), c_i = 0.15 i / (N - 1)."""
    sched = make_scheduler(f"dualfast:{base}", dualfast_schedule="linear")
    got = sample(sched, MODEL, X64, 8)
    total, squares = PAPER_READING_OUTPUTS[base]
    assert got.sum().item() == pytest.approx(total, rel=1e-7)
    assert got.square().sum().item() == pytest.approx(squares, rel=1e-7)
    ref = make_scheduler(base)
    ref.set_timesteps(8)
    x, prev = X64, None
    for i, t in enumerate(ref.timesteps):
        eps = MODEL(x, t)
        c = 0.15 * i / 7
        x = ref.step(eps if prev is None else (1 + c) * eps - c * prev, t, x).prev_sample
        prev = eps
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)


def test_dualfast_schedules_and_base_orders():
    orders = {"ddim": 1, "dpm-solver++": 2, "unipc": 3, "dc-solver": 3, "dpm-solver": 3, "pndm": 2}
    for base, p in orders.items():
        assert make_scheduler(f"dualfast:{base}").dualfast_base_order() == p, base
    assert make_scheduler("dualfast:unipc", use_corrector=False).dualfast_base_order() == 2
    assert make_scheduler("dualfast:dpm-solver++", solver_order=1).dualfast_base_order() == 1
    ddim, dpm = make_scheduler("dualfast:ddim"), make_scheduler("dualfast:dpm-solver++")
    linear = make_scheduler("dualfast:dpm-solver++", dualfast_schedule="linear")
    scaled = make_scheduler("dualfast:dpm-solver++", dualfast_schedule="step-scaled")
    for s in (ddim, dpm, linear, scaled):
        s.set_timesteps(6)
        assert s.config.dualfast_scale == 0.15 and s.config.dualfast_reference == "previous"
    ramp = [0.15 * i / 5 for i in range(6)]
    assert ddim.config.dualfast_schedule == "first-order"
    assert [ddim.dualfast_coefficient(i) for i in range(6)] == pytest.approx(ramp)  # first order: the paper's ramp
    assert [dpm.dualfast_coefficient(i) for i in range(6)] == [0.0] * 6  # order >= 2: identity
    assert [linear.dualfast_coefficient(i) for i in range(6)] == pytest.approx(ramp)
    lam = [lvl.lambda_ for lvl in scaled.noise_levels[:6]]  # ramp x (h_i / H)^(p - 1), p = 2
    expected = [0.0] + [ramp[i] * (lam[i] - lam[i - 1]) / (lam[-1] - lam[0]) for i in range(1, 6)]
    assert [scaled.dualfast_coefficient(i) for i in range(6)] == pytest.approx(expected)


@pytest.mark.parametrize("base, order", [("dpm-solver++", 2), ("unipc", 3)])
def test_dualfast_default_keeps_the_convergence_order_the_paper_ramp_breaks(base, order):
    """Lambda-uniform grids, NFE 40-160 (see tests/test_convergence.py): the default (identity on these bases) and the
    ``step-scaled`` schedule keep the base's slope; the paper's ramp (c -> 0.15 at every NFE) falls to first order."""
    slope = {s: observed_order(lambda s=s: make_scheduler(base if s is None else f"dualfast:{base}", **LU,
                                                          **({} if s in (None, "default") else
                                                             {"dualfast_schedule": s})), (40, 80, 160))
             for s in (None, "default", "step-scaled", "linear")}
    assert abs(slope[None] - order) < 0.3, slope
    assert abs(slope["default"] - slope[None]) < 0.3 and abs(slope["step-scaled"] - slope[None]) < 0.3, slope
    assert slope["linear"] < 1.3, slope


def test_dualfast_registry_classes_round_trip_and_generic_wrapping(tmp_path):
    cls = get_scheduler_class("dualfast:dpm-solver++")
    assert cls is dualfast_class(get_scheduler_class("dpm-solver++")) and cls.__name__.startswith("DualFast")
    sched = cls(dualfast_scale=0.3, dualfast_schedule="constant", dualfast_space="x0", solver_order=3)
    sched.save_config(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert (again.config.dualfast_scale, again.config.dualfast_space, again.config.solver_order) == (0.3, "x0", 3)
    torch.testing.assert_close(sample(again, MODEL, X64, 6), sample(sched, MODEL, X64, 6), rtol=0, atol=0)

    class MyDDIM(DDIMScheduler):  # any DiffAlignScheduler subclass, e.g. one added later
        pass

    wrapped = dualfast_class(MyDDIM)
    torch.testing.assert_close(sample(wrapped(dualfast_scale=0.0), MODEL, X64, 5),
                               sample(MyDDIM(), MODEL, X64, 5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="DiffAlignScheduler"):
        get_scheduler_class("dualfast:diffusers:DDIMScheduler")
    with pytest.raises(ValueError, match="DiffAlignScheduler"):
        dualfast_class(DiffusersDDIM)
    with pytest.raises(ValueError, match="dualfast_schedule"):
        cls(dualfast_schedule="cosine")
    with pytest.raises(ValueError, match="dualfast_reference"):
        cls(dualfast_reference="last")


def test_cpr_does_not_extrapolate_outside_its_calibrated_configurations():
    import warnings as _warnings

    from diffalign.models.registry import shipped_overrides
    from diffalign.samplers import make_scheduler as _make

    files = shipped_overrides("reference:digits")["dc-solver"]
    dc = _make("dc-solver", cpr_path=files["cpr_path"], guidance_scale=7.5)
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        dc.set_timesteps(20)  # calibrated on NFE 5-10 only
    assert any("does not extrapolate" in str(w.message) for w in caught)
    assert dc.dc_ratios_list == [1.0] * 20
    dc.set_timesteps(7)  # inside the fitted range: predicted ratios
    assert dc.dc_ratios_list[:2] == [1.0, 1.0] and any(r != 1.0 for r in dc.dc_ratios_list)

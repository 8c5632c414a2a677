"""Conformance of every diffalign scheduler with diffusers' scheduler contract and with diffusers' own schedulers."""

import functools
import inspect
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler
from diffusers import PNDMScheduler as DiffusersPNDM

from diffalign.models import digits_reference_model
from diffalign.samplers import SAMPLERS, get_scheduler_class, make_scheduler
from diffalign.samplers.base import singlestep_orders

NAMES = sorted(SAMPLERS)
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SD_PNDM = {**SD_BETAS, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}
"""Stable Diffusion v1's scheduler config (PNDMScheduler, "leading" spacing)."""
SIGMA_KINDS = ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"]
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                 "timestep_spacing", "steps_offset")
X_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
X0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
NOISE = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
RGB = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def linear_model(x, t):
    """diffusers' dummy model: the sample times t / (t + 1)."""
    t = float(t)
    return x * (t / (t + 1.0))


@functools.lru_cache
def digits(prediction_type="epsilon", **schedule):
    """The closed-form digits model (exact predictions) for a noise schedule."""
    return digits_reference_model(schedule, prediction_type=prediction_type)


def betas_of(config) -> dict:
    return {k: config[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps",
                                   "rescale_betas_zero_snr") if k in config}


def ours(name, config=None, **overrides):
    """A diffalign scheduler; DualFast wrappers with c = 0, where they must reproduce their base sampler."""
    if name.startswith("dualfast:"):
        overrides.setdefault("dualfast_scale", 0.0)
    return make_scheduler(name, config or {}, **overrides)


def run(sched, model, x, steps=None, start=0):
    """Full loop (from grid point ``start``; on the grid already set unless ``steps``) with seeded noise, for
    diffusers' and diffalign's schedulers alike."""
    if steps is not None:
        sched.set_timesteps(steps)
    kwargs = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(
        sched.step).parameters else {}
    for t in sched.timesteps[start:]:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
    return x


def assert_loops_agree(got, expected, tol=1e-4):
    assert torch.isfinite(expected).all(), "the diffusers reference itself is not finite"
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


# ================================================================================== public API and step()
@pytest.mark.parametrize("name", NAMES)
def test_init_noise_sigma_is_one_order_is_an_int_and_scale_model_input_returns_its_input(name):
    sched = make_scheduler(name)
    assert isinstance(sched.order, int) and sched.order >= 1
    assert sched.init_noise_sigma == 1.0
    assert torch.equal(sched.scale_model_input(RGB, 0.0), RGB)
    sched.set_timesteps(10)
    assert sched.init_noise_sigma == 1.0
    for t in sched.timesteps:
        scaled = sched.scale_model_input(RGB, t)
        assert scaled.dtype == RGB.dtype and torch.equal(scaled, RGB)


@pytest.mark.parametrize("thresholding", [False, True], ids=["plain", "thresholded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_step_keeps_shape_and_dtype_through_a_full_loop(name, dtype, thresholding):
    config = {"thresholding": True, "dynamic_thresholding_ratio": 0.0} if thresholding else {}  # diffusers' fp16 test
    sched = make_scheduler(name, config)
    sched.set_timesteps(10)
    x = RGB.to(dtype)
    for t in sched.timesteps:
        out = sched.step(linear_model(x, t), t, x).prev_sample
        assert out.shape == x.shape and out.dtype == dtype
        x = out
    assert torch.isfinite(x.float()).all()


@pytest.mark.parametrize("name", NAMES)
def test_return_dict_false_gives_a_tuple_holding_the_same_sample(name):
    with_dict, with_tuple = make_scheduler(name), make_scheduler(name)
    with_dict.set_timesteps(8)
    with_tuple.set_timesteps(8)
    x = RGB
    for t in with_dict.timesteps:
        out = linear_model(x, t)
        expected = with_dict.step(out, t, x).prev_sample
        got = with_tuple.step(out, t, x, return_dict=False)
        assert isinstance(got, tuple)
        assert torch.equal(got[0], expected)
        x = expected


@pytest.mark.parametrize("name", NAMES)
def test_unknown_constructor_arguments_raise_type_error(name):
    with pytest.raises(TypeError, match="clip_smaple"):
        get_scheduler_class(name)(clip_smaple=True)


@pytest.mark.parametrize("name", NAMES)
def test_init_takes_no_catch_all_keyword_arguments_unless_it_declares_deprecated_ones(name):
    cls = get_scheduler_class(name)
    params = inspect.signature(cls.__init__).parameters.values()
    catch_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    assert catch_all == bool(cls._deprecated_kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_config_attributes_warn_when_read_as_attributes_and_missing_attributes_raise(name):
    sched = make_scheduler(name)
    sched.dummy_attribute = 5
    assert sched.dummy_attribute == 5
    sched.register_to_config(test_attribute=5)
    with pytest.warns(FutureWarning):
        assert sched.test_attribute == 5
    with pytest.raises(AttributeError, match="does_not_exist"):
        sched.does_not_exist  # noqa: B018


# ================================================================================== config round trips
SHARED_VARIANTS = {
    "defaults": {},
    "100_train_timesteps": {"num_train_timesteps": 100},
    "v_prediction": {"prediction_type": "v_prediction"},
    "sample_prediction_thresholded": {"prediction_type": "sample", "thresholding": True, "sample_max_value": 0.5},
    "sd_betas_leading_offset": {**SD_BETAS, "timestep_spacing": "leading", "steps_offset": 1},
    "cosine_betas_trailing": {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"},
    "zero_snr_trailing_v": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                            "prediction_type": "v_prediction"},
    "karras_sigma_min": {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    "exponential_sigmas": {"use_exponential_sigmas": True},
    "beta_sigmas": {"use_beta_sigmas": True},
    "lu_lambdas": {"use_lu_lambdas": True},
    "lambda_min_clipped": {"lambda_min_clipped": -5.1},
    "learned_range_variance": {"variance_type": "learned_range"},
}
OWN_VARIANTS = [
    ("ddim", {"eta": 0.5}),
    ("dpm-solver", {"solver_order": 2}),
    ("dpm-solver", {"solver_mode": "multistep", "solver_order": 3, "solver_type": "midpoint"}),
    ("dpm-solver", {"solver_mode": "multistep", "lower_order_final": False, "euler_at_final": True}),
    ("dpm-solver++", {"solver_order": 3, "solver_type": "heun", "lower_order_final": False}),
    ("dpm-solver++", {"solver_order": 1}),
    ("dpm-solver++", {"solver_mode": "singlestep", "solver_order": 3}),
    ("dpm-solver++", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpm-solver++", {"third_order_form": "taylor", "solver_order": 3}),
    ("dpm-solver-v3", {"degenerated": True, "solver_order": 3, "predictor_pseudo": True}),
    ("dpm-solver-v3", {"use_corrector": False, "half_corrector": True}),
    ("pndm", {"warmup": "f-pndm"}),
    ("pndm", {"warmup": "plms"}),
    ("unipc", {"solver_order": 3, "solver_type": "bh1"}),
    ("unipc", {"predict_x0": False, "disable_corrector": [0, 2]}),
    ("unipc", {"use_corrector": False, "lower_order_final": False}),
    ("dc-solver", {"dc_order": 1, "solver_order": 3}),
]
ROUND_TRIP_CASES = [pytest.param(n, cfg, id=f"{n}-{key}") for n in NAMES for key, cfg in SHARED_VARIANTS.items()]
ROUND_TRIP_CASES += [pytest.param(prefix + n, cfg, id=f"{prefix}{n}-{'-'.join(f'{k}={v}' for k, v in cfg.items())}")
                     for n, cfg in OWN_VARIANTS for prefix in ("", "dualfast:")]
ROUND_TRIP_CASES += [pytest.param("dualfast:ddim", {"dualfast_scale": 0.3, "dualfast_schedule": "constant"},
                                  id="dualfast:ddim-constant"),
                     pytest.param("dualfast:unipc", {"dualfast_space": "x0", "dualfast_reference": "first"},
                                  id="dualfast:unipc-x0-first")]


def first_steps(sched, steps=8):
    """A seeded full loop with diffusers' dummy model (learned-variance outputs get the extra channels)."""
    sched.set_timesteps(steps)
    learned = sched.config.get("variance_type") in ("learned", "learned_range")
    generator = torch.Generator().manual_seed(0)
    x = RGB
    for t in sched.timesteps:
        out = linear_model(x, t)
        if learned:
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        x = sched.step(out, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize(("name", "config"), ROUND_TRIP_CASES)
def test_save_config_then_from_pretrained_gives_the_same_config_and_identical_steps(name, config, tmp_path):
    sched = make_scheduler(name, config)
    sched.save_config(tmp_path)
    again = get_scheduler_class(name).from_pretrained(tmp_path)
    assert type(again) is type(sched)
    assert public(again.config) == public(sched.config)
    torch.testing.assert_close(first_steps(again), first_steps(sched), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "config"), ROUND_TRIP_CASES)
def test_from_config_of_its_own_config_gives_the_same_config_and_identical_steps(name, config):
    sched = make_scheduler(name, config)
    again = get_scheduler_class(name).from_config(sched.config)
    assert type(again) is type(sched)
    assert public(again.config) == public(sched.config)
    torch.testing.assert_close(first_steps(again), first_steps(sched), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_round_trip_keeps_every_config_entry(name, tmp_path):
    sched = make_scheduler(name, {**SD_BETAS, "prediction_type": "v_prediction"})
    sched.save_pretrained(tmp_path)
    again = get_scheduler_class(name).from_pretrained(tmp_path)
    expected = dict(sched.config)
    expected.pop("_use_default_values", None)
    assert dict(again.config) == expected


@pytest.mark.parametrize("name", NAMES)
def test_trained_betas_survive_save_and_load_and_equal_the_named_schedule(name, tmp_path):
    trained = get_scheduler_class(name)(trained_betas=np.linspace(0.0001, 0.02, 1000))
    trained.save_pretrained(tmp_path)
    again = get_scheduler_class(name).from_pretrained(tmp_path)
    assert again.betas.tolist() == trained.betas.tolist()
    torch.testing.assert_close(trained.betas, make_scheduler(name).betas)
    torch.testing.assert_close(first_steps(again), first_steps(make_scheduler(name)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 50, 100, 999, 1000])
@pytest.mark.parametrize("name", NAMES)
def test_every_step_count_either_works_identically_after_a_round_trip_or_is_refused_by_name(name, steps):
    sched = make_scheduler(name)
    again = get_scheduler_class(name).from_config(sched.config)
    try:
        sched.set_timesteps(steps)
    except ValueError as err:
        assert "num_inference_steps" in str(err)
        return
    again.set_timesteps(steps)
    assert len(sched.timesteps) >= steps and torch.equal(sched.timesteps, again.timesteps)
    t = sched.timesteps[0]
    a, b = sched.step(linear_model(RGB, t), t, RGB).prev_sample, again.step(linear_model(RGB, t), t, RGB).prev_sample
    assert torch.equal(a, b) and torch.isfinite(a).all()


@pytest.mark.parametrize("name", NAMES)
def test_as_many_steps_as_training_timesteps_run_on_distinct_levels_or_are_refused_with_the_largest_count(name):
    """diffusers repeats integer timesteps there and its DPM-Solver and UniPC loops turn NaN; diffalign either
    runs on distinct noise levels or refuses, naming the largest step count that works, which then runs."""
    sched = make_scheduler(name, num_train_timesteps=100)
    try:
        sched.set_timesteps(100)
    except ValueError as err:
        largest = int(re.search(r"use at most (\d+) steps", str(err)).group(1))
        assert largest < 100
        sched.set_timesteps(largest)
    levels = [lvl.lambda_ for lvl in sched.noise_levels]
    assert all(b >= a for a, b in zip(levels, levels[1:], strict=False))  # PNDM's warm-up repeats points on purpose
    x = RGB.double()
    for t in sched.timesteps:
        x = sched.step(linear_model(x, t), t, x).prev_sample
    assert torch.isfinite(x).all()


CUSTOM_TIMESTEP_CASES = [pytest.param(n, {"solver_mode": "multistep"} if n.endswith("dpm-solver") else {}, id=n)
                         for n in NAMES]


@pytest.mark.parametrize(("name", "config"), CUSTOM_TIMESTEP_CASES)
def test_custom_timesteps_equal_to_the_default_grid_give_the_same_loop(name, config):
    default = make_scheduler(name, config)
    default.set_timesteps(10)
    grid = list(dict.fromkeys(default.timesteps.tolist()))  # PNDM's warm-up repeats grid points
    custom = make_scheduler(name, config)
    custom.set_timesteps(timesteps=grid)
    assert custom.timesteps.tolist() == default.timesteps.tolist()
    model = digits()
    torch.testing.assert_close(run(custom, model, X_T), run(default, model, X_T), rtol=0, atol=1e-6)


# ================================================================================== add_noise
BETAS = {"linear": {}, "scaled_linear": SD_BETAS, "cosine": {"beta_schedule": "squaredcos_cap_v2"}}


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("name", NAMES)
def test_add_noise_at_grid_timesteps_is_alpha_x0_plus_sigma_noise_as_ddpm(name, betas):
    sched, ddpm = make_scheduler(name, BETAS[betas]), DDPMScheduler(**BETAS[betas])
    sched.set_timesteps(10)
    for k, t in enumerate(sched.timesteps):
        got = sched.add_noise(X0, NOISE, t.reshape(1))
        level = sched.noise_levels[k]
        torch.testing.assert_close(got, level.alpha * X0 + level.sigma * NOISE, rtol=1e-5, atol=1e-5)
        if float(t).is_integer():
            expected = ddpm.add_noise(X0, NOISE, t.long().reshape(1))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    batch = sched.timesteps[[0, len(sched.timesteps) // 2]]
    if all(float(t).is_integer() for t in batch):  # one timestep per sample
        torch.testing.assert_close(sched.add_noise(X0, NOISE, batch), ddpm.add_noise(X0, NOISE, batch.long()),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_before_set_timesteps_uses_the_training_noise_levels_as_ddpm(name):
    """Training code calls add_noise without set_timesteps; timestep t must mean alphas_cumprod[t]."""
    timesteps = torch.tensor([0, 10, 500, 999])
    x0, noise = X0.repeat(2, 1, 1, 1), NOISE.repeat(2, 1, 1, 1)
    expected = DDPMScheduler().add_noise(x0, noise, timesteps)
    torch.testing.assert_close(make_scheduler(name).add_noise(x0, noise, timesteps), expected, rtol=1e-5, atol=1e-5)


# ================================================================================== grids
def grid_pairs():
    """(name, our overrides, diffusers class, its kwargs): the same sampler with the same grid."""
    pairs = [
        ("ddim", {}, DiffusersDDIM, {"set_alpha_to_one": True}),
        ("dpm-solver++", {}, DPMSolverMultistepScheduler, {}),
        ("dpm-solver", {"solver_mode": "multistep", "final_sigmas_type": "sigma_min"}, DPMSolverMultistepScheduler,
         {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
        ("dpm-solver-v3", {}, DPMSolverMultistepScheduler, {}),
        ("unipc", {}, UniPCMultistepScheduler, {}),
        ("dc-solver", {}, UniPCMultistepScheduler, {}),
        ("pndm", {"warmup": "plms", "discrete_timesteps": True}, DiffusersPNDM,
         {"skip_prk_steps": True, "set_alpha_to_one": True}),
    ]
    out = []
    for name, mine, cls, theirs in pairs:
        for prefix in ("", "dualfast:"):
            out.append(pytest.param(prefix + name, mine, cls, theirs, id=f"{prefix}{name}-vs-{cls.__name__}"))
    return out


LINSPACE_DIFFERS = ("diffusers' DDIM/PNDM 'linspace' grid is linspace(0, T-1, n) ending at t=0, and each step goes to "
                    "t - T//n, not to the next grid point; diffalign's steps land on the next point of the DPM-Solver "
                    "linspace grid")
GRID_SIZES = [pytest.param(1000, 10, id="T1000-n10"), pytest.param(1000, 7, id="T1000-n7"),
              pytest.param(100, 25, id="T100-n25")]


def assert_levels_are_training_levels(sched, theirs):
    """Each grid point's noise level is alphas_cumprod at its (integer) timestep; the last one is the final one."""
    ac = theirs.alphas_cumprod.double()
    for level, t in zip(sched.noise_levels, sched.timesteps.tolist(), strict=False):
        assert abs(level.alpha**2 - float(ac[round(t)])) <= 1e-5 * float(ac[round(t)]) + 1e-7, t
    if hasattr(theirs, "final_alpha_cumprod"):  # DDIM / PNDM
        assert abs(sched.noise_levels[-1].alpha ** 2 - float(theirs.final_alpha_cumprod)) < 1e-6
    else:
        torch.testing.assert_close(sched.sigmas[-1], theirs.sigmas[-1].to(sched.sigmas.dtype))


@pytest.mark.parametrize(("train", "steps"), GRID_SIZES)
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize(("name", "mine", "cls", "theirs_kw"), grid_pairs())
def test_timestep_grid_equals_the_diffusers_counterparts(name, mine, cls, theirs_kw, spacing, steps_offset, train,
                                                         steps):
    if spacing == "linspace" and cls in (DiffusersDDIM, DiffusersPNDM):
        pytest.skip(LINSPACE_DIFFERS)
    schedule = {"timestep_spacing": spacing, "steps_offset": steps_offset, "num_train_timesteps": train}
    sched, theirs = make_scheduler(name, schedule, **mine), cls(**schedule, **theirs_kw)
    sched.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert sched.timesteps.tolist() == theirs.timesteps.tolist()
    assert_levels_are_training_levels(sched, theirs)


@pytest.mark.parametrize(("train", "steps"), GRID_SIZES)
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", ["pndm", "dualfast:pndm"])
def test_f_pndm_evaluations_equal_diffusers_runge_kutta_then_plms_timesteps(name, spacing, steps_offset, train,
                                                                            steps):
    schedule = {"timestep_spacing": spacing, "steps_offset": steps_offset, "num_train_timesteps": train}
    sched = make_scheduler(name, schedule, warmup="f-pndm", discrete_timesteps=True)
    theirs = DiffusersPNDM(**schedule, skip_prk_steps=False)
    sched.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert sched.timesteps.tolist() == theirs.timesteps.tolist()


@pytest.mark.parametrize(("train", "steps"), GRID_SIZES)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("name", ["dpm-solver", "dpm-solver++", "dualfast:dpm-solver"])
def test_singlestep_group_starts_are_the_multistep_grid_for_that_many_groups(name, order, final, spacing, train,
                                                                             steps):
    """Singlestep solvers insert intermediate evaluations; the points where each group starts are diffusers'
    grid for the number of groups (DPMSolverSinglestepScheduler's own grid where it has the spacing)."""
    schedule = {"timestep_spacing": spacing, "num_train_timesteps": train, "final_sigmas_type": final}
    sched = make_scheduler(name, schedule, solver_mode="singlestep", solver_order=order)
    sched.set_timesteps(steps)
    groups = singlestep_orders(steps, order, final == "zero")
    starts = np.cumsum([0] + groups[:-1]).tolist()
    assert len(sched.timesteps) == steps
    theirs = DPMSolverMultistepScheduler(**schedule)
    theirs.set_timesteps(len(groups))
    assert [sched.timesteps[s].item() for s in starts] == theirs.timesteps.tolist()
    torch.testing.assert_close(sched.sigmas[starts + [steps]], theirs.sigmas)
    if spacing == "linspace":
        single = DPMSolverSinglestepScheduler(num_train_timesteps=train, final_sigmas_type=final)
        single.set_timesteps(len(groups))
        assert [sched.timesteps[s].item() for s in starts] == single.timesteps.tolist()
    assert (sched.sigmas[:-1] > sched.sigmas[1:]).all()


OFF_GRID_PAIRS = [
    ("dpm-solver++", {}, DPMSolverMultistepScheduler, {}),
    ("dpm-solver", {"solver_mode": "multistep"}, DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}),
    ("dpm-solver-v3", {}, DPMSolverMultistepScheduler, {}),
    ("unipc", {}, UniPCMultistepScheduler, {}),
    ("dualfast:unipc", {}, UniPCMultistepScheduler, {}),
]
OFF_GRID_CASES = [pytest.param(name, mine, cls, theirs, kind, id=f"{name}-vs-{cls.__name__}-{kind}")
                  for name, mine, cls, theirs in OFF_GRID_PAIRS for kind in SIGMA_KINDS
                  if kind in inspect.signature(cls.__init__).parameters]  # diffusers' UniPC has no use_lu_lambdas


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize(("name", "mine", "cls", "theirs_kw", "kind"), OFF_GRID_CASES)
def test_karras_exponential_beta_and_logsnr_grids_equal_diffusers(name, mine, cls, theirs_kw, kind, steps):
    schedule = {kind: True, "final_sigmas_type": "sigma_min"}
    theirs = cls(**schedule, **theirs_kw)
    theirs.set_timesteps(steps)
    discrete = make_scheduler(name, schedule, discrete_timesteps=True, **mine)
    discrete.set_timesteps(steps)
    assert discrete.timesteps.tolist() == theirs.timesteps.tolist()
    torch.testing.assert_close(discrete.sigmas, theirs.sigmas, rtol=1e-5, atol=1e-6)
    continuous = make_scheduler(name, schedule, **mine)
    continuous.set_timesteps(steps)
    torch.testing.assert_close(continuous.sigmas, theirs.sigmas, rtol=1e-5, atol=1e-6)
    assert (continuous.timesteps.double() - theirs.timesteps.double()).abs().max() <= 1.0


@pytest.mark.parametrize(
    "config",
    [{"use_flow_sigmas": True, "use_karras_sigmas": True},
     {"use_flow_sigmas": True, "use_karras_sigmas": True, "sigma_min": 0.01, "sigma_max": 200.0},
     {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}],
    ids=["flow-karras", "flow-karras-sigma-bounds", "karras-sigma-bounds"],
)
@pytest.mark.parametrize("name", ["unipc", "dc-solver", "dualfast:unipc"])
def test_unipc_karras_grid_honours_flow_sigmas_and_sigma_bounds_as_diffusers(name, config):
    theirs = UniPCMultistepScheduler(**config)
    theirs.set_timesteps(5)
    sched = make_scheduler(name, config)
    sched.set_timesteps(5)
    torch.testing.assert_close(sched.sigmas, theirs.sigmas, rtol=1e-5, atol=1e-6)
    # diffusers truncates model times to integers; ours are the exact (or, discrete_timesteps=True, rounded) times
    assert (sched.timesteps.double() - theirs.timesteps.double()).abs().max() <= 1.0
    if config.get("use_flow_sigmas"):
        model = digits_reference_model({"use_flow_sigmas": True}, prediction_type="flow_prediction")
        flow = make_scheduler(name, config, prediction_type="flow_prediction")
        assert torch.isfinite(run(flow, model, X_T, 5)).all()


# ================================================================================== img2img and prediction types
BEGIN_CASES = [pytest.param(n, {}, id=n) for n in NAMES] + [
    pytest.param(n, cfg, id=f"{n}-{'-'.join(f'{k}={v}' for k, v in cfg.items())}") for n, cfg in [
        ("dpm-solver", {"solver_order": 2}),
        ("dpm-solver", {"solver_mode": "multistep"}),
        ("dpm-solver++", {"solver_mode": "singlestep", "solver_order": 3}),
        ("dpm-solver++", {"solver_order": 3}),
        ("pndm", {"warmup": "f-pndm"}),
        ("pndm", {"warmup": "plms"}),
        ("dualfast:pndm", {"warmup": "f-pndm"}),
        ("unipc", {"solver_order": 3}),
        ("dpm-solver-v3", {"solver_order": 3}),
    ]]


@pytest.mark.parametrize(("name", "config"), BEGIN_CASES)
def test_set_begin_index_then_stepping_from_that_timestep_works_for_every_start(name, config):
    """img2img: noise the image to timesteps[k], set_begin_index(k), denoise from there -- for every k."""
    model = digits()
    failures = []
    probe = make_scheduler(name, config)
    probe.set_timesteps(10)
    for k in range(len(probe.timesteps)):
        sched = make_scheduler(name, config)
        sched.set_timesteps(10)
        sched.set_begin_index(k)
        try:
            x = sched.add_noise(X0, NOISE, sched.timesteps[k:k + 1])
            x = run(sched, model, x, start=k)
        except Exception as err:  # report every failing start at once
            failures.append(f"k={k}: {type(err).__name__}: {err}")
            continue
        if not torch.isfinite(x).all() or sched.step_index != len(sched.timesteps):
            failures.append(f"k={k}: finite={torch.isfinite(x).all().item()}, step_index={sched.step_index}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("name", "config"), BEGIN_CASES)
def test_starting_part_way_without_set_begin_index_finds_the_step_from_the_timestep(name, config):
    """diffusers' "full loop with noise": the pipeline passes timesteps[k:] and add_noise(timesteps[k])."""
    model = digits()
    probe = make_scheduler(name, config)
    probe.set_timesteps(10)
    ts = probe.timesteps.tolist()
    failures = []
    for k in (k for k in range(1, len(ts)) if ts.count(ts[k]) == 1):
        sched = make_scheduler(name, config)
        sched.set_timesteps(10)
        try:
            x = sched.add_noise(X0, NOISE, sched.timesteps[k:k + 1])
            x = run(sched, model, x, start=k)
        except Exception as err:
            failures.append(f"k={k}: {type(err).__name__}: {err}")
            continue
        if not torch.isfinite(x).all():
            failures.append(f"k={k}: not finite")
    assert not failures, "\n".join(failures)


LOOP_CONFIGS = {
    "defaults": {},
    "karras": {"use_karras_sigmas": True},
    "trailing_sigma_min": {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"},
    "sd_leading_offset": {**SD_BETAS, "timestep_spacing": "leading", "steps_offset": 1},
}


@pytest.mark.parametrize("config", LOOP_CONFIGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", NAMES)
def test_full_loop_in_every_prediction_type_is_finite_and_follows_the_epsilon_trajectory(name, prediction_type,
                                                                                        config):
    cfg = LOOP_CONFIGS[config]
    x = X_T.double()
    got = run(make_scheduler(name, cfg, prediction_type=prediction_type), digits(prediction_type, **betas_of(cfg)),
              x, 10)
    assert torch.isfinite(got).all()
    expected = run(make_scheduler(name, cfg), digits("epsilon", **betas_of(cfg)), x, 10)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("steps", [15, 25])
@pytest.mark.parametrize("kind", SIGMA_KINDS)
@pytest.mark.parametrize("name", ["dpm-solver", "dpm-solver++", "dualfast:dpm-solver", "dualfast:dpm-solver++"])
def test_sigma_min_final_with_off_grid_sigmas_gives_finite_samples(name, kind, steps, lower_order_final):
    model = digits()
    failures = []
    for mode in ("singlestep", "multistep"):
        for order in (2, 3):
            sched = make_scheduler(name, {kind: True, "final_sigmas_type": "sigma_min",
                                          "lower_order_final": lower_order_final},
                                   solver_mode=mode, solver_order=order)
            try:
                x = run(sched, model, X_T, steps)
            except Exception as err:
                failures.append(f"{mode} order {order}: {type(err).__name__}: {err}")
                continue
            if not torch.isfinite(x).all():
                failures.append(f"{mode} order {order}: not finite")
    assert not failures, "\n".join(failures)


# ================================================================================== full loops against diffusers
def assert_matches_diffusers(name, theirs, mine, prediction_type, betas, x=X_T, steps=10, tol=1e-4):
    """Our ``name`` with config ``mine`` and diffusers' ``theirs`` run the same digits-model loop."""
    model = digits(prediction_type, **betas)
    expected = run(theirs, model, x, steps)
    got = run(ours(name, **mine), model, x, steps)
    assert_loops_agree(got, expected, tol)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize(("spacing", "steps_offset"), [("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("name", ["ddim", "dualfast:ddim"])
def test_ddim_matches_diffusers_ddim(name, spacing, steps_offset, set_alpha_to_one, prediction_type):
    schedule = {**SD_BETAS, "timestep_spacing": spacing, "steps_offset": steps_offset,
                "prediction_type": prediction_type}
    theirs = DiffusersDDIM(**schedule, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    final = "zero" if set_alpha_to_one else "sigma_min"
    assert_matches_diffusers(name, theirs, {**schedule, "final_sigmas_type": final}, prediction_type, SD_BETAS)


DPM_CONFIGS = {
    "defaults": {},
    "sd_v_prediction_leading_offset": {**SD_BETAS, "prediction_type": "v_prediction", "timestep_spacing": "leading",
                                       "steps_offset": 1},
    "sample_sigma_min_no_lower_order_final": {"prediction_type": "sample", "final_sigmas_type": "sigma_min",
                                              "lower_order_final": False},
    "trailing_euler_at_final": {"timestep_spacing": "trailing", "euler_at_final": True},
    "karras": {"use_karras_sigmas": True},
}


def split(config):
    """(diffusers kwargs, ours with discrete timesteps where diffusers rounds model times)."""
    off_grid = any(config.get(k) for k in SIGMA_KINDS)
    return config, {**config, **({"discrete_timesteps": True} if off_grid else {})}


@pytest.mark.parametrize("steps", [8, 16])
@pytest.mark.parametrize("config", DPM_CONFIGS)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("name", ["dpm-solver++", "dualfast:dpm-solver++"])
def test_dpm_solver_pp_multistep_matches_diffusers(name, order, solver_type, config, steps):
    theirs_cfg, mine = split(DPM_CONFIGS[config])
    theirs = DPMSolverMultistepScheduler(**theirs_cfg, solver_order=order, solver_type=solver_type)
    mine = {**mine, "solver_order": order, "solver_type": solver_type}
    assert_matches_diffusers(name, theirs, mine, theirs_cfg.get("prediction_type", "epsilon"), betas_of(theirs_cfg),
                             steps=steps)


@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("steps", [15, 25])
@pytest.mark.parametrize("kind", SIGMA_KINDS)
def test_dpm_solver_pp_sigma_min_off_grid_loops_match_diffusers(kind, steps, lower_order_final):
    config = {kind: True, "final_sigmas_type": "sigma_min", "lower_order_final": lower_order_final}
    theirs = DPMSolverMultistepScheduler(**config)
    assert_matches_diffusers("dpm-solver++", theirs, {**config, "discrete_timesteps": True}, "epsilon", {}, steps=steps)


DPM_NOISE_CONFIGS = {
    "sigma_min": {"final_sigmas_type": "sigma_min"},
    "sd_v_prediction_leading_offset": {**SD_BETAS, "prediction_type": "v_prediction", "timestep_spacing": "leading",
                                       "steps_offset": 1, "final_sigmas_type": "sigma_min"},
    "karras_euler_at_final": {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "euler_at_final": True},
}


@pytest.mark.parametrize("steps", [8, 16])
@pytest.mark.parametrize("config", DPM_NOISE_CONFIGS)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("name", ["dpm-solver", "dualfast:dpm-solver"])
def test_dpm_solver_multistep_matches_diffusers_dpmsolver_algorithm(name, order, solver_type, config, steps):
    """diffusers refuses final_sigmas_type="zero" for algorithm_type="dpmsolver", hence sigma_min."""
    theirs_cfg, mine = split(DPM_NOISE_CONFIGS[config])
    theirs = DPMSolverMultistepScheduler(**theirs_cfg, algorithm_type="dpmsolver", solver_order=order,
                                         solver_type=solver_type)
    mine = {**mine, "solver_mode": "multistep", "solver_order": order, "solver_type": solver_type}
    assert_matches_diffusers(name, theirs, mine, theirs_cfg.get("prediction_type", "epsilon"), betas_of(theirs_cfg),
                             steps=steps)


SINGLESTEP_CASES = [
    # (name, algorithm_type, final_sigmas_type, order, steps, diffusers' lower_order_final)
    ("dpm-solver", "dpmsolver", "sigma_min", 1, 10, True),
    ("dpm-solver", "dpmsolver", "sigma_min", 2, 9, True),
    ("dpm-solver", "dpmsolver", "sigma_min", 2, 10, False),
    ("dpm-solver++", "dpmsolver++", "zero", 1, 10, True),
    ("dpm-solver++", "dpmsolver++", "zero", 2, 9, True),
    ("dpm-solver++", "dpmsolver++", "zero", 2, 10, True),
    ("dpm-solver++", "dpmsolver++", "sigma_min", 2, 9, True),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("name", "algorithm", "final", "order", "steps", "lower_order_final"), SINGLESTEP_CASES)
@pytest.mark.parametrize("dualfast", [False, True], ids=["base", "dualfast"])
def test_singlestep_matches_diffusers_singlestep_on_the_same_evaluation_points(dualfast, name, algorithm, final,
                                                                               order, steps, lower_order_final,
                                                                               prediction_type):
    """Same group orders and the same evaluation points: diffusers gets our (rounded) evaluation timesteps and
    our sigmas, whose intermediate points are uniform in log-SNR rather than on its integer grid."""
    name = f"dualfast:{name}" if dualfast else name
    config = {"final_sigmas_type": final, "prediction_type": prediction_type}
    sched = ours(name, config, solver_mode="singlestep", solver_order=order, discrete_timesteps=True)
    sched.set_timesteps(steps)
    theirs = DPMSolverSinglestepScheduler(**config, algorithm_type=algorithm, solver_order=order,
                                          solver_type="midpoint", lower_order_final=lower_order_final)
    theirs.set_timesteps(timesteps=sched.timesteps.tolist())
    assert theirs.timesteps.tolist() == sched.timesteps.tolist()
    torch.testing.assert_close(theirs.sigmas, sched.sigmas, rtol=1e-2, atol=1e-3)  # same points up to rounding
    theirs.sigmas = sched.sigmas.clone()
    model = digits(prediction_type)
    assert_loops_agree(run(sched, model, X_T), run(theirs, model, X_T))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("name", ["unipc", "dc-solver", "dualfast:unipc"])
def test_unipc_matches_diffusers_unipc(name, order, solver_type, prediction_type):
    """bh1 ends at sigma_min: diffusers' bh1 step to sigma = 0 is NaN (B(h) * 0 with h = inf)."""
    config = {"solver_order": order, "solver_type": solver_type, "prediction_type": prediction_type,
              "final_sigmas_type": "sigma_min" if solver_type == "bh1" else "zero"}
    assert_matches_diffusers(name, UniPCMultistepScheduler(**config), config, prediction_type, {})


def run_with_noise(sched, model, x, steps, **step_kwargs):
    """A stochastic loop driven by explicit, seeded ``variance_noise`` (the same draws for both schedulers)."""
    sched.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = sched.step(model(x, t), t, x, variance_noise=noise, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("name", ["ddim", "dualfast:ddim"])
def test_ddim_with_eta_matches_diffusers_ddim_given_the_same_variance_noise(name, set_alpha_to_one, eta):
    schedule = {**SD_BETAS, "timestep_spacing": "leading", "steps_offset": 1}
    theirs = DiffusersDDIM(**schedule, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    sched = ours(name, schedule, eta=eta, final_sigmas_type="zero" if set_alpha_to_one else "sigma_min")
    model = digits(**SD_BETAS)
    assert_loops_agree(run_with_noise(sched, model, X_T, 10), run_with_noise(theirs, model, X_T, 10, eta=eta))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("name", ["dpm-solver++", "dualfast:dpm-solver++"])
def test_sde_dpm_solver_pp_matches_diffusers_given_the_same_variance_noise(name, order, solver_type,
                                                                          prediction_type):
    config = {"algorithm_type": "sde-dpmsolver++", "solver_order": order, "solver_type": solver_type,
              "prediction_type": prediction_type}
    model = digits(prediction_type)
    expected = run_with_noise(DPMSolverMultistepScheduler(**config), model, X_T, 10)
    assert_loops_agree(run_with_noise(ours(name, config), model, X_T, 10), expected)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize(("spacing", "steps_offset"), [("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize(("warmup", "skip_prk_steps"), [("plms", True), ("f-pndm", False)])
@pytest.mark.parametrize("name", ["pndm", "dualfast:pndm"])
def test_pndm_matches_diffusers_pndm(name, warmup, skip_prk_steps, spacing, steps_offset, set_alpha_to_one):
    schedule = {**SD_BETAS, "timestep_spacing": spacing, "steps_offset": steps_offset}
    theirs = DiffusersPNDM(**schedule, skip_prk_steps=skip_prk_steps, set_alpha_to_one=set_alpha_to_one)
    mine = {**schedule, "warmup": warmup, "discrete_timesteps": True,
            "final_sigmas_type": "zero" if set_alpha_to_one else "sigma_min"}
    assert_matches_diffusers(name, theirs, mine, "epsilon", SD_BETAS)


# ================================================================================== config interoperability
DIFFUSERS_CONFIGS = {
    "DDIMScheduler": lambda: DiffusersDDIM(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "PNDMScheduler": lambda: DiffusersPNDM(**SD_PNDM),
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "DPMSolverSinglestepScheduler": DPMSolverSinglestepScheduler,
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
}


CONFIG_FORMS = ["in_memory", "saved"]


def config_of(sched, form, tmp_path):
    """A scheduler's config as a pipeline holds it in memory, or as read back from a saved model repository
    (where no entry is marked as a default, so every entry reaches the new class)."""
    if form == "in_memory":
        return sched.config
    sched.save_config(tmp_path)
    return type(sched).load_config(tmp_path)


@pytest.mark.parametrize("form", CONFIG_FORMS)
@pytest.mark.parametrize("source", DIFFUSERS_CONFIGS)
@pytest.mark.parametrize("name", NAMES)
def test_from_config_accepts_diffusers_scheduler_configs_and_keeps_their_schedule(name, source, form, tmp_path):
    config = config_of(DIFFUSERS_CONFIGS[source](), form, tmp_path)
    sched = get_scheduler_class(name).from_config(config)
    # as in diffusers, entries the source left at its own defaults fall back to this class's defaults
    given = [k for k in SCHEDULE_KEYS if k in config and k not in config.get("_use_default_values", [])]
    assert {k: sched.config[k] for k in given} == {k: config[k] for k in given}
    assert torch.isfinite(run(sched, digits(**betas_of(config)), X_T, 10)).all()


FORWARD_CASES = [
    pytest.param("ddim", DiffusersDDIM, {**SD_BETAS, "clip_sample": False, "set_alpha_to_one": False,
                                         "steps_offset": 1}, {}, id="ddim<-sd-ddim"),
    pytest.param("ddim", DiffusersDDIM, {"clip_sample": False, "timestep_spacing": "trailing",
                                         "prediction_type": "v_prediction"}, {}, id="ddim<-ddim-trailing-v"),
    pytest.param("dpm-solver++", DPMSolverMultistepScheduler, {}, {}, id="dpm-solver++<-defaults"),
    pytest.param("dpm-solver++", DPMSolverMultistepScheduler,
                 {**SD_BETAS, "solver_order": 3, "prediction_type": "v_prediction", "timestep_spacing": "leading",
                  "steps_offset": 1}, {}, id="dpm-solver++<-sd-order3-v"),
    pytest.param("dpm-solver", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver",
                                                             "final_sigmas_type": "sigma_min"},
                 {"solver_mode": "multistep"}, id="dpm-solver<-dpmsolver-multistep"),
    pytest.param("dpm-solver", DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver", "solver_order": 1,
                                                              "final_sigmas_type": "sigma_min"},
                 {}, id="dpm-solver<-dpmsolver-singlestep-order1"),
    pytest.param("unipc", UniPCMultistepScheduler, {}, {}, id="unipc<-defaults"),
    pytest.param("unipc", UniPCMultistepScheduler, {"solver_order": 3, "solver_type": "bh1", "disable_corrector": [0],
                                                    "final_sigmas_type": "sigma_min"}, {}, id="unipc<-bh1-order3"),
    pytest.param("dc-solver", UniPCMultistepScheduler, {}, {}, id="dc-solver<-unipc-defaults"),
    pytest.param("pndm", DiffusersPNDM, SD_PNDM, {}, id="pndm<-sd-pndm"),
    pytest.param("pndm", DiffusersPNDM, {**SD_PNDM, "skip_prk_steps": False}, {}, id="pndm<-sd-pndm-with-prk"),
]


@pytest.mark.parametrize("form", CONFIG_FORMS)
@pytest.mark.parametrize(("name", "cls", "theirs_kw", "overrides"), FORWARD_CASES)
def test_from_config_of_the_replaced_diffusers_scheduler_reproduces_its_full_loop(name, cls, theirs_kw, overrides,
                                                                                  form, tmp_path):
    theirs = cls(**theirs_kw)
    sched = get_scheduler_class(name).from_config(config_of(theirs, form, tmp_path), **overrides)
    prediction_type = theirs.config.prediction_type
    model = digits(prediction_type, **betas_of(theirs_kw))
    assert_loops_agree(run(sched, model, X_T, 10), run(theirs, model, X_T, 10))


REVERSE_CASES = [
    pytest.param("ddim", {"timestep_spacing": "trailing"}, DiffusersDDIM, id="ddim-trailing"),
    pytest.param("ddim", {**SD_BETAS, "timestep_spacing": "leading", "steps_offset": 1,
                          "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"},
                 DiffusersDDIM, id="ddim-sd-leading-sigma-min-v"),
    pytest.param("dpm-solver++", {}, DPMSolverMultistepScheduler, id="dpm-solver++-defaults"),
    pytest.param("dpm-solver++", {"solver_order": 3, "solver_type": "heun", "prediction_type": "v_prediction"},
                 DPMSolverMultistepScheduler, id="dpm-solver++-order3-heun-v"),
    pytest.param("dpm-solver", {"solver_mode": "multistep", "final_sigmas_type": "sigma_min"},
                 DPMSolverMultistepScheduler, id="dpm-solver-multistep"),
    pytest.param("dpm-solver", {"solver_order": 1, "final_sigmas_type": "sigma_min"}, DPMSolverSinglestepScheduler,
                 id="dpm-solver-singlestep-order1"),
    pytest.param("unipc", {}, UniPCMultistepScheduler, id="unipc-defaults"),
    pytest.param("unipc", {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
                 UniPCMultistepScheduler, id="unipc-bh1-order3"),
    pytest.param("dc-solver", {}, UniPCMultistepScheduler, id="dc-solver-defaults"),
    pytest.param("pndm", {**SD_BETAS, "warmup": "plms", "timestep_spacing": "leading", "steps_offset": 1},
                 DiffusersPNDM, id="pndm-plms-sd"),
    pytest.param("pndm", {"warmup": "f-pndm", "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"},
                 DiffusersPNDM, id="pndm-f-pndm-trailing-sigma-min"),
]


@pytest.mark.parametrize(("name", "config", "cls"), REVERSE_CASES)
def test_config_saved_by_diffalign_loads_into_the_diffusers_class_and_reproduces_the_loop(name, config, cls,
                                                                                          tmp_path):
    sched = make_scheduler(name, config)
    sched.save_config(tmp_path)
    theirs = cls.from_pretrained(tmp_path)
    assert type(theirs) is cls
    if cls is DiffusersDDIM:
        assert theirs.config.clip_sample is False  # diffusers' DDIM clips by default; ours never clipped
    model = digits(sched.config.prediction_type, **betas_of(config))
    assert_loops_agree(run(theirs, model, X_T, 10), run(sched, model, X_T, 10))


@pytest.mark.parametrize("form", CONFIG_FORMS)
@pytest.mark.parametrize("name", ["ddim", "dualfast:ddim"])
def test_ddim_from_a_clip_sample_config_honours_it_or_raises(name, form, tmp_path):
    config = {"clip_sample": True, "clip_sample_range": 0.5, "timestep_spacing": "trailing"}
    theirs = DiffusersDDIM(**config)
    try:
        sched = ours(name, config_of(theirs, form, tmp_path))
    except (ValueError, NotImplementedError) as err:
        assert "clip_sample" in str(err)
        return
    model = digits()
    expected = run(theirs, model, X_T, 10)
    unclipped = run(DiffusersDDIM(**{**config, "clip_sample": False}), model, X_T, 10)
    assert (expected - unclipped).abs().max() > 1e-2  # clipping matters on this model
    assert_loops_agree(run(sched, model, X_T, 10), expected)


@pytest.mark.parametrize("name", NAMES)
def test_compatibles_list_every_diffalign_scheduler_and_each_loads_the_config(name):
    config = {**SD_BETAS, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    sched = make_scheduler(name, config)
    compatibles = sched.compatibles
    assert all(c is not None for c in compatibles)
    assert set(SAMPLERS.values()) <= set(compatibles)
    failures = []
    for cls in compatibles:
        try:
            other = cls.from_config(sched.config)
        except ImportError:  # an optional dependency of a diffusers scheduler (torchsde) is not installed
            continue
        except Exception as err:
            failures.append(f"{cls.__name__}: {type(err).__name__}: {err}")
            continue
        try:
            back = type(sched).from_config(other.config)
        except Exception as err:
            failures.append(f"{cls.__name__}: {type(err).__name__}: {err}")
            continue
        if {k: back.config[k] for k in SCHEDULE_KEYS} != {k: sched.config[k] for k in SCHEDULE_KEYS}:
            failures.append(f"{cls.__name__}: the schedule changed on the way back")
        elif cls in SAMPLERS.values() and not torch.equal(first_steps(back), first_steps(make_scheduler(name, config))):
            failures.append(f"{cls.__name__}: switching there and back changed the sampler's steps")
    assert not failures, "\n".join(failures)

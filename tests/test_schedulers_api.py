"""Every registered sampler as a diffusers scheduler: configs, pipelines, prediction types, flow matching, errors."""

import functools
import math

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

from diffalign.models import digits_reference_model, solve_reference
from diffalign.samplers import SAMPLERS, get_scheduler_class, make_scheduler, sample

NAMES = sorted(SAMPLERS)
X_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def reference(prediction_type="epsilon", **config):
    return digits_reference_model({**config}, prediction_type=prediction_type)


@pytest.mark.parametrize("name", NAMES)
def test_save_config_from_pretrained_round_trip_gives_identical_outputs(name, tmp_path):
    sched = make_scheduler(name, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    sched.save_config(tmp_path)
    again = get_scheduler_class(name).from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(sched.config)
    model = reference(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(sample(again, model, X_T, 8), sample(sched, model, X_T, 8), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_follow_the_same_trajectory_as_epsilon(name, prediction_type):
    expected = sample(make_scheduler(name), reference("epsilon"), X_T, 10)
    got = sample(make_scheduler(name, prediction_type=prediction_type), reference(prediction_type), X_T, 10)
    # the sampler's float32 sigma grid differs from the model's float64 schedule by ~1e-7 (relative)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


FLOW_MODEL = digits_reference_model({"use_flow_sigmas": True}, prediction_type="flow_prediction")


@functools.lru_cache
def exact_flow_solution(sigma_start: float) -> torch.Tensor:
    return solve_reference(FLOW_MODEL, X_T, sigma_start / (1 - sigma_start), 0.0)


FLOW_NAMES = [n for n in NAMES if not n.endswith("pndm")]


@pytest.mark.parametrize("name", ["pndm", "dualfast:pndm"])
@pytest.mark.parametrize("warmup", ["f-pndm", "s-pndm", "plms"])
def test_pndm_refuses_flow_matching_sigmas_with_the_samplers_to_use(name, warmup):
    with pytest.raises(ValueError, match="does not support flow-matching sigmas.*DDIMScheduler"):
        make_scheduler(name, {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, warmup=warmup)


@pytest.mark.parametrize("name", FLOW_NAMES)
def test_flow_matching_configuration_converges_to_the_exact_solution(name):
    config = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
    model = FLOW_MODEL
    errors = []
    for steps in (10, 40):
        sched = make_scheduler(name, config)
        sched.set_timesteps(steps)
        exact = exact_flow_solution(float(sched.sigmas[0]))
        errors.append(torch.mean((sample(sched, model, X_T, steps) - exact) ** 2).item())
    assert all(math.isfinite(e) for e in errors)
    assert errors[1] < errors[0] / 4, errors  # at least first-order convergence


def test_dpm_solver_pp_flow_matching_matches_diffusers():
    config = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
    model = FLOW_MODEL
    x = X_T.float()
    # diffusers rounds model times to integers; discrete_timesteps=True reproduces that
    got = sample(make_scheduler("dpm-solver++", config, discrete_timesteps=True), model, x, 12)
    expected = sample(DPMSolverMultistepScheduler(**config), model, x, 12)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


@pytest.mark.parametrize("name", NAMES)
def test_works_in_ddpm_pipeline(name):
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DPMSolverMultistepScheduler())
    pipe.scheduler = get_scheduler_class(name).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and (images >= 0).all() and (images <= 1).all()


def tiny_stable_diffusion():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("name", NAMES)
def test_works_in_tiny_stable_diffusion_pipeline_with_guidance(name):
    pipe = tiny_stable_diffusion()
    pipe.scheduler = get_scheduler_class(name).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    emb = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    out = pipe(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb), num_inference_steps=6,
               guidance_scale=7.5, height=8, width=8, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 8, 8, 3) and torch.isfinite(torch.from_numpy(out.images)).all()


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="dpm-solver\\+\\+"):
        get_scheduler_class("dpm-solver-4")


@pytest.mark.parametrize("name", NAMES)
def test_bad_step_counts_raise_clear_errors(name):
    sched = make_scheduler(name)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(bad)


def test_too_few_steps_for_the_order():
    with pytest.raises(ValueError, match="solver_order=3 needs num_inference_steps >= 3"):
        make_scheduler("dpm-solver++", solver_order=3).set_timesteps(2)


@pytest.mark.parametrize("name", NAMES)
def test_step_before_set_timesteps(name):
    with pytest.raises(RuntimeError, match="set_timesteps"):
        make_scheduler(name).step(torch.zeros(1, 1, 8, 8), 999, torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("name", NAMES)
def test_nan_model_output_names_the_step(name):
    sched = make_scheduler(name)
    sched.set_timesteps(6)
    x = torch.randn(1, 1, 8, 8)
    t0, t1 = sched.timesteps[0], sched.timesteps[1]
    x = sched.step(torch.zeros_like(x), t0, x).prev_sample
    with pytest.raises(FloatingPointError, match="NaN/Inf at step 1"):
        sched.step(torch.full_like(x, float("nan")), t1, x)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_shapes(name):
    sched = make_scheduler(name)
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="does not match sample shape"):
        sched.step(torch.zeros(2, 1, 8, 8), sched.timesteps[0], torch.zeros(2, 1, 4, 4))


def test_invalid_config_values_name_the_choices():
    with pytest.raises(ValueError, match="solver_order=4"):
        make_scheduler("dpm-solver++", solver_order=4)
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("ddim", prediction_type="score")


@pytest.mark.parametrize("name", NAMES)
def test_switching_schedulers_through_from_config_keeps_each_ones_defaults(name):
    switched = make_scheduler("dpm-solver++", make_scheduler(name).config)
    assert switched.config.solver_order == 2 and switched.config.solver_mode == "multistep"


def test_flow_matching_timesteps_are_the_exact_model_times():
    sched = make_scheduler("dpm-solver++", use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    sched.set_timesteps(7)
    torch.testing.assert_close(sched.timesteps, sched.sigmas[:-1] * 1000)


@pytest.mark.parametrize("name", ["dpm-solver++", "pndm", "dualfast:unipc"])
def test_saved_pipeline_with_a_diffalign_scheduler_reloads_with_diffusers(name, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=make_scheduler(name))
    pipe.save_pretrained(tmp_path)
    again = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(again.scheduler) is get_scheduler_class(name)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.scheduler.config) == public(pipe.scheduler.config)


def test_ddim_pipeline_passes_eta_and_use_clipped_model_output():
    from diffusers import DDIMPipeline, UNet2DModel

    from diffalign.samplers import DDIMScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run(eta):
        return pipe(batch_size=2, num_inference_steps=5, eta=eta, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    a, b = run(0.0), run(1.0)
    assert np.isfinite(a).all() and np.isfinite(b).all() and not np.allclose(a, b)
    assert np.array_equal(run(1.0), b)  # deterministic under a seed


def test_ddim_step_eta_equals_a_scheduler_configured_with_it():
    from diffalign.samplers import DDIMScheduler

    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    results = []
    for sched, kwargs in ((DDIMScheduler(eta=0.5), {}), (DDIMScheduler(), {"eta": 0.5})):
        sched.set_timesteps(4)
        results.append(sched.step(out, sched.timesteps[0], x, generator=torch.Generator().manual_seed(2),
                                  **kwargs).prev_sample)
    assert torch.equal(*results)
    sched = DDIMScheduler(thresholding=True)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="use_clipped_model_output=False is not supported"):
        sched.step(out, sched.timesteps[0], x, use_clipped_model_output=False)


@pytest.mark.parametrize("name", ["ddim", "dpm-solver++", "pndm", "dc-solver", "unipc"])
def test_nan_check_on_an_accelerator_waits_for_the_last_step(name, monkeypatch):
    """Where reading a value back would stall the device queue, the check runs on the device and is read once, at
    the trajectory's last step; it still names the first bad step, and a fresh trajectory starts clean."""
    from diffalign.samplers.base import DiffAlignScheduler

    monkeypatch.setattr(DiffAlignScheduler, "_reads_back_cheaply", staticmethod(lambda device: False))
    sched = make_scheduler(name)
    sched.set_timesteps(6)
    x = torch.randn(1, 1, 8, 8)
    n = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        out = torch.full_like(x, float("nan")) if i in (1, 2) else torch.zeros_like(x)
        if i < n - 1:
            x = sched.step(out, t, torch.nan_to_num(x)).prev_sample
        else:
            with pytest.raises(FloatingPointError, match="NaN/Inf at step 1 "):
                sched.step(out, t, torch.nan_to_num(x))
    sched.set_timesteps(6)
    x = torch.randn(1, 1, 8, 8)
    for t in sched.timesteps:
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    assert torch.isfinite(x).all()

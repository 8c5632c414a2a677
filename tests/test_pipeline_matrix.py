"""Every diffalign sampler in every kind of diffusers pipeline: finite images, identical under the same seed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DModel,
)
from PIL import Image

from diffalign.models.tiny_sd import (
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
    tiny_stable_diffusion_pipeline,
)
from diffalign.samplers import SAMPLERS, make_scheduler

NAMES = sorted(SAMPLERS)
STEPS = 6  # every sampler's minimum for a full grid; img2img at strength 0.5 runs only the last 3 of them
PROMPT = "a photo of a cat"


def _seeded(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """``build()`` under ``seed`` without touching the global RNG state, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _tiny_unet2d() -> UNet2DModel:
    """diffusers' dummy unconditional UNet of its DDPM / DDIM pipeline tests (8 x 8 RGB)."""
    return _seeded(lambda: UNet2DModel(
        block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4, sample_size=8, in_channels=3,
        out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")))


def _ddpm() -> DiffusionPipeline:
    return DDPMPipeline(unet=_tiny_unet2d(), scheduler=DDPMScheduler())


def _ddim() -> DiffusionPipeline:
    return DDIMPipeline(unet=_tiny_unet2d(), scheduler=DDPMScheduler())


@functools.cache
def _sd_components() -> dict:
    """The tiny Stable Diffusion components (4-channel UNet, 32 x 32 images), shared by txt2img, img2img, inpaint."""
    return tiny_stable_diffusion_pipeline(seed=0).components


def _sd() -> DiffusionPipeline:
    return StableDiffusionPipeline(**_sd_components())


def _sd_img2img() -> DiffusionPipeline:
    return StableDiffusionImg2ImgPipeline(**_sd_components())


def _sd_inpaint() -> DiffusionPipeline:
    # With a 4-channel UNet the inpaint pipeline blends the re-noised masked image latents in at every step.
    return StableDiffusionInpaintPipeline(**_sd_components())


def _sdxl() -> DiffusionPipeline:
    return tiny_sdxl_pipeline()


def _sd3() -> DiffusionPipeline:
    return tiny_sd3_pipeline()


def _flux() -> DiffusionPipeline:
    return tiny_flux_pipeline(dynamic_shifting=True)


def _flux_static_shift() -> DiffusionPipeline:
    return tiny_flux_pipeline(dynamic_shifting=False)


def _photo() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask() -> Image.Image:
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    return Image.fromarray(mask)


@dataclass(frozen=True)
class Kind:
    """A pipeline kind: how to build it, the call's extra arguments and the shape of its images."""

    build: Callable[[], DiffusionPipeline]
    shape: tuple[int, ...]
    call: dict = field(default_factory=dict)
    few_steps: bool = False  # fewer effective steps than STEPS: a sampler may refuse them with a ValueError


GUIDED = {"prompt": PROMPT, "guidance_scale": 5.0}
FLUX_CALL = {"prompt": PROMPT, "height": 8, "width": 8, "max_sequence_length": 16}
KINDS: dict[str, Kind] = {
    "ddpm": Kind(_ddpm, (2, 8, 8, 3), {"batch_size": 2}),
    "ddim": Kind(_ddim, (2, 8, 8, 3), {"batch_size": 2, "eta": 0.0}),
    "sd": Kind(_sd, (1, 32, 32, 3), GUIDED),
    "sd-img2img-0.9": Kind(_sd_img2img, (1, 32, 32, 3), {**GUIDED, "image": _photo(), "strength": 0.9}),
    "sd-img2img-0.5": Kind(_sd_img2img, (1, 32, 32, 3), {**GUIDED, "image": _photo(), "strength": 0.5}, True),
    "sd-inpaint": Kind(_sd_inpaint, (1, 32, 32, 3), {**GUIDED, "image": _photo(), "mask_image": _mask()}),
    "sdxl": Kind(_sdxl, (1, 32, 32, 3), {**GUIDED, "height": 32, "width": 32}),
    "sd3": Kind(_sd3, (1, 16, 16, 3), {**GUIDED, "height": 16, "width": 16}),
    "flux": Kind(_flux, (1, 8, 8, 3), FLUX_CALL),
    "flux-static-shift": Kind(_flux_static_shift, (1, 8, 8, 3), FLUX_CALL),
}


@functools.cache
def pipeline(kind: str) -> tuple[DiffusionPipeline, dict]:
    """The kind's pipeline, built once, and its own scheduler's config; each test swaps in a scheduler."""
    pipe = KINDS[kind].build()
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


def diffalign_scheduler(name: str, config):
    """Sampler ``name`` from a pipeline's scheduler config, as users swap it (flow configs map by themselves)."""
    return make_scheduler(name, config)


def run(pipe: DiffusionPipeline, kind: str, seed: int = 0) -> np.ndarray:
    return pipe(**KINDS[kind].call, num_inference_steps=STEPS, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_pipeline_runs_end_to_end_with_finite_images_identical_under_the_same_seed(kind, name):
    pipe, config = pipeline(kind)
    if name.endswith("pndm") and "shift" in config:  # refused: PNDM's pseudo steps diverge at alpha ~ 0
        with pytest.raises(ValueError, match="does not support flow-matching sigmas"):
            diffalign_scheduler(name, config)
        return
    pipe.scheduler = diffalign_scheduler(name, config)
    assert pipe.scheduler.config.use_flow_sigmas == ("shift" in config)  # flow pipelines get flow sampling
    try:
        first = run(pipe, kind)
    except ValueError as err:
        if not KINDS[kind].few_steps:
            raise
        assert "step" in str(err), err  # refusing too few steps is fine, with a message that says so
        return
    assert first.shape == KINDS[kind].shape
    assert np.isfinite(first).all()
    assert np.array_equal(run(pipe, kind), first)


def test_a_flow_matching_scheduler_config_selects_flow_sampling():
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    wanted = (True, "flow_prediction", 3.0)  # (use_flow_sigmas, prediction_type, flow_shift)
    got = {name: make_scheduler(name, config).config for name in NAMES if not name.endswith("pndm")}
    got = {name: (c.use_flow_sigmas, c.prediction_type, c.flow_shift) for name, c in got.items()}
    assert {name: value for name, value in got.items() if value != wanted} == {}

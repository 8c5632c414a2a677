"""Every diffalign sampler in every kind of diffusers pipeline: finite images, identical under the same seed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffalign.models.tiny_sd import tiny_clip_tokenizer, tiny_stable_diffusion_pipeline
from diffalign.samplers import SAMPLERS, make_scheduler

NAMES = sorted(SAMPLERS)
STEPS = 6  # every sampler's minimum for a full grid; img2img at strength 0.5 runs only the last 3 of them
PROMPT = "a photo of a cat"


def _seeded(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """``build()`` under ``seed`` without touching the global RNG state, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _clip_config(tokenizer, **kwargs) -> CLIPTextConfig:
    """diffusers' dummy CLIP text encoder over the hand-made tokenizer's vocabulary."""
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                          layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **kwargs)


def _flow_vae(latent_channels: int) -> AutoencoderKL:
    """diffusers' dummy SD3 / Flux VAE (one block: latents have the image's size)."""
    return _seeded(lambda: AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035))


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
    """diffusers' dummy SDXL components; both text encoders share the hand-made CLIP tokenizer."""
    tokenizer = tiny_clip_tokenizer()
    config = _clip_config(tokenizer, hidden_act="gelu", projection_dim=32)
    unet = _seeded(lambda: UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + the pooled text embedding
        cross_attention_dim=64, norm_num_groups=1))
    vae = _seeded(lambda: AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=_seeded(lambda: CLIPTextModel(config)), tokenizer=tokenizer,
        text_encoder_2=_seeded(lambda: CLIPTextModelWithProjection(config), seed=1), tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler)


def _sd3() -> DiffusionPipeline:
    """diffusers' dummy SD3 components without the (optional) T5 encoder; SD3's real scheduler config (shift 3)."""
    tokenizer = tiny_clip_tokenizer()
    config = _clip_config(tokenizer, hidden_act="gelu", projection_dim=32)
    transformer = _seeded(lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4))
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=_flow_vae(latent_channels=4), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_seeded(lambda: CLIPTextModelWithProjection(config)), tokenizer=tokenizer,
        text_encoder_2=_seeded(lambda: CLIPTextModelWithProjection(config), seed=1), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)


@functools.cache
def _flux_components() -> dict:
    """diffusers' dummy Flux components; the tiny T5 reads the hand-made CLIP tokenizer's ids (the pipeline only
    needs ids in its vocabulary)."""
    tokenizer = tiny_clip_tokenizer()
    t5 = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    transformer = _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]))
    return dict(
        transformer=transformer, vae=_flow_vae(latent_channels=1),
        text_encoder=_seeded(lambda: CLIPTextModel(_clip_config(tokenizer, hidden_act="gelu", projection_dim=32))),
        tokenizer=tokenizer, text_encoder_2=_seeded(lambda: T5EncoderModel(t5)), tokenizer_2=tokenizer)


def _flux() -> DiffusionPipeline:
    """Flux with its real scheduler config: resolution-dependent (dynamic) shifting through ``mu``."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(**_flux_components(), scheduler=scheduler)


def _flux_static_shift() -> DiffusionPipeline:
    """Flux with diffusers' dummy scheduler config: no dynamic shifting, yet the pipeline always passes ``mu``."""
    return FluxPipeline(**_flux_components(), scheduler=FlowMatchEulerDiscreteScheduler())


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

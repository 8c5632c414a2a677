"""The tiny offline Stable Diffusion pipeline: tokenizer, deterministic sampling, save/load and LoRA round trips."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from diffalign.models.tiny_sd import TINY_SD_WORDS, tiny_clip_tokenizer, tiny_stable_diffusion_pipeline

PROMPT = "a photo of a cat"


def _sample(pipe: StableDiffusionPipeline, prompt: str = PROMPT, seed: int = 0) -> torch.Tensor:
    return pipe(prompt=prompt, num_inference_steps=2, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    pipe = tiny_stable_diffusion_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tokenizer_whole_words_are_single_tokens():
    tok = tiny_clip_tokenizer()
    ids = tok(PROMPT).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>",
                                              "<|endoftext|>"]
    assert ids[1] == ids[4]  # the same word, the same id
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    for word in TINY_SD_WORDS:
        assert tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids) == [word + "</w>"]
    # Upper case is folded; an unknown word falls back to (merged) characters, never to the unknown token.
    tokens = tok.convert_ids_to_tokens(tok("A RED Zebra", add_special_tokens=False).input_ids)
    assert tokens == ["a</w>", "red</w>", "z", "e", "b", "r", "a</w>"]
    assert tok.unk_token_id not in tok("zebra 42, xylophone!", add_special_tokens=False).input_ids
    padded = tok(PROMPT, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == tok.model_max_length == 77
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and padded[-1] == tok.eos_token_id


def test_components_match_the_brief(pipe):
    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert not cfg.clip_sample and not cfg.set_alpha_to_one
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.cross_attention_dim == 32
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 2
    te = pipe.text_encoder.config
    assert te.vocab_size == len(pipe.tokenizer) and te.max_position_embeddings == pipe.tokenizer.model_max_length
    assert te.eos_token_id == pipe.tokenizer.eos_token_id
    assert callable(getattr(pipe, "load_lora_weights", None))


def test_construction_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (tiny_stable_diffusion_pipeline(seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name


def test_sampling_is_finite_reproducible_and_prompt_dependent(pipe):
    image = _sample(pipe)
    assert image.shape == (1, 3, 32, 32) and image.dtype == torch.float32
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    assert image.std() > 0.01  # not a constant or fully clipped image
    assert torch.equal(_sample(pipe), image)
    assert not torch.equal(_sample(pipe, prompt="a photo of a dog"), image)
    assert not torch.equal(_sample(pipe, seed=1), image)


def test_small_sample_size_gives_small_images():
    small = tiny_stable_diffusion_pipeline(sample_size=8)
    small.set_progress_bar_config(disable=True)
    assert _sample(small).shape == (1, 3, 16, 16)


def test_save_load_round_trip_is_exact(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.tokenizer(PROMPT).input_ids == pipe.tokenizer(PROMPT).input_ids
    assert torch.equal(_sample(loaded), _sample(pipe))


def test_lora_save_load_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_stable_diffusion_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base = _sample(pipe)
    torch.manual_seed(0)
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    tuned = _sample(pipe)
    assert not torch.equal(tuned, base)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    fresh = tiny_stable_diffusion_pipeline()
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path)
    assert torch.allclose(_sample(fresh), tuned, atol=1e-6)


def test_sd15_sized_configs_have_stable_diffusion_15s_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffalign.models.tiny_sd import SD15_UNET, SD15_VAE

    with torch.device("meta"):  # sizes only, no memory
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # runwayml/stable-diffusion-v1-5's UNet
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert unet.config.sample_size * 8 == vae.config.sample_size == 512


@pytest.mark.slow
def test_sd15_sized_pipeline_runs_a_guided_step():
    from diffalign.models.tiny_sd import sd15_sized_pipeline

    pipe = sd15_sized_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(prompt="a red dress", num_inference_steps=1, guidance_scale=7.5, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 64, 64) and torch.isfinite(latents).all()

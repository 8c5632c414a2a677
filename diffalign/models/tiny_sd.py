"""Tiny, randomly initialised Stable Diffusion (and SDXL, SD3, Flux) pipelines, built offline.

It exists so that tests, notebooks and examples can prove the text-to-image path (prompt -> tokenizer -> CLIP text
encoder -> UNet with cross-attention -> VAE decoder, plus save/load and LoRA loading) without any download. The
components follow diffusers' own ``get_dummy_components`` in its Stable Diffusion tests; the tokenizer is a real
``CLIPTokenizer`` over a hand-made BPE vocabulary. The images are noise: the weights are random.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = ["RANDOM_PIPELINES", "SD15_UNET", "SD15_VAE", "TINY_SD_WORDS", "sd15_sized_pipeline", "tiny_clip_tokenizer",
           "tiny_flux_pipeline", "tiny_sd3_pipeline", "tiny_sdxl_pipeline",
           "tiny_stable_diffusion_pipeline"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# Whole words that tokenize to a single token each; anything else falls back to its characters.
TINY_SD_WORDS: tuple[str, ...] = (
    "a", "an", "the", "photo", "painting", "of", "on", "in", "with", "and",
    "cat", "dog", "red", "blue", "green", "sneaker", "bag", "shirt", "dress",
)  # fmt: skip
_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> tuple[list[str], list[str]]:
    """CLIP's BPE of one word: the final pieces and every piece that a merge produced on the way."""
    pieces, made = list(word[:-1]) + [word[-1] + "</w>"], []
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:], strict=False), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                made.append(merged[-1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces, made


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: every character bare and with ``</w>``, each whole word of ``TINY_SD_WORDS``
    through merges (every intermediate piece is in the vocabulary too), the special tokens last as in CLIP.

    Merges are appended (lowest priority) until each word is one token; an appended merge never changes how an
    already-complete word is split, since a complete word always has an earlier merge to apply."""
    tokens = dict.fromkeys([c for c in _CHARS] + [c + "</w>" for c in _CHARS])
    ranks: dict[tuple[str, str], int] = {}
    for word in TINY_SD_WORDS:
        while len(pieces := _bpe(word, ranks)[0]) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
    for word in TINY_SD_WORDS:
        pieces, made = _bpe(word, ranks)
        if pieces != [word + "</w>"]:
            raise RuntimeError(f"tiny vocabulary: {word!r} splits into {pieces}")
        tokens.update(dict.fromkeys(made))
    tokens.update(dict.fromkeys([BOS_TOKEN, EOS_TOKEN]))
    return {tok: i for i, tok in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def tiny_clip_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` loaded from a vocab.json/merges.txt written to a temporary directory."""
    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="diffalign-tiny-clip-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length, pad_token=EOS_TOKEN)
    return tokenizer


def tiny_stable_diffusion_pipeline(
    seed: int = 0, sample_size: int = 16, torch_dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """A random-weight ``StableDiffusionPipeline`` with ``sample_size`` x ``sample_size`` latents (4 channels) and
    images twice that size (32 x 32 pixels by default), built deterministically from ``seed`` without touching the
    global RNG state. A 2-step guided call takes milliseconds on a CPU."""
    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=2 * sample_size,
        )
        torch.manual_seed(seed)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
    return _assemble_sd(unet, vae, text_encoder, tokenizer, torch_dtype)


def _assemble_sd(unet, vae, text_encoder, tokenizer, torch_dtype: torch.dtype) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` of these components with Stable Diffusion 1.5's DDIM scheduler, in eval mode."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for model in (unet, vae, text_encoder):
        model.eval()
    if torch_dtype != torch.float32:  # the components are built in float32; skip diffusers' no-op cast warning
        pipe.to(dtype=torch_dtype)
    return pipe


SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the rest: diffusers' defaults
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
)


def sd15_sized_pipeline(seed: int = 0, torch_dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A random-weight ``StableDiffusionPipeline`` with Stable Diffusion 1.5's UNet and VAE architectures (859.5M and
    83.7M parameters, 64 x 64 latents, 512 x 512 images), for memory and speed measurements of real-size networks
    offline. The text encoder is CLIP-L's width (768) over the tiny tokenizer's vocabulary."""
    tokenizer = tiny_clip_tokenizer()
    unet = _seeded(lambda: UNet2DConditionModel(**SD15_UNET), seed)
    vae = _seeded(lambda: AutoencoderKL(**SD15_VAE), seed)
    text_encoder = _seeded(lambda: CLIPTextModel(_clip_config(
        tokenizer, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)), seed)
    return _assemble_sd(unet, vae, text_encoder, tokenizer, torch_dtype)


# the random pipelines by the names the benchmarks take (``--model tiny-sd``)
RANDOM_PIPELINES = {"tiny-sd": tiny_stable_diffusion_pipeline, "sd15-sized": sd15_sized_pipeline}


# ---------------------------------------------------------------------------------------- SDXL, SD3, Flux
def _seeded(build, seed: int = 0) -> torch.nn.Module:
    """``build()`` under ``seed`` without touching the global RNG state, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _clip_config(tokenizer: CLIPTokenizer, **kwargs) -> CLIPTextConfig:
    """diffusers' dummy CLIP text encoder over the hand-made tokenizer's vocabulary; ``kwargs`` override its sizes."""
    settings = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4) | kwargs
    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                          layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **settings)


def _flow_vae(latent_channels: int) -> AutoencoderKL:
    """diffusers' dummy SD3 / Flux VAE (one block: latents have the image's size)."""
    return _seeded(lambda: AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035))


def tiny_sdxl_pipeline():
    """A random-weight ``StableDiffusionXLPipeline`` (diffusers' dummy SDXL components; both text encoders read the
    hand-made CLIP tokenizer); 32 x 32 images."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

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


def tiny_sd3_pipeline():
    """A random-weight ``StableDiffusion3Pipeline`` (diffusers' dummy SD3 components, without the optional T5
    encoder) with SD3's scheduler config (flow matching, shift 3); 16 x 16 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

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


def tiny_flux_pipeline(dynamic_shifting: bool = True):
    """A random-weight ``FluxPipeline`` (diffusers' dummy Flux components; the tiny T5 reads the hand-made CLIP
    tokenizer's ids). ``dynamic_shifting``: Flux's scheduler config (resolution-dependent shift through ``mu``),
    else diffusers' dummy one (no dynamic shifting, though the pipeline still passes ``mu``); 8 x 8 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_clip_tokenizer()
    t5 = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    transformer = _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]))
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
                 if dynamic_shifting else FlowMatchEulerDiscreteScheduler())
    return FluxPipeline(
        transformer=transformer, vae=_flow_vae(latent_channels=1), scheduler=scheduler,
        text_encoder=_seeded(lambda: CLIPTextModel(_clip_config(tokenizer, hidden_act="gelu", projection_dim=32))),
        tokenizer=tokenizer, text_encoder_2=_seeded(lambda: T5EncoderModel(t5)), tokenizer_2=tokenizer)


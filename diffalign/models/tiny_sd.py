"""A tiny, randomly initialised Stable Diffusion pipeline, built offline.

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

__all__ = ["TINY_SD_WORDS", "tiny_clip_tokenizer", "tiny_stable_diffusion_pipeline"]

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

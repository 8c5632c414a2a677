"""Rewards that need no downloaded weights: JPEG (in)compressibility (DDPO/D3PO) and pixel statistics."""

from __future__ import annotations

import io

import torch
from PIL import Image

from .registry import register_reward


def _to_pil(image: torch.Tensor) -> Image.Image:
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image saved as JPEG at ``quality`` (DDPO's measure)."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        _to_pil(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes)


def _luma(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images[:, 0]
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    return 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R BT.601


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95):
    """Negative JPEG size in kB: smaller files (simpler images) score higher."""
    return lambda images, prompts, metadata: (-jpeg_size_kb(images, quality), {})


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95):
    """JPEG size in kB: more detailed images score higher."""
    return lambda images, prompts, metadata: (jpeg_size_kb(images, quality), {})


@register_reward("brightness", differentiable=True)
def brightness():
    """Mean luma (BT.601) in [0, 1]. D3PO's ``light_reward`` is the plain mean over channels: the same on greyscale
    images, and another ranking of coloured ones (green is brighter than magenta in luma, darker in the mean)."""
    return lambda images, prompts, metadata: (_luma(images).mean(dim=(1, 2)), {})


@register_reward("contrast", differentiable=True)
def contrast():
    """Standard deviation of luma (RMS contrast)."""
    return lambda images, prompts, metadata: (_luma(images).flatten(1).std(dim=1), {})


@register_reward("saturation", differentiable=True)
def saturation():
    """Mean HSV saturation (max - min) / max over RGB; 0 for grey images."""

    def fn(images, prompts, metadata):
        hi, lo = images.amax(dim=1), images.amin(dim=1)
        return ((hi - lo) / hi.clamp_min(1e-6)).mean(dim=(1, 2)), {}

    return fn

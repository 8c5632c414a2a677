"""Validation of image batches at the library's boundaries (rewards, FID)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def check_images(images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
    """Validate a reward input batch; uint8 images are converted to [0, 1] floats.

    Raises ValueError/TypeError naming the problem and the fix for: non-tensors, wrong rank, channels other than
    1 or 3, an empty batch, float values outside [0, 1], and a prompt list of the wrong length.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [N, C, H, W], got {type(images).__name__}.")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}.")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch; pass at least one image.")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (NCHW), got {images.shape[1]} "
                         f"(shape {tuple(images.shape)}); channels-last arrays need .permute(0, 3, 1, 2).")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point():
        raise TypeError(f"images must be float in [0, 1] or uint8, got {images.dtype}.")
    else:
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("images contain NaN/Inf.")
        if lo < -1e-3 or hi > 1 + 1e-3:
            hint = " (looks like [-1, 1]: use (x + 1) / 2)" if lo < 0 else " (looks like 0..255: divide by 255)"
            raise ValueError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}.")
        images = images.clamp(0, 1)
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images; pass one prompt per image.")
    return images


def save_image(image: torch.Tensor, path) -> None:
    """Save one [C, H, W] float image in [0, 1] as PNG (grey for one channel)."""
    from PIL import Image

    arr = (check_images(image[None])[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)

"""Small built-in data sets used by the closed-form reference models."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_digits_tensor"]


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)  # [1797, 8, 8], integer values 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    images = images / 8.0 - 1.0  # exact in binary floating point: 0..16 -> [-1, 1]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_tensor(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Return scikit-learn's 8x8 digits as images and labels.

    Returns:
        ``(images, labels)``: images of shape ``[1797, 1, 8, 8]`` and the given ``dtype``, with the
        original grey levels ``0..16`` mapped linearly (and exactly) onto ``[-1, 1]``; labels are an
        ``int64`` tensor of shape ``[1797]`` with the digit classes ``0..9``.
    """
    images, labels = _digits_arrays()
    x = torch.tensor(images, dtype=dtype).unsqueeze(1)
    y = torch.tensor(labels, dtype=torch.int64)
    return x, y

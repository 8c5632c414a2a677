"""Shipped class-conditional diffusion models (``builtin:digits``, ``builtin:fashion``): specs, data and loaders.

Each model is a pixel-space diffusers :class:`~diffusers.UNet2DModel` with a class embedding of
``num_classes + 1`` entries (the last one is the null class used for classifier-free guidance), trained with
epsilon prediction on a linear beta schedule, plus a small CNN classifier on the same data whose penultimate
features serve as the FID feature network and whose class probabilities serve as a prompt-following reward.

Weights live in ``diffalign/models/weights/<name>/`` as safetensors (never pickles) and are produced by
``python scripts/train_builtin.py --model <name> --what all``.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BUILTIN_MODELS",
    "FASHION_DIR",
    "BuiltinSpec",
    "ClassifierFeatures",
    "GuidedUNet",
    "MissingWeightsError",
    "SmallClassifier",
    "builtin_spec",
    "fashion_available",
    "label_for_prompt",
    "load_builtin_classifier",
    "load_builtin_data",
    "load_builtin_unet",
    "load_fid_stats",
    "translate",
    "weights_dir",
]

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}
"""The training noise schedule of both models (DDPM's linear betas; see the model cards for why not cosine)."""

DIGIT_LABELS = tuple(str(i) for i in range(10))
DIGIT_ALIASES = dict(zip(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
                         range(10), strict=True))
FASHION_LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot")
FASHION_ALIASES = {"tshirt": 0, "top": 0, "t-shirt/top": 0, "trousers": 1, "pants": 1, "sweater": 2, "jumper": 2,
                   "sandals": 5, "sneakers": 7, "shoe": 7, "handbag": 8, "boot": 9, "ankle-boot": 9, "ankle_boot": 9}


@dataclass(frozen=True)
class BuiltinSpec:
    """Everything needed to build, train and load one shipped model."""

    name: str
    description: str
    class_names: tuple[str, ...]
    aliases: dict[str, int]
    image_size: int
    unet_config: dict
    classifier_config: dict
    train_defaults: dict
    noise_schedule: dict = field(default_factory=lambda: dict(NOISE_SCHEDULE))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_label(self) -> int:
        return len(self.class_names)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)


def _unet_config(sample_size: int, channels: tuple[int, ...], layers: int, attention: bool, groups: int) -> dict:
    n = len(channels)
    return {
        "sample_size": sample_size,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": list(channels),
        "layers_per_block": layers,
        "down_block_types": ["DownBlock2D"] * n,
        "up_block_types": ["UpBlock2D"] * n,
        "add_attention": attention,
        "norm_num_groups": groups,
        "num_class_embeds": 11,
    }


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    "digits": BuiltinSpec(
        name="digits",
        description="class-conditional UNet trained on scikit-learn's 8x8 digits (prompts '0'..'9' or 'zero'..)",
        class_names=DIGIT_LABELS,
        aliases=DIGIT_ALIASES,
        image_size=8,
        unet_config=_unet_config(8, (32, 64), 1, True, 8),
        classifier_config={"in_channels": 1, "num_classes": 10, "width": 32, "feature_dim": 64, "image_size": 8},
        train_defaults={"steps": 1500, "batch_size": 128, "lr": 2e-3, "warmup": 200, "ema_decay": 0.995,
                        "class_dropout": 0.12, "min_snr_gamma": 5.0, "classifier_epochs": 30,
                        "checkpoint_every": 500},
    ),
    "fashion": BuiltinSpec(
        name="fashion",
        description="class-conditional UNet trained on Fashion-MNIST, 32x32 (prompts 'sneaker', 'bag', ...)",
        class_names=FASHION_LABELS,
        aliases=FASHION_ALIASES,
        image_size=32,
        unet_config=_unet_config(32, (32, 64, 128), 1, False, 8),
        classifier_config={"in_channels": 1, "num_classes": 10, "width": 16, "feature_dim": 128, "image_size": 32},
        train_defaults={"steps": 2200, "batch_size": 64, "lr": 2e-3, "warmup": 200, "ema_decay": 0.997,
                        "class_dropout": 0.12, "min_snr_gamma": 5.0, "classifier_epochs": 3,
                        "checkpoint_every": 200},
    ),
}


class MissingWeightsError(FileNotFoundError):
    """A shipped weights file is missing; the message says which and how to produce it."""


def builtin_spec(name: str) -> BuiltinSpec:
    """The spec of ``name`` (``"fashion"`` or ``"builtin:fashion"``); unknown names list the valid ones."""
    key = name.split(":", 1)[1] if name.startswith("builtin:") else name
    if key not in BUILTIN_MODELS:
        valid = ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS)
        raise ValueError(f"unknown built-in model {name!r}; valid names: {valid}.")
    return BUILTIN_MODELS[key]


def weights_dir(name: str) -> Path:
    return WEIGHTS_ROOT / builtin_spec(name).name


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.strip().lower())


def label_for_prompt(prompt: str, class_names, aliases=None) -> int:
    """Class index of a prompt: a class name, an alias, or the index itself (case and punctuation ignored)."""
    p = prompt.strip().lower()
    if p.isdigit() and int(p) < len(class_names) and p not in {c.lower() for c in class_names}:
        return int(p)
    table = {_normalise(c): i for i, c in enumerate(class_names)}
    for k, v in (aliases or {}).items():
        table.setdefault(_normalise(k), int(v))
    key = _normalise(p)
    if key in table:
        return table[key]
    raise ValueError(f"prompt {prompt!r} names no class; use one of {', '.join(class_names)}.")


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------


def fashion_available() -> bool:
    return all((FASHION_DIR / f).is_file() for f in _FASHION_FILES.values())


_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


@lru_cache(maxsize=1)
def _fashion_arrays() -> dict[str, np.ndarray]:
    if not fashion_available():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {FASHION_DIR}; install the Debian package: "
            "`apt-get update && apt-get install -y dataset-fashion-mnist`.")

    def idx(key: str, offset: int) -> np.ndarray:
        with gzip.open(FASHION_DIR / _FASHION_FILES[key]) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    return {"train_x": idx("train_x", 16).reshape(-1, 28, 28), "train_y": idx("train_y", 8).astype(np.int64),
            "test_x": idx("test_x", 16).reshape(-1, 28, 28), "test_y": idx("test_y", 8).astype(np.int64)}


def _fashion_tensor(x: np.ndarray) -> Tensor:
    t = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    return nn.functional.pad(t, (2, 2, 2, 2), value=-1.0)  # background (0 -> -1) padding to 32x32


def translate(x: Tensor, dy: Tensor, dx: Tensor, shift: int) -> Tensor:
    """Move image ``i`` of ``x`` ``[N, C, H, W]`` by ``(dy[i] - shift, dx[i] - shift)`` pixels, offsets in
    ``[0, 2 * shift]``, filling with the background value (-1): the training scripts' augmentation."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    rows = dy[:, None] + torch.arange(h)[None]
    cols = dx[:, None] + torch.arange(w)[None]
    return padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def load_builtin_data(name: str, split: str = "train") -> tuple[Tensor, Tensor]:
    """Training (``"train"``) or held-out (``"test"``) images in [-1, 1] ``[N, 1, H, W]`` float32, and labels.

    digits: scikit-learn's 1,797 images split by a fixed seeded permutation into 1,297 train / 500 held-out.
    fashion: the official 60,000 / 10,000 Fashion-MNIST split, 28x28 padded to 32x32 with the background value.
    """
    spec = builtin_spec(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if spec.name == "digits":
        from .data import load_digits_tensor

        x, y = load_digits_tensor(torch.float32)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        idx = perm[500:] if split == "train" else perm[:500]
        return x[idx].contiguous(), y[idx].contiguous()
    arrays = _fashion_arrays()
    return _fashion_tensor(arrays[f"{split}_x"]), torch.from_numpy(arrays[f"{split}_y"].copy())


# --------------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------------


class SmallClassifier(nn.Module):
    """A small CNN on [-1, 1] images: ``features(x)`` is the penultimate embedding, ``forward(x)`` the logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128,
                 image_size: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        layers = [*block(in_channels, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w)]
        if image_size >= 16:
            layers += [nn.MaxPool2d(2), *block(2 * w, 4 * w)]
            out = 4 * w
        else:
            out = 2 * w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(out, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim

    def features(self, x: Tensor) -> Tensor:
        return self.embed(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


class ClassifierFeatures(nn.Module):
    """FID feature module for torchmetrics: images in [0, 1] -> the classifier's penultimate features (float64)."""

    def __init__(self, classifier: SmallClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x.float() if x.is_floating_point() else x.float() / 255.0
        return self.classifier.features(x * 2 - 1).double()


class GuidedUNet(nn.Module):
    """``model(x, t, class_labels)`` -> epsilon, with ``guided(x, t, labels, g)`` for classifier-free guidance.

    ``class_labels=None`` means unconditional (the null class). The guided call runs the conditional and the
    unconditional halves as one batch.
    """

    def __init__(self, unet: nn.Module, null_label: int):
        super().__init__()
        self.unet = unet
        self.null_label = int(null_label)

    def _labels(self, labels: Tensor | None, n: int, device) -> Tensor:
        if labels is None:
            return torch.full((n,), self.null_label, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device).long().reshape(-1)
        return labels.expand(n) if labels.numel() == 1 else labels

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        t = torch.as_tensor(t, device=x.device)
        out = self.unet(x.to(dtype), t, class_labels=self._labels(class_labels, x.shape[0], x.device)).sample
        return out.to(x.dtype)

    def guided(self, x: Tensor, t: Tensor, class_labels: Tensor, guidance: float) -> Tensor:
        n = x.shape[0]
        labels = torch.cat([self._labels(class_labels, n, x.device), self._labels(None, n, x.device)])
        t = torch.as_tensor(t, device=x.device)
        if t.ndim > 0 and t.numel() == n:
            t = torch.cat([t, t])
        cond, uncond = self.forward(torch.cat([x, x]), t, labels).chunk(2)
        return uncond + guidance * (cond - uncond)


# --------------------------------------------------------------------------------------------------------
# Loading shipped weights
# --------------------------------------------------------------------------------------------------------


def _train_command(name: str, what: str = "all") -> str:
    return f"python scripts/train_builtin.py --model {name} --what {what}"


def _require(path: Path, name: str, what: str) -> Path:
    if not path.is_file():
        raise MissingWeightsError(
            f"built-in model 'builtin:{name}' is missing its weights file {path}; produce it with "
            f"`{_train_command(name, what)}` (from the project root).")
    return path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_builtin_unet(name: str, directory: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The shipped :class:`~diffusers.UNet2DModel` (in ``dtype``; weights may be stored as fp16), eval mode."""
    from diffusers import UNet2DModel

    spec = builtin_spec(name)
    d = Path(directory) if directory is not None else weights_dir(name)
    config = _read_json(_require(d / "unet_config.json", spec.name, "unet"))
    state = _load_safetensors(_require(d / "unet.safetensors", spec.name, "unet"))
    unet = UNet2DModel.from_config(config)
    unet.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)


def load_builtin_scheduler_config(name: str) -> dict:
    """The noise schedule the model was trained with (a diffusers scheduler config)."""
    return dict(builtin_spec(name).noise_schedule)


def load_builtin_classifier(name: str, directory: str | Path | None = None) -> SmallClassifier:
    """The shipped classifier (float32, eval mode)."""
    spec = builtin_spec(name)
    d = Path(directory) if directory is not None else weights_dir(name)
    config = _read_json(_require(d / "classifier_config.json", spec.name, "classifier"))
    state = _load_safetensors(_require(d / "classifier.safetensors", spec.name, "classifier"))
    model = SmallClassifier(**config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval().requires_grad_(False)


def load_fid_stats(name: str, directory: str | Path | None = None) -> dict[str, Tensor]:
    """``{"mu", "sigma", "num_samples"}`` of the classifier features of the held-out real set (float64)."""
    spec = builtin_spec(name)
    d = Path(directory) if directory is not None else weights_dir(name)
    return _load_safetensors(_require(d / "fid_stats.safetensors", spec.name, "stats"))


def classifier_input(images: Tensor, image_size: int) -> Tensor:
    """Images in [0, 1] as the shipped (greyscale) classifiers expect them: float32, channel mean, bilinear resize."""
    x = images.float()
    x = x.mean(1, keepdim=True) if x.shape[1] == 3 else x
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


def fid_metric(name: str, directory: str | Path | None = None, device: str | torch.device = "cpu"):
    """A :class:`diffalign.eval.fid.FID` on the shipped classifier's features whose reference is the stored
    held-out statistics; ``add(fake_images_in_[0,1])`` then ``compute()``."""
    from ..eval.fid import FID, classifier_features

    fid = FID(classifier_features(name, directory), device=device)  # RGB or other sizes converted as for FID
    stats = load_fid_stats(name, directory)
    fid.set_reference_stats(stats["mu"], stats["sigma"], int(stats["num_samples"].item()))
    return fid


def builtin_named_parts(name: str, device: str | torch.device = "cpu") -> dict:
    """What :func:`diffalign.models.registry.load_model` needs for a built-in model."""
    spec = builtin_spec(name)
    unet = load_builtin_unet(spec.name).to(device)
    return {"model": GuidedUNet(unet, spec.null_label).eval(), "scheduler_config": load_builtin_scheduler_config(name),
            "sample_shape": spec.sample_shape, "spec": spec}

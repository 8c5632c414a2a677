"""A realism reward for the built-in models that does not share FID's features.

The built-in models' FID and ``prompt_following`` both use the shipped CNN classifier. ``realism`` uses a second,
independently trained network of another kind (a pixel MLP, ``scripts/train_realism.py``) and scores an image by the
log-density of its features under a Gaussian fit of the real training images of the prompted class (class means,
one pooled within-class covariance)::

    realism(x | c) = -(f(x) - mu_c)^T Sigma^-1 (f(x) - mu_c) / (2 D)

(0 at the class mean, about -1/2 for a typical real image). Used as a second term next to a target reward, it
favours changes that keep images like real ones of their class, as judged by a network FID does not use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .registry import register_reward

WEIGHTS_FILE = "realism.safetensors"


class PixelMLP(nn.Module):
    """An MLP on [-1, 1] greyscale images: ``features(x)`` the last hidden layer, ``forward(x)`` the logits."""

    def __init__(self, image_size: int = 32, hidden: int = 128, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, hidden), nn.ReLU(),
                                  nn.Linear(hidden, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.config = {"image_size": image_size, "hidden": hidden, "feature_dim": feature_dim,
                       "num_classes": num_classes}

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def class_gaussians(features: Tensor, labels: Tensor, num_classes: int, shrinkage: float = 0.05
                    ) -> tuple[Tensor, Tensor]:
    """Class means [K, D] and the pooled within-class precision [D, D] (covariance shrunk toward its mean variance
    by ``shrinkage``) of float features with integer labels."""
    f = features.double()
    means = torch.stack([f[labels == k].mean(0) for k in range(num_classes)])
    centred = f - means[labels]
    cov = centred.T @ centred / (len(f) - num_classes)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * cov.trace() / d * torch.eye(d, dtype=cov.dtype)
    return means.float(), torch.linalg.inv(cov).float()


def realism_score(features: Tensor, means: Tensor, precision: Tensor, labels: Tensor) -> Tensor:
    """-(f - mu_c)^T P (f - mu_c) / (2 D) per row."""
    diff = features - means[labels]
    return -0.5 * ((diff @ precision) * diff).sum(-1) / features.shape[-1]


def load_realism(model: str, directory: str | Path | None = None) -> tuple[PixelMLP, Tensor, Tensor]:
    """The realism network (eval mode, frozen), class means and precision shipped with built-in ``model``."""
    from safetensors import safe_open

    from ..models.builtin import builtin_spec, weights_dir

    spec = builtin_spec(model)
    path = Path(directory or weights_dir(model)) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the `realism` reward of builtin:{spec.name} needs it. Train it "
                                f"with `python scripts/train_realism.py --model {spec.name}`.")
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    net = PixelMLP(**config)
    net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
    return net.eval().requires_grad_(False), tensors["means"], tensors["precision"]


@register_reward("realism", differentiable=True)
def realism(model: str = "builtin:fashion"):
    """Feature log-density of the image under its prompted class's real images, from a network FID does not use
    (see the module docstring)."""
    from ..models.builtin import builtin_spec, classifier_input
    from .classifier import prompt_labels

    spec = builtin_spec(model)
    net, means, precision = load_realism(model)
    size = net.config["image_size"]

    def fn(images, prompts, metadata):
        labels = prompt_labels(spec, prompts, images.device)
        f = net.to(images.device).features(classifier_input(images, size) * 2 - 1)
        return realism_score(f, means.to(f.device), precision.to(f.device), labels), {}

    return fn

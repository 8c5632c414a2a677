"""Models by name: ``reference:digits`` (closed form), the shipped ``builtin:*`` UNets, and any diffusers pipeline
(a local directory or a hub id, :mod:`diffalign.models.pipeline_model`). Names are what ``--model`` accepts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .reference import ReferenceModel, digits_reference_model
from .sampler_data import DC_RATIOS, EMS_DIR, shipped_overrides  # noqa: F401

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class NamedModel:
    """A class-conditional denoiser with its scheduler config and prompt vocabulary."""

    name: str
    model: ReferenceModel
    scheduler_config: dict
    class_names: tuple[str, ...]
    sample_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float64
    extra: dict = field(default_factory=dict)
    sampler_overrides: dict = field(default_factory=dict)
    """Per-sampler scheduler config entries for this model (calibration data), e.g. DC-Solver's ratio files."""

    def prompt_to_label(self, prompt: str) -> int:
        """Class index of a prompt: a class name ("seven") or its index ("7")."""
        p = prompt.strip().lower()
        if p.isdigit() and int(p) < len(self.class_names):
            return int(p)
        if p in self.class_names:
            return self.class_names.index(p)
        raise ValueError(f"prompt {prompt!r} names no class of {self.name}; use one of {', '.join(self.class_names)}.")

    def predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: float) -> torch.Tensor:
        """Model output (the scheduler config's prediction type), classifier-free guided when ``guidance != 1``."""
        if labels is None:
            return self.model(x, t)
        if guidance == 1.0:
            return self.model(x, t, labels)
        return self.model.guided(x, t, labels, guidance)


MODELS = {"reference:digits": "closed-form Gaussian mixture on scikit-learn's 8x8 digits (zero model error)"}
MODELS.update({
    "builtin:digits": "shipped class-conditional UNet trained on scikit-learn's 8x8 digits (real model error)",
    "builtin:fashion": "shipped class-conditional UNet trained on Fashion-MNIST 32x32 (prompts 'sneaker', 'bag', ...)",
})


def load_model(name: str, device: str | torch.device = "cpu", prompts: Sequence[str] | None = None) -> NamedModel:
    """Load a model by name (see :data:`MODELS`), or a diffusers pipeline from a local directory or a hub id.

    ``prompts``: the prompts a text-to-image pipeline is conditioned on (label k is the k-th prompt); the registry's
    models and class-conditional pipelines have their class names instead.
    """
    if prompts and name in MODELS:
        raise ValueError(f"{name} is class-conditional: its prompts are its class names; drop --prompt.")
    if name == "reference:digits":
        config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                  "prediction_type": "epsilon"}
        model = digits_reference_model(config).to(device)
        return NamedModel(name, model, config, DIGIT_NAMES, (1, 8, 8), sampler_overrides=shipped_overrides(name))
    if name.startswith("builtin:"):
        return _load_builtin(name, device)
    if ":" in name or ("/" not in name and not Path(name).expanduser().is_dir()):
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}, a diffusers pipeline directory or a "
                         "hub id (org/name).")
    from .pipeline_model import pipeline_named_model

    return pipeline_named_model(name, device=device, prompts=prompts)


def _load_builtin(name: str, device: str | torch.device) -> NamedModel:
    """A shipped UNet (``builtin:digits``/``builtin:fashion``) as a float32 :class:`NamedModel`: ``model(x, t, labels)``
    gives epsilon (``labels=None``: the null class) and ``model.guided(x, t, labels, g)`` the guided epsilon."""
    from .builtin import builtin_named_parts

    parts = builtin_named_parts(name, device)  # unknown builtin names raise a ValueError listing the valid ones
    spec = parts["spec"]
    class_names = DIGIT_NAMES if spec.name == "digits" else spec.class_names

    def datapoints(k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """K training images and labels (EMS datapoints, as the DPM-Solver-v3 paper uses the data set)."""
        from .builtin import load_builtin_data

        images, labels = load_builtin_data(spec.name, split="train")
        idx = torch.randperm(len(images), generator=generator)[:k]
        return images[idx].to(device), labels[idx].to(device)

    return NamedModel(name, parts["model"], parts["scheduler_config"], class_names, parts["sample_shape"],
                      dtype=torch.float32, extra={"null_label": spec.null_label, "spec": spec,
                                                  "datapoints": datapoints}, sampler_overrides=shipped_overrides(name))

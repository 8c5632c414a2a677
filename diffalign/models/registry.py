"""Models by name: ``reference:digits`` (closed form). Names are what ``--model`` accepts on the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .reference import ReferenceModel, digits_reference_model

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


def load_model(name: str, device: str | torch.device = "cpu") -> NamedModel:
    """Load a model by name (see :data:`MODELS`)."""
    if name == "reference:digits":
        config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                  "prediction_type": "epsilon"}
        model = digits_reference_model(config).to(device)
        return NamedModel(name, model, config, DIGIT_NAMES, (1, 8, 8))
    raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}.")

"""Any diffusers pipeline as a :class:`~diffalign.models.registry.NamedModel`, so that the commands that work on a
model's denoiser (``bench samplers``, ``calibrate timesteps``, ``calibrate dc``, ``ems compute``) take a local
diffusers directory, a ``diffalign train`` output directory or a hub id as well as the registry's names.

The denoiser works in the pipeline's sample space (latents where it has a VAE). Conditioning comes from the
alignment policy's adapter (:class:`~diffalign.align.policy.Policy`): class labels for a
:class:`~diffalign.pipelines.ClassConditionalPipeline`, CLIP text embeddings of a fixed prompt list for a Stable
Diffusion or SDXL pipeline. Label ``k`` means the k-th class name or prompt; ``labels=None`` is the null class /
empty prompt.
A scheduler config with ``timestep_spacing="leading"`` is read as ``"trailing"``, so that every sampler and step count
starts from the same first sigma, as the error benchmark and the time-step search compare them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_PROMPTS = ("a photograph of a cat", "a red car on a street", "a bowl of fruit on a table",
                   "a mountain landscape at sunset")
"""The prompts a text-to-image pipeline is evaluated on when none are given (label k is the k-th prompt)."""


class PipelineDenoiser(nn.Module):
    """``model(x, t, labels)`` -> the pipeline UNet's output, ``guided(x, t, labels, g)`` classifier-free guided."""

    def __init__(self, policy, prompts: Sequence[str]):
        super().__init__()
        self.policy = policy
        self.unet = policy.unet  # registered, so that .to() / .parameters() reach the network
        self.prompts = policy.check_prompts(prompts)
        self.conditions = policy.encode(self.prompts)

    def _condition(self, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        if labels is None:
            return self.policy.null_condition(n)
        labels = torch.as_tensor(labels, device=self.conditions.device).long().reshape(-1)
        cond = self.conditions[labels]
        return cond.expand(n, *cond.shape[1:]) if labels.numel() == 1 else cond

    def _predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: float) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)  # the policy broadcasts a single timestep
        out = self.policy.predict(x.to(self.policy.dtype), t, self._condition(labels, x.shape[0]), guidance)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self._predict(x, t, labels, 1.0)

    def guided(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        return self._predict(x, t, labels, float(guidance))


def pipeline_named_model(name_or_path: str, device: str | torch.device = "cpu",
                         prompts: Sequence[str] | None = None):
    """A :class:`~diffalign.models.registry.NamedModel` over the pipeline :func:`diffalign.load_pipeline` loads.

    ``prompts`` are a text-to-image pipeline's "classes" (default :data:`DEFAULT_PROMPTS`); a class-conditional
    pipeline uses its own class names and refuses ``prompts``.
    """
    from ..pipelines.class_conditional import load_pipeline

    return named_model_of_pipeline(load_pipeline(name_or_path, device=device), name_or_path, prompts)


def named_model_of_pipeline(pipe, name: str, prompts: Sequence[str] | None = None):
    """:func:`pipeline_named_model` for a pipeline already loaded (``name`` is what the model is recorded as)."""
    from ..align.policy import Policy
    from .registry import NamedModel

    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(pipe, "scheduler", None) is None:
        raise TypeError(f"{name!r} loads as a {type(pipe).__name__}, which has no UNet and scheduler: the sampler "
                        "commands support UNet pipelines (Stable Diffusion 1.x / 2.x, SDXL, diffalign's "
                        "class-conditional).")
    policy = Policy(pipe)
    if policy.is_text:
        names = tuple(prompts) if prompts else DEFAULT_PROMPTS
    else:
        if prompts:
            raise ValueError(f"{name!r} is class-conditional: its prompts are its class names "
                             f"({', '.join(pipe.config.class_names)}); drop --prompt.")
        names = tuple(pipe.config.class_names)
    model = PipelineDenoiser(policy, names).eval()
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    if config.get("timestep_spacing") == "leading":
        # the benchmark and the searches run every sampler from one first sigma (the last training step); "leading"
        # spacing starts lower the fewer the steps (Stable Diffusion 1.x's configs), "trailing" at the last step
        config["timestep_spacing"] = "trailing"
    return NamedModel(name, model, config, names, tuple(policy.latent_shape), dtype=policy.dtype,
                      extra={"pipeline": pipe})

"""Rewards from the built-in models' shipped classifiers (no downloads): prompt following and confidence."""

from __future__ import annotations

import torch

from .registry import register_reward


def prompt_labels(spec, prompts, device) -> torch.Tensor:
    """Class indices [N] of a built-in model's prompts (``spec``: its :class:`BuiltinSpec`)."""
    from ..models.builtin import label_for_prompt

    return torch.tensor([label_for_prompt(p, spec.class_names, spec.aliases) for p in prompts], device=device)


def _classifier_and_labels(model: str):
    from ..models.builtin import builtin_spec, classifier_input, load_builtin_classifier

    spec = builtin_spec(model)
    classifier = load_builtin_classifier(model)
    size = spec.image_size

    def log_probs(images: torch.Tensor) -> torch.Tensor:
        x = classifier_input(images, size)
        return classifier.to(images.device)(x * 2 - 1).log_softmax(-1)

    def labels(prompts, device) -> torch.Tensor:
        return prompt_labels(spec, prompts, device)

    return log_probs, labels


@register_reward("prompt_following", differentiable=True)
def prompt_following(model: str = "builtin:fashion", log: bool = False):
    """Probability (or log-probability) the shipped classifier of ``model`` gives to the prompted class."""
    log_probs, labels = _classifier_and_labels(model)

    def fn(images, prompts, metadata):
        lp = log_probs(images)
        chosen = lp.gather(1, labels(prompts, images.device)[:, None])[:, 0]
        return (chosen if log else chosen.exp()), {"predicted": lp.argmax(-1)}

    return fn


@register_reward("classifier_confidence", differentiable=True)
def classifier_confidence(model: str = "builtin:fashion"):
    """Max class probability of the shipped classifier: an offline "aesthetic" proxy (clear, typical items)."""
    log_probs, _ = _classifier_and_labels(model)
    return lambda images, prompts, metadata: (log_probs(images).exp().amax(-1), {})


@register_reward("prompt_log_prob", differentiable=True)
def prompt_log_prob(model: str = "builtin:fashion"):
    """Log-probability the shipped classifier gives to the prompted class (``prompt_following`` on a log scale:
    the same ranking of images, without the ceiling at 1)."""
    return prompt_following(model=model, log=True)

"""Rewards as the alignment methods and their evaluation use them: built from a config string, checked when
they score."""

from __future__ import annotations

import torch

from ..rewards import combine, get_reward
from ..rewards.registry import reward_accepts


def reward_names(spec: str) -> list[str]:
    """The reward names of a spec: ``"a,b"`` -> ``["a", "b"]`` (blanks dropped)."""
    return [n.strip() for n in spec.split(",") if n.strip()]


def build_reward(spec: str, model: str, kwargs: dict | None = None):
    """A reward by name; ``"a,b"`` is the vector reward of both (Pareto-compared). Classifier rewards of the
    shipped models default to the model being trained."""
    names = reward_names(spec)
    if not names:
        raise ValueError("no reward given; name one (see `diffalign.rewards.available_rewards()`).")
    per = {}
    for name in names:  # a vector reward's kwargs are keyed by reward name
        kw = dict((kwargs or {}).get(name, {}) if len(names) > 1 else (kwargs or {}))
        if "model" not in kw and model.startswith("builtin:") and reward_accepts(name, "model"):
            kw["model"] = model
        per[name] = kw
    if len(names) == 1:
        return get_reward(names[0], **per[names[0]])
    return combine(names, mode="vector", **per)


def score(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Rewards [N, K] of the images, on the images' device, scored outside any autocast (at the reward's own
    precision, also during a mixed-precision step); a non-finite reward is an error naming the reward."""
    with torch.autocast(images.device.type, enabled=False):
        values, _ = reward(images, prompts)
    if not torch.isfinite(values).all():
        raise FloatingPointError(f"reward {getattr(reward, 'name', reward)!r} returned NaN/Inf for "
                                 f"{int((~torch.isfinite(values)).sum())} of {values.numel()} values; fix the reward.")
    return values.reshape(values.shape[0], -1).to(images.device)

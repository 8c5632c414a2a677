"""The reward protocol, input validation and combination of rewards."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..images import check_images

Rewards = tuple[torch.Tensor, dict]


@runtime_checkable
class RewardModel(Protocol):
    """``reward(images, prompts, metadata) -> (rewards, info)``, the ddpo-pytorch / d3po / trl signature.

    ``images``: float tensor [N, C, H, W] in [0, 1] (C = 1 or 3); ``prompts``: N strings; ``metadata``: N dicts or
    None. Returns rewards [N] (or [N, K] for K objectives) and a dict of extra information.
    """

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping] | None = None
                 ) -> Rewards: ...


class Reward:
    """A validated reward: wraps a function with the protocol's signature.

    The function may return a numpy array, a list or a tensor (optionally with an info dict, as ddpo-pytorch
    reward functions do); the result is always ``(float tensor [N] or [N, K], dict)``. Rewards are computed
    without gradients unless ``differentiable=True`` (only for rewards whose function supports it).
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None, differentiable: bool = False):
        self.fn, self.name, self.differentiable = fn, name or getattr(fn, "__name__", "reward"), differentiable

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None,
                 metadata: Sequence[Mapping] | None = None) -> Rewards:
        images = check_images(images, prompts)
        prompts = list(prompts) if prompts is not None else [""] * images.shape[0]
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            out = self.fn(images, prompts, metadata)
        values, info = out if isinstance(out, tuple) else (out, {})
        values = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
        if values.shape[0] != images.shape[0] or values.ndim not in (1, 2):
            raise ValueError(f"reward {self.name!r} returned shape {tuple(values.shape)} for {images.shape[0]} images; "
                             "expected [N] or [N, K].")
        return values.float(), dict(info)

    def __repr__(self) -> str:
        return f"Reward({self.name!r})"


def as_reward(fn: Callable[..., Any] | Reward, name: str | None = None) -> Reward:
    """Wrap a plain ``fn(images, prompts, metadata)`` (ddpo-pytorch style) as a validated :class:`Reward`."""
    return fn if isinstance(fn, Reward) else Reward(fn, name)


def combine(rewards: Mapping[str, float] | Sequence[str], mode: str = "sum", **kwargs) -> Reward:
    """Combine registered rewards: ``mode="sum"`` weighted sum (a mapping name -> weight), or ``mode="vector"``
    an [N, K] multi-objective reward (for Pareto comparison, as D3PO's ``compare``)."""
    from .registry import get_reward

    weights = dict(rewards) if isinstance(rewards, Mapping) else {name: 1.0 for name in rewards}
    if mode not in ("sum", "vector"):
        raise ValueError(f"mode={mode!r}; use 'sum' or 'vector'.")
    parts = {name: get_reward(name, **kwargs.get(name, {})) for name in weights}

    def combined(images, prompts, metadata):
        values, info = [], {}
        for name, reward in parts.items():
            v, i = reward(images, prompts, metadata)
            values.append(v.reshape(v.shape[0], -1) * weights[name])
            info.update({f"{name}/{k}": x for k, x in i.items()})
        stacked = torch.cat(values, dim=1)
        return (stacked.sum(dim=1) if mode == "sum" else stacked), info

    return Reward(combined, name="+".join(parts) if mode == "sum" else "|".join(parts))


def pareto_compare(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """+1 where reward vector ``a`` Pareto-dominates ``b``, -1 where ``b`` dominates ``a``, 0 otherwise (ties)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    a_dom = (a >= b).all(1) & (a > b).any(1)
    b_dom = (b >= a).all(1) & (b > a).any(1)
    return a_dom.long() - b_dom.long()

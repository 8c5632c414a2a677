"""Reward registry: built-ins plus third-party rewards found through the ``diffalign.rewards`` entry-point group.

A package adds a reward without touching diffalign by declaring, in its pyproject.toml::

    [project.entry-points."diffalign.rewards"]
    my_reward = "my_pkg.rewards:make_my_reward"   # a factory: make_my_reward(**kwargs) -> reward function

A factory with ``differentiable = True`` as an attribute supports ``get_reward(..., differentiable=True)``. An
entry point cannot replace a built-in: one with a built-in's name is ignored, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib.metadata import entry_points

from .base import Reward

ENTRY_POINT_GROUP = "diffalign.rewards"
_FACTORIES: dict[str, tuple[Callable[..., Callable], bool]] = {}


def register_reward(name: str, differentiable: bool = False):
    """Decorator registering a reward factory ``factory(**kwargs) -> fn(images, prompts, metadata)``."""

    def decorator(factory):
        _FACTORIES[name] = (factory, differentiable)
        return factory

    return decorator


def _entry_point_factories() -> dict[str, object]:
    """Installed entry points by name, without those that would shadow a built-in (warned about)."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in sorted(set(found) & set(_FACTORIES)):
        warnings.warn(f"the entry point {found.pop(name).value!r} registers a reward named {name!r}, which is a "
                      "built-in; it is ignored (give it another name).", stacklevel=3)
    return found


def available_rewards() -> list[str]:
    """Names accepted by :func:`get_reward` (built-ins and installed entry points)."""
    _load_builtins()
    return sorted(set(_FACTORIES) | set(_entry_point_factories()))


def get_reward(name: str, differentiable: bool = False, **kwargs) -> Reward:
    """Instantiate the reward registered as ``name`` with ``kwargs``."""
    _load_builtins()
    if name in _FACTORIES:
        factory, supports_grad = _FACTORIES[name]
    else:
        eps = _entry_point_factories()
        if name not in eps:
            raise ValueError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}.")
        factory = eps[name].load()
        supports_grad = bool(getattr(factory, "differentiable", False))
    if differentiable and not supports_grad:
        raise ValueError(f"reward {name!r} is not differentiable; use differentiable=False.")
    fn = factory(**kwargs)
    if isinstance(fn, Reward):
        return fn
    return Reward(fn, name=name, differentiable=differentiable)


def _load_builtins() -> None:
    from . import builtin, classifier, realism  # noqa: F401  (registers on import)
    from .hub import RewardUnavailableError  # noqa: F401  (registers the weight-backed rewards on import)


def reward_accepts(name: str, parameter: str) -> bool:
    """Whether the factory of reward ``name`` takes the keyword ``parameter`` (e.g. ``model``)."""
    import inspect

    _load_builtins()
    if name in _FACTORIES:
        factory = _FACTORIES[name][0]
    elif name in (eps := _entry_point_factories()):
        factory = eps[name].load()
    else:
        return False
    return parameter in inspect.signature(factory).parameters

"""diffalign's samplers: diffusers schedulers, usable in any diffusers pipeline.

    pipe.scheduler = diffalign.samplers.DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = diffalign.samplers.make_scheduler("dpm-solver++", pipe.scheduler.config, solver_order=3)
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import DiffAlignScheduler
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverScheduler
from .dpm_solver_pp import DPMSolverPlusPlusScheduler
from .loop import sample, trajectory
from .pndm import PNDMScheduler

SAMPLERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "dpm-solver": DPMSolverScheduler,
    "dpm-solver++": DPMSolverPlusPlusScheduler,
    "pndm": PNDMScheduler,
}
"""Registry: sampler name -> scheduler class."""


def get_scheduler_class(name: str) -> type:
    """The scheduler class registered as ``name`` (``diffusers:<ClassName>`` names a diffusers scheduler)."""
    if name.startswith("diffusers:"):
        import diffusers

        cls = getattr(diffusers, name.split(":", 1)[1], None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ValueError(f"unknown diffusers scheduler {name!r}; e.g. 'diffusers:DPMSolverMultistepScheduler'.")
        return cls
    try:
        return SAMPLERS[name]
    except KeyError:
        valid = ", ".join(sorted(SAMPLERS))
        raise ValueError(f"unknown sampler {name!r}; valid names: {valid} (or diffusers:<SchedulerClass>).") from None


def make_scheduler(name: str, config: Mapping | None = None, **overrides):
    """Instantiate sampler ``name`` from a (pipeline's) scheduler config with ``overrides``."""
    cls = get_scheduler_class(name)
    return cls.from_config(dict(config or {}), **overrides)


__all__ = [
    "SAMPLERS",
    "DDIMScheduler",
    "DPMSolverScheduler",
    "DPMSolverPlusPlusScheduler",
    "DiffAlignScheduler",
    "PNDMScheduler",
    "get_scheduler_class",
    "make_scheduler",
    "sample",
    "trajectory",
]

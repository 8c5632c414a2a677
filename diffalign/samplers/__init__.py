"""diffalign's samplers: diffusers schedulers, usable in any diffusers pipeline.

    pipe.scheduler = diffalign.samplers.DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = diffalign.samplers.make_scheduler("dpm-solver++", pipe.scheduler.config, solver_order=3)
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import DiffAlignScheduler, init_defaults
from .dc_solver import DCSolverScheduler
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverScheduler
from .dpm_solver_pp import DPMSolverPlusPlusScheduler
from .dpm_solver_v3 import DPMSolverV3Scheduler
from .dualfast import dualfast_class
from .gaussian_ei import GaussianEIScheduler
from .loop import sample, trajectory
from .pndm import PNDMScheduler
from .unipc import UniPCScheduler

SAMPLERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "dpm-solver": DPMSolverScheduler,
    "dpm-solver++": DPMSolverPlusPlusScheduler,
    "dpm-solver-v3": DPMSolverV3Scheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCScheduler,
    "dc-solver": DCSolverScheduler,
    "gaussian-ei": GaussianEIScheduler,
}
"""Registry: sampler name -> scheduler class."""

SAMPLERS.update({f"dualfast:{name}": dualfast_class(cls) for name, cls in list(SAMPLERS.items())})
"""DualFast wraps every sampler: ``dualfast:<name>`` (see :mod:`diffalign.samplers.dualfast`)."""


def get_scheduler_class(name: str) -> type:
    """The scheduler class registered as ``name`` (``diffusers:<ClassName>`` names a diffusers scheduler)."""
    if name.startswith("diffusers:"):
        import diffusers

        cls = getattr(diffusers, name.split(":", 1)[1], None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ValueError(f"unknown diffusers scheduler {name!r}; e.g. 'diffusers:DPMSolverMultistepScheduler'.")
        return cls
    if name.startswith("dualfast:") and name not in SAMPLERS:
        return dualfast_class(get_scheduler_class(name.split(":", 1)[1]))
    try:
        return SAMPLERS[name]
    except KeyError:
        valid = ", ".join(sorted(SAMPLERS))
        raise ValueError(f"unknown sampler {name!r}; valid names: {valid} (or diffusers:<SchedulerClass>).") from None


def make_scheduler(name: str, config: Mapping | None = None, **overrides):
    """Instantiate sampler ``name`` from a (pipeline's) scheduler config with ``overrides``."""
    cls = get_scheduler_class(name)
    if issubclass(cls, DiffAlignScheduler):
        unknown = sorted(set(overrides) - set(init_defaults(cls)))
        if unknown:
            raise TypeError(f"sampler {name!r} has no option(s) {', '.join(unknown)}; its options: "
                            f"{', '.join(sorted(init_defaults(cls)))}.")
    return cls.from_config(dict(config or {}), **overrides)


__all__ = [
    "SAMPLERS",
    "DDIMScheduler",
    "DPMSolverScheduler",
    "DCSolverScheduler",
    "DPMSolverPlusPlusScheduler",
    "DPMSolverV3Scheduler",
    "DiffAlignScheduler",
    "GaussianEIScheduler",
    "PNDMScheduler",
    "UniPCScheduler",
    "dualfast_class",
    "get_scheduler_class",
    "make_scheduler",
    "sample",
    "trajectory",
]

# Saved pipelines record a component's class as (module, name), and diffusers' loader then looks for its base
# classes (``SchedulerMixin``) in that module: every sampler is recorded under this package, which has both.
from diffusers import SchedulerMixin  # noqa: E402, F401

for _cls in SAMPLERS.values():
    _cls.__module__ = __name__
    globals()[_cls.__name__] = _cls

"""Sampling loops over any diffusers scheduler, as generators (one yield per grid point)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def trajectory(scheduler, model: ModelFn, x_T: torch.Tensor, num_inference_steps: int | None = None,
               generator: torch.Generator | None = None, sigmas=None, timesteps=None) -> Iterator[torch.Tensor]:
    """Yield x after each scheduler step, starting from noise ``x_T`` (unit variance).

    ``model(x, t)`` returns the raw model output (the scheduler's ``prediction_type``). Works with diffalign's
    and diffusers' schedulers alike: ``scale_model_input`` and ``init_noise_sigma`` are honoured. The grid is
    ``num_inference_steps`` steps, or the custom ``sigmas`` or ``timesteps``.
    """
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device=x_T.device)
    elif timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps, device=x_T.device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=x_T.device)
    x = x_T * scheduler.init_noise_sigma
    kwargs = {"generator": generator} if generator is not None else {}
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        yield x


def sample(scheduler, model: ModelFn, x_T: torch.Tensor, num_inference_steps: int | None = None,
           generator: torch.Generator | None = None, sigmas=None, timesteps=None) -> torch.Tensor:
    """The final sample of :func:`trajectory`."""
    x = x_T
    for x_next in trajectory(scheduler, model, x_T, num_inference_steps, generator, sigmas, timesteps):
        x = x_next
    return x


def count_evaluations(scheduler, num_inference_steps: int) -> int:
    """Number of model evaluations the scheduler makes for ``num_inference_steps``."""
    scheduler.set_timesteps(num_inference_steps)
    return len(scheduler.timesteps)

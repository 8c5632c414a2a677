"""DDIM (Song et al. 2021, arXiv 2010.02502) on diffalign's grids.

Eq. 12: x_t = alpha_t x0_s + sqrt(sigma_t^2 - c^2) eps_s + c z, with Eq. 16's
c = eta (sigma_t / sigma_s) sqrt(1 - alpha_s^2 / alpha_t^2) (in VP notation, alpha^2 = alphabar).
eta = 0 is the deterministic DDIM sampler, the first-order DPM-Solver / DPM-Solver++ step.
"""

from __future__ import annotations

import math

from diffusers.configuration_utils import register_to_config

from .base import DiffAlignScheduler, schedule_config


class DDIMScheduler(DiffAlignScheduler):
    """DDIM with any diffalign grid and prediction type; ``eta`` > 0 adds DDIM's stochasticity (pass ``generator``).

    Args:
        eta: stochasticity (0: deterministic ODE sampler, 1: DDPM-like ancestral sampling).
        Shared schedule parameters: :data:`diffalign.samplers.base.SCHEDULE_DEFAULTS`.
    """

    @register_to_config
    @schedule_config
    def __init__(self, *, eta: float = 0.0, **schedule):
        if not 0.0 <= eta:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        self._init_schedule(1)

    def _needs_noise(self) -> bool:
        return self.config.eta > 0

    def _update(self, sample, x0, eps, noise):
        s, t = self._levels[self.step_index], self._levels[self.step_index + 1]
        if self.config.eta == 0 or t.sigma == 0:
            return t.alpha * x0 + t.sigma * eps
        c = self.config.eta * (t.sigma / s.sigma) * math.sqrt(max(0.0, 1.0 - (s.alpha / t.alpha) ** 2))
        c = min(c, t.sigma)
        return t.alpha * x0 + math.sqrt(t.sigma**2 - c**2) * eps + c * noise

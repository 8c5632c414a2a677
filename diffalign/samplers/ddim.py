"""DDIM (Song et al. 2021, arXiv 2010.02502) on diffalign's grids.

Eq. 12: x_t = alpha_t x0_s + sqrt(sigma_t^2 - c^2) eps_s + c z, with Eq. 16's
c = eta (sigma_t / sigma_s) sqrt(1 - alpha_s^2 / alpha_t^2) (in VP notation, alpha^2 = alphabar).
eta = 0 is the deterministic DDIM sampler, the first-order DPM-Solver / DPM-Solver++ step.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config

from .base import DiffAlignScheduler, schedule_config


class DDIMScheduler(DiffAlignScheduler):
    """DDIM with any diffalign grid and prediction type; ``eta`` > 0 adds DDIM's stochasticity (pass ``generator``).

    Takes diffusers' ``DDIMScheduler`` config: ``"leading"`` spacing is DDIM's (T // n apart), and
    ``set_alpha_to_one`` / ``clip_sample`` / ``clip_sample_range`` mean what they mean there. Unlike diffusers'
    DDIM, ``"linspace"`` / ``"trailing"`` steps land on the next grid point (diffusers steps T // n back whatever
    the spacing).

    Args:
        eta: stochasticity (0: deterministic ODE sampler, 1: DDPM-like ancestral sampling).
        set_alpha_to_one: the last step ends at alphabar = 1 (True, sigma 0) or at the first training alphabar
            (False, = ``final_sigmas_type="sigma_min"``); default: from ``final_sigmas_type`` ("zero").
        clip_sample, clip_sample_range: clamp the predicted x0 (pixel-space models).
        Shared schedule parameters: :data:`diffalign.samplers.base.SCHEDULE_DEFAULTS`.
    """

    _linked_keys = (("final_sigmas_type", "set_alpha_to_one"),)
    _leading_ddim = True
    _replaces = ("DDIMScheduler",)

    @register_to_config
    @schedule_config
    def __init__(self, *, eta: float = 0.0, set_alpha_to_one: bool | None = None, final_sigmas_type: str | None = None,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, **schedule):
        if not 0.0 <= eta:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        if clip_sample and self.config.thresholding:
            raise ValueError("clip_sample and thresholding both clip x0; choose one.")
        if not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}.")
        self._resolve_final_alpha()
        self._init_schedule(1)
        self._step_eta: float | None = None
        self._step_clipped: bool | None = None

    def predict_x0_eps(self, model_output, sample, index=None):
        """As the base; with ``clip_sample`` x0 is clamped to +-``clip_sample_range`` and, as in diffusers' DDIM,
        the noise is re-derived from the clamped x0 only with ``step(..., use_clipped_model_output=True)``."""
        x0, eps = super().predict_x0_eps(model_output, sample, index)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
            if getattr(self, "_step_clipped", None):
                lvl = self._levels[self.step_index if index is None else index]
                eps = (sample - lvl.alpha * x0) / lvl.sigma
        return x0, eps

    @property
    def eta(self) -> float:
        """The stochasticity of the current step: ``step(..., eta=)`` where given, else the config's."""
        step_eta = getattr(self, "_step_eta", None)
        return self.config.eta if step_eta is None else step_eta

    def _needs_noise(self) -> bool:
        return self.eta > 0

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             eta: float | None = None, use_clipped_model_output: bool | None = None,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        """One DDIM step, with diffusers' ``DDIMScheduler.step`` signature (``DDIMPipeline`` passes ``eta`` and
        ``use_clipped_model_output``): ``eta`` sets this step's stochasticity (default: the config's). With
        ``thresholding`` the noise is always re-derived from the clipped x0 (``use_clipped_model_output=True``);
        asking for the unclipped one is refused rather than ignored."""
        if eta is not None and not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        if use_clipped_model_output is False and self.config.thresholding:
            raise ValueError("with thresholding, diffalign's DDIM re-derives the noise from the clipped x0; "
                             "use_clipped_model_output=False is not supported.")
        self._step_eta, self._step_clipped = eta, use_clipped_model_output
        try:
            return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                                return_dict=return_dict)
        finally:
            self._step_eta = self._step_clipped = None

    def coefficients(self, index: int) -> tuple[float, float, float]:
        """(alpha_t, sqrt(sigma_t^2 - c^2), c) of Eq. 12 for the step from grid point ``index`` to ``index + 1``."""
        s, t = self._levels[index], self._levels[index + 1]
        if self.eta == 0 or t.sigma == 0:
            return t.alpha, t.sigma, 0.0
        c = self.eta * (t.sigma / s.sigma) * math.sqrt(max(0.0, 1.0 - (s.alpha / t.alpha) ** 2))
        c = min(c, t.sigma)
        return t.alpha, math.sqrt(t.sigma**2 - c**2), c

    def transition(self, model_output: torch.Tensor, sample: torch.Tensor, index: int) -> tuple[torch.Tensor, float]:
        """Mean and standard deviation c of the Gaussian step x_{index} -> x_{index + 1} (Eq. 12), differentiable in
        ``model_output``; c = 0 where the step is deterministic (eta = 0, or the last step to sigma = 0)."""
        x0, eps = self.predict_x0_eps(model_output, sample, index)
        a, b, c = self.coefficients(index)
        return a * x0 + b * eps, c

    def _update(self, sample, x0, eps, noise):
        a, b, c = self.coefficients(self.step_index)
        mean = a * x0 + b * eps
        return mean + c * noise if c > 0 else mean

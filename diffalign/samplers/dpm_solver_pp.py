"""DPM-Solver++ (Lu et al. 2022b, arXiv 2211.01095): exponential integrators of the data-prediction ODE.

Exact solution (Eq. 8): x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_theta dlambda.
Updates (see :mod:`diffalign.samplers.exponential`, with (A, B, H) = (sigma, alpha, -h)):

* order 1 (= DDIM): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s;
* 2M / 3M: multistep (Alg. 2 and App. B; ``midpoint`` or ``heun`` second-order term), as diffusers'
  DPMSolverMultistepScheduler;
* 2S / 3S: singlestep (Alg. 1) through intermediate points uniform in lambda;
* ``algorithm_type="sde-dpmsolver++"``: SDE-DPM-Solver++ (Eq. 18-19; multistep extension as in diffusers).

``thresholding=True`` clips x0 (Imagen's dynamic thresholding): for pixel models it prevents the first step
from blowing up when alpha_T ~ 0 (cosine betas).
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config

from .base import check_choice, schedule_config
from .exponential import ExponentialIntegratorScheduler, divided_differences

ALIASES = {"ode": "dpmsolver++", "sde": "sde-dpmsolver++"}
"""Earlier names of the two algorithm types."""


class DPMSolverPlusPlusScheduler(ExponentialIntegratorScheduler):
    """DPM-Solver++ (data prediction): orders 1-3, multistep or singlestep, ODE or SDE.

    Args:
        solver_order: 1, 2 or 3 (2 is the authors' advice for guided sampling, 3 for unconditional).
        solver_mode: ``"multistep"`` or ``"singlestep"`` (then ``num_inference_steps`` counts model evaluations,
            intermediate points included).
        solver_type: ``"midpoint"`` or ``"heun"`` form of the second-order multistep term.
        algorithm_type: ``"dpmsolver++"`` (the ODE solver) or ``"sde-dpmsolver++"`` (SDE-DPM-Solver++, multistep
            only; pass ``generator``), diffusers' names; ``"ode"`` and ``"sde"`` are accepted for them.
        third_order_form: ``"diffusers"`` (the official/diffusers 3M weights) or ``"taylor"`` (exact Taylor
            weight of the D2 term; globally third order) -- see :mod:`diffalign.samplers.exponential`.
        lower_order_final, euler_at_final: diffusers' rules for the last steps.
        Shared schedule parameters: :data:`diffalign.samplers.base.SCHEDULE_DEFAULTS`.
    """

    _solver_output = "x0"
    _algorithms = {"dpmsolver": "dpmsolver++", "sde-dpmsolver": "sde-dpmsolver++"}

    @register_to_config
    @schedule_config
    def __init__(
        self,
        *,
        solver_order: int = 2,
        solver_mode: str = "multistep",
        solver_type: str = "midpoint",
        algorithm_type: str = "dpmsolver++",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        third_order_form: str = "diffusers",
        **schedule,
    ):
        algorithm_type = ALIASES.get(algorithm_type, algorithm_type)
        if algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            raise ValueError(f"algorithm_type={algorithm_type!r} is DPM-Solver (noise prediction): use "
                             "diffalign.samplers.DPMSolverScheduler, or 'dpmsolver++' / 'sde-dpmsolver++' here.")
        check_choice("algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        self.register_to_config(algorithm_type=algorithm_type)
        if algorithm_type == "sde-dpmsolver++" and solver_mode == "singlestep":
            raise ValueError("algorithm_type='sde-dpmsolver++' needs solver_mode='multistep'.")
        self._init_integrator()

    def _needs_noise(self) -> bool:
        return self.config.algorithm_type == "sde-dpmsolver++"

    def _multistep_update(self, x: torch.Tensor, order: int, noise: torch.Tensor | None) -> torch.Tensor:
        if self.config.algorithm_type == "dpmsolver++":
            return super()._multistep_update(x, order, noise)
        # SDE-DPM-Solver++ (Eq. 18-19): x_t = sigma_t/sigma_s e^{-h} x_s + alpha_t (1 - e^{-2h}) D0
        #                                     + sigma_t sqrt(1 - e^{-2h}) z  (+ higher-order D1, D2 terms)
        i = self.step_index
        s, t = self._levels[i], self._levels[i + 1]
        h = t.lambda_ - s.lambda_
        m = self.model_outputs
        one_m = -math.expm1(-2.0 * h)
        x_t = (t.sigma / s.sigma * math.exp(-h)) * x + t.alpha * one_m * m[-1] + t.sigma * math.sqrt(one_m) * noise
        if order == 1:
            return x_t
        D1, D2 = divided_differences(m, [self._levels[i - k].lambda_ for k in range(order)], h)
        if order == 2 and self.config.solver_type == "midpoint":
            return x_t + 0.5 * t.alpha * one_m * D1
        x_t = x_t + t.alpha * (one_m / (-2.0 * h) + 1.0) * D1
        if order == 3:
            weight = 2.0 if self.config.third_order_form == "taylor" else 1.0
            x_t = x_t + weight * t.alpha * ((one_m - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * D2
        return x_t

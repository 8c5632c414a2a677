"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927): exponential integrators of the noise-prediction ODE.

Exact solution (Eq. 3.4):
    x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps_theta dlambda.
Updates (see :mod:`diffalign.samplers.exponential`, with (A, B, H) = (alpha, sigma, h)):

* DPM-Solver-1 (Eq. 3.7, = DDIM): x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s;
* DPM-Solver-2 / -3 singlestep (Alg. 1-2) through intermediate points uniform in lambda;
* multistep variants (diffusers' deprecated ``algorithm_type="dpmsolver"``) with the same coefficients.

Spacings: ``timestep_spacing="linspace"`` (time-uniform), ``"time_quadratic"``, or ``use_lu_lambdas=True``
(uniform logSNR, the paper's advice for low-resolution models). A step that ends at sigma = 0 is first order
(it returns the data prediction, the paper's "denoise to zero").
"""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from .base import schedule_config
from .exponential import ExponentialIntegratorScheduler


class DPMSolverScheduler(ExponentialIntegratorScheduler):
    """DPM-Solver (noise prediction): orders 1-3, singlestep (the paper's algorithms) or multistep.

    Args:
        solver_order: 1, 2 or 3.
        solver_mode: ``"singlestep"`` or ``"multistep"``; ``num_inference_steps`` counts model evaluations.
        solver_type: ``"midpoint"`` or ``"heun"`` form of the second-order multistep term.
        third_order_form: ``"diffusers"`` (the official/diffusers 3M weights) or ``"taylor"`` (exact Taylor
            weight of the D2 term; globally third order) -- see :mod:`diffalign.samplers.exponential`.
        lower_order_final, euler_at_final: diffusers' rules for the last multistep steps.
        algorithm_type: ``"dpmsolver"`` only (diffusers' name for this method; a ``"dpmsolver++"`` value in a
            switched config is replaced, since the class chooses the method).
        Shared schedule parameters: :data:`diffalign.samplers.base.SCHEDULE_DEFAULTS`.
    """

    _solver_output = "eps"
    _algorithms = {"dpmsolver++": "dpmsolver"}

    @register_to_config
    @schedule_config
    def __init__(
        self,
        *,
        solver_order: int = 3,
        solver_mode: str = "singlestep",
        solver_type: str = "heun",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        third_order_form: str = "diffusers",
        algorithm_type: str = "dpmsolver",
        **schedule,
    ):
        if algorithm_type != "dpmsolver":
            raise ValueError(f"DPMSolverScheduler is DPM-Solver (noise prediction, algorithm_type='dpmsolver'), got "
                             f"algorithm_type={algorithm_type!r}; for data prediction or the SDE solver use "
                             "diffalign.samplers.DPMSolverPlusPlusScheduler.")
        self._init_integrator()

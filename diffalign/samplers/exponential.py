"""Exponential integrators shared by DPM-Solver (noise prediction) and DPM-Solver++ (data prediction).

Both solve the diffusion ODE exactly in its linear part and Taylor-expand the model output f in lambda
(Lu et al. 2022, Eq. 3.4; Lu et al. 2022b, Eq. 8). With (A, B, H) = (alpha, sigma, h) for f = eps and
(A, B, H) = (sigma, alpha, -h) for f = x0, every update in both papers has the single form

    x_t = (A_t / A_s) x_s - B_t (e^H - 1) f_s - B_t ((e^H - 1)/H - 1) D1 - B_t ((e^H - 1 - H)/H^2 - 1/2) D2,

where D1 ~ h f'(lambda_s) and D2 ~ h^2 f''(lambda_s)/2 come from earlier outputs (multistep: Lu et al. 2022b,
Alg. 2 / App. B, as in diffusers) or from intermediate points inside the step (singlestep: Lu et al. 2022,
Alg. 1-2, r1 = 1/2 for order 2 and r1 = 1/3, r2 = 2/3 for order 3). The ``midpoint`` form of the
second-order multistep term is -1/2 B_t (e^H - 1) D1.

Third-order multistep: D2 ~ h^2 f''/2, so the Taylor expansion of the exact integral weights it by
-2 B_t ((e^H - 1 - H)/H^2 - 1/2) (``third_order_form="taylor"``, globally third order). The official DPM-Solver
code and diffusers use half that weight (``"diffusers"``, the default): its local error is O(h^3), so it is
globally second order (measured slope ~2.2 on the digits reference model, lambda-uniform grids), though
marginally more accurate at NFE <= 20 there.
"""

from __future__ import annotations

import math

import torch

from .base import DiffAlignScheduler, NoiseLevel, SinglestepMixin, check_choice

DIFFUSERS_MODES = {"DPMSolverMultistepScheduler": "multistep", "DPMSolverSinglestepScheduler": "singlestep"}
"""diffusers' DPM-Solver classes and the ``solver_mode`` that behaves like each."""

OTHER_SOLVER_TYPES = ("logrho", "bh1", "bh2")
"""Solver types of other diffusers schedulers (UniPC, DEIS) that diffusers' DPM-Solvers map to ``midpoint``."""


class ExponentialIntegratorScheduler(SinglestepMixin, DiffAlignScheduler):
    """Multistep / singlestep exponential integrator of order 1-3 (base of DPM-Solver and DPM-Solver++).

    Accepts the configs of diffusers' ``DPMSolverMultistepScheduler`` and ``DPMSolverSinglestepScheduler``: the
    source class sets ``solver_mode``, the class (DPM-Solver or DPM-Solver++) sets noise or data prediction, an
    ``sde-`` ``algorithm_type`` selects SDE-DPM-Solver++, and UniPC's ``bh1``/``bh2`` solver types become
    ``midpoint``, as diffusers maps them.
    """

    _replaces = tuple(DIFFUSERS_MODES)
    _algorithms: dict[str, str] = {}  # diffusers' algorithm_type -> this class's, when a config is switched

    @classmethod
    def _map_config(cls, config: dict, source: str | None) -> dict:
        config = super()._map_config(config, source)
        if source in DIFFUSERS_MODES:
            config.setdefault("solver_mode", DIFFUSERS_MODES[source])
        if config.get("algorithm_type") in cls._algorithms:
            config["algorithm_type"] = cls._algorithms[config["algorithm_type"]]
        return config

    def _init_integrator(self) -> None:
        """Check the solver options shared by DPM-Solver and DPM-Solver++, then build the schedule."""
        if self.config.solver_type in OTHER_SOLVER_TYPES:
            self.register_to_config(solver_type="midpoint")
        c = self.config
        check_choice("solver_order", c.solver_order, (1, 2, 3))
        check_choice("solver_mode", c.solver_mode, ("multistep", "singlestep"))
        check_choice("solver_type", c.solver_type, ("midpoint", "heun"))
        check_choice("third_order_form", c.third_order_form, ("diffusers", "taylor"))
        self._init_schedule(c.solver_order)

    def _reset_state(self) -> None:
        super()._reset_state()
        self._group_sample: torch.Tensor | None = None  # sample at the start of the current singlestep group

    def _check_num_steps(self, num_inference_steps: int) -> None:
        order = self.config.solver_order
        if num_inference_steps < order:
            raise ValueError(
                f"solver_order={order} needs num_inference_steps >= {order}, got {num_inference_steps}; use "
                "more steps or a lower solver_order."
            )

    def _build_grid(self, num_inference_steps, device, mu, timesteps) -> None:
        if self.config.solver_mode == "singlestep":
            self._singlestep_grid(num_inference_steps, device, mu, timesteps, self.config.solver_order)
        else:
            self._base_grid(num_inference_steps, device, mu, timesteps)

    def _abh(self, s: NoiseLevel, t: NoiseLevel) -> tuple[float, float, float, float]:
        """(A_t / A_s, B_t, B_t (e^H - 1), H) of the step s -> t for this solver's output kind."""
        if self._solver_output == "x0":
            ratio, b_s, b_t, big_h = t.sigma / s.sigma, s.alpha, t.alpha, -(t.lambda_ - s.lambda_)
        else:
            ratio, b_s, b_t, big_h = t.alpha / s.alpha, s.sigma, t.sigma, t.lambda_ - s.lambda_
        # B_t (e^H - 1) = A_t B_s / A_s - B_t: finite where H = inf (a noise-prediction step to sigma = 0)
        b_expm1 = b_t * math.expm1(big_h) if math.isfinite(big_h) else ratio * b_s - b_t
        return ratio, b_t, b_expm1, big_h

    def _update(self, sample, x0, eps, noise):
        out = x0 if self._solver_output == "x0" else eps
        if self.config.solver_mode == "singlestep":
            return self._singlestep_update(sample, out)
        c = self.config
        self._push_output(out, c.solver_order)
        if self._zero_width(self.step_index):
            return sample
        order = self._multistep_order(c.solver_order, c.lower_order_final, c.euler_at_final)
        return self._multistep_update(sample, order, noise)

    def _multistep_update(self, x: torch.Tensor, order: int, noise: torch.Tensor | None) -> torch.Tensor:
        i = self.step_index
        s, t = self._levels[i], self._levels[i + 1]
        ratio, b_t, b_expm1, big_h = self._abh(s, t)
        m = self.model_outputs
        x_t = ratio * x - b_expm1 * m[-1]
        if order == 1:
            return x_t
        D1, D2 = divided_differences(m, [self._levels[i - k].lambda_ for k in range(order)], t.lambda_ - s.lambda_)
        if order == 2 and self.config.solver_type == "midpoint":
            return x_t - 0.5 * b_expm1 * D1
        x_t = x_t - b_t * (math.expm1(big_h) / big_h - 1.0) * D1
        if order == 3:
            weight = 2.0 if self.config.third_order_form == "taylor" else 1.0
            x_t = x_t - weight * b_t * ((math.expm1(big_h) - big_h) / big_h**2 - 0.5) * D2
        return x_t

    def _singlestep_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """One evaluation of a singlestep group: returns the next intermediate point u_k or the group's end."""
        slot = self._slots[self.step_index]
        if slot.start < self._first_index:  # started inside this group (img2img): first-order steps to its end
            ratio, _, b_expm1, _ = self._abh(self._levels[self.step_index], self._levels[self.step_index + 1])
            return ratio * x - b_expm1 * out
        if slot.pos == 0:
            self.model_outputs, self._group_sample = [out], x
        else:
            self.model_outputs.append(out)
        s = self._levels[slot.start]
        target = self._levels[self.step_index + 1]
        m = self.model_outputs
        if s.lambda_ == target.lambda_:
            return self._group_sample  # a zero-width group (a repeated final sigma): the exact solution
        ratio, b_t, b_expm1, big_h = self._abh(s, target)
        x_t = ratio * self._group_sample - b_expm1 * m[0]
        if len(m) == 1:
            return x_t  # first order, or the first intermediate point u1
        h = target.lambda_ - s.lambda_
        # r_k: position of the k-th intermediate point as a fraction of the current (sub)step s -> target
        r = (self._levels[slot.start + len(m) - 1].lambda_ - s.lambda_) / h
        if slot.order == 2:  # DPM-Solver-2: - B_t / (2 r1) (e^H - 1) (f(u1) - f_s)
            return x_t - b_expm1 / (2.0 * r) * (m[1] - m[0])
        # DPM-Solver-3: u2 (len 2) and x_t (len 3) use - B / r ((e^H - 1)/H - 1) (f(u_last) - f_s)
        return x_t - b_t / r * (math.expm1(big_h) / big_h - 1.0) * (m[-1] - m[0])


def divided_differences(outputs: list[torch.Tensor], lambdas: list[float], h: float):
    """D1 and D2 of the multistep methods from the last outputs (Lu et al. 2022b, App. B; diffusers' 2M/3M).

    ``outputs[-1 - k]`` was taken at ``lambdas[k]``; ``h`` is the current step. D2 is None with two outputs.
    """
    m0, m1 = outputs[-1], outputs[-2]
    r0 = (lambdas[0] - lambdas[1]) / h
    D1_0 = (m0 - m1) / r0
    if len(lambdas) < 3:
        return D1_0, None
    r1 = (lambdas[1] - lambdas[2]) / h
    D1_1 = (m1 - outputs[-3]) / r1
    return D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1), (D1_0 - D1_1) / (r0 + r1)

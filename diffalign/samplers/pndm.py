"""PNDM: pseudo numerical methods for diffusion models (Liu et al., ICLR 2022, arXiv 2202.09778).

A pseudo numerical step s -> t splits into

* the transfer part phi, equal to formula 9 (with alpha^2 = alphabar, sigma^2 = 1 - alphabar): the DDIM step
  with a noise estimate e, phi(x_s, e, s, t) = alpha_t x0 + sigma_t e with x0 = (x_s - sigma_s e) / alpha_s
  (flow-matching schedules are refused: they start at alpha ~ 1/T, where the division amplifies e's error);
* the gradient part, e built from model outputs e_t = eps(x_t, t) like a classical method:
  pseudo linear multistep (formula 12): e' = (55 e_t - 59 e_{t-d} + 37 e_{t-2d} - 9 e_{t-3d}) / 24;
  pseudo Runge-Kutta (formula 13): e1 = eps(x, t), x2 = phi(x, e1, t, t-d/2), e2 = eps(x2, t-d/2),
  x3 = phi(x, e2, t, t-d/2), e3 = eps(x3, t-d/2), x4 = phi(x, e3, t, t-d), e4 = eps(x4, t-d),
  e' = (e1 + 2 e2 + 2 e3 + e4) / 6;
  pseudo improved Euler: e2 = eps(phi(x, e1, t, t-d), t-d), e' = (e1 + e2) / 2.

With x~ = x / alpha and s~ = sigma / alpha, phi is the Euler step x~_t = x~_s + (s~_t - s~_s) e of the ODE
dx~/ds~ = eps (DDIM, Eq. 14): these are the classical methods for that ODE with equal-step weights. On a grid
uniform in s~ the multistep part has its classical order (4 for formula 12); on grids uniform in time or
log-SNR the fixed weights are off by O(d^2) and every warm-up converges with global order 2.

Every model output is converted to eps before outputs are combined (diffusers' PNDMScheduler combines raw
outputs, so the two differ for ``prediction_type="v_prediction"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config

from .base import DiffAlignScheduler, NoiseLevel, check_choice, schedule_config

ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),  # formula 12
}
"""Weights of e_t, e_{t-d}, ... in the pseudo linear multistep gradient of each order."""

STAGE_WEIGHTS = {"rk4": (1 / 6, 2 / 6, 2 / 6, 1 / 6), "heun": (1 / 2, 1 / 2)}
"""Weights of the stage outputs of a one-step rule (rk4: formula 13; heun: improved Euler)."""

WARMUP_RULES = {"f-pndm": ("rk4",) * 3, "s-pndm": ("heun",), "plms": ("heun",)}
MIN_STEPS = {"f-pndm": 4, "s-pndm": 2, "plms": 2}


@dataclass(frozen=True)
class Evaluation:
    """One model evaluation: stage ``stage`` of a ``rule`` step that started at evaluation ``start``."""

    start: int
    stage: int
    rule: str  # "rk4", "heun" or "lms"


class PNDMScheduler(DiffAlignScheduler):
    """PNDM: DDIM transfer (formula 9), pseudo Runge-Kutta / improved-Euler warm-up, pseudo linear multistep.

    ``num_inference_steps`` counts grid intervals, as in diffusers' PNDMScheduler; the warm-up's extra model
    evaluations are extra (repeated or intermediate) entries of ``timesteps``, one ``step()`` call each.

    Args:
        warmup: ``"f-pndm"``: three pseudo Runge-Kutta steps (formula 13, 4 evaluations each), then the
            4th-order pseudo linear multistep (formula 12); N + 9 evaluations for N intervals (diffusers'
            ``skip_prk_steps=False``). ``"s-pndm"``: one pseudo improved-Euler step (2 evaluations), then the
            2nd-order pseudo linear multistep e' = (3 e_t - e_{t-d}) / 2; N + 1 evaluations. Checked against
            the authors' code (luping-liu/PNDM, ``runner/method.py``, ``gen_order_2``, ``improved_eular``):
            e2 is evaluated at phi(x, e1, t, t-d) and time t-d, only e1 enters the multistep history, later
            steps make one evaluation each. ``"plms"``: diffusers' ``skip_prk_steps=True`` (crowsonkb's
            PLMS): the same improved-Euler first step, then orders 2 and 3 while the history fills, then
            formula 12; N + 1 evaluations.
            Default: from diffusers' ``skip_prk_steps`` (True: ``"plms"``, False: ``"f-pndm"``), else ``"s-pndm"``.
        skip_prk_steps, set_alpha_to_one: diffusers' PNDMScheduler options (see ``warmup``, and
            :class:`~diffalign.samplers.DDIMScheduler` for ``set_alpha_to_one``); ``"leading"`` spacing is PNDM's.
        Shared schedule parameters: :data:`diffalign.samplers.base.SCHEDULE_DEFAULTS`. The Runge-Kutta
        midpoint is the mean of the two model times, or with ``discrete_timesteps=True`` diffusers' integer
        t_next + (t - t_next) // 2.
    """

    _solver_output = "eps"

    _linked_keys = (("warmup", "skip_prk_steps"), ("final_sigmas_type", "set_alpha_to_one"))
    _leading_ddim = True
    _replaces = ("PNDMScheduler",)

    @register_to_config
    @schedule_config
    def __init__(self, *, warmup: str | None = None, skip_prk_steps: bool | None = None,
                 set_alpha_to_one: bool | None = None, final_sigmas_type: str | None = None, **schedule):
        if warmup is None:
            warmup = "s-pndm" if skip_prk_steps is None else ("plms" if skip_prk_steps else "f-pndm")
        check_choice("warmup", warmup, tuple(WARMUP_RULES))
        if self.config.use_flow_sigmas:
            raise ValueError(
                "PNDM does not support flow-matching sigmas: its pseudo steps integrate dx~/ds~ = eps with x~ = x / "
                "alpha and s~ = sigma / alpha, which diverge where a flow schedule starts (alpha ~ 1/T), and its fixed "
                "equal-step weights then amplify the noise estimates' errors (RMS error 1e3 at 5 steps on the "
                "closed-form model, against 0.1 for DDIM); use DDIMScheduler, DPMSolverPlusPlusScheduler or "
                "UniPCScheduler for flow-matching models.")
        if skip_prk_steps is not None and skip_prk_steps != (warmup != "f-pndm"):
            raise ValueError(f"warmup={warmup!r} contradicts skip_prk_steps={skip_prk_steps}; the Runge-Kutta warm-up "
                             "is warmup='f-pndm' (skip_prk_steps=False). Pass only one of them.")
        self.register_to_config(warmup=warmup, skip_prk_steps=warmup != "f-pndm")
        self._resolve_final_alpha()
        # read by diffusers' grid code only; DPM-Solver's default keeps configs interchangeable
        self._init_schedule(2)
        self._plan: list[Evaluation] = []

    def _reset_state(self) -> None:
        super()._reset_state()
        self._x_s: torch.Tensor | None = None  # sample at the start of the current step
        self._stages: list[torch.Tensor] = []  # eps of the current step's stages

    # ------------------------------------------------------------------ grid
    def _check_num_steps(self, num_inference_steps: int) -> None:
        warmup = self.config.warmup
        need = MIN_STEPS[warmup]
        if num_inference_steps >= need:
            return
        if warmup == "f-pndm":
            why, other = "its 3 Runge-Kutta steps end before the final point", "warmup='s-pndm' or 'plms'"
        else:
            why, other = "its improved-Euler first step evaluates the model at the second point", "DDIMScheduler"
        raise ValueError(f"warmup={warmup!r} needs num_inference_steps >= {need} ({why}), got "
                         f"{num_inference_steps}; use more steps or {other}.")

    def _build_grid(self, num_inference_steps, device, mu, timesteps) -> None:
        """Grid points from the base, then the evaluation plan: one entry of ``timesteps``/``sigmas`` each."""
        self._base_grid(num_inference_steps, device, mu, timesteps)
        n = len(self.timesteps)
        self._check_num_steps(n)  # custom timesteps included
        sig, times = self.sigmas.double().tolist(), self.timesteps.cpu().double().tolist()
        grid = list(zip(sig[:-1], times, strict=True))  # (sigma, model time) of the grid points
        warmup = WARMUP_RULES[self.config.warmup]
        points, self._plan = [], []
        for k, rule in enumerate(warmup + ("lms",) * (n - len(warmup))):
            here = grid[k]
            if rule == "lms":
                stages = [here]
            elif rule == "heun":
                stages = [here, grid[k + 1]]
            else:
                mid = self._midpoint(here, grid[k + 1])
                stages = [here, mid, mid, grid[k + 1]]
            self._plan += [Evaluation(len(points), stage, rule) for stage in range(len(stages))]
            points += stages
        plan_t = torch.tensor([t for _, t in points], dtype=torch.float64)
        integral = bool((plan_t == plan_t.round()).all())
        self.timesteps = plan_t.to(dtype=torch.int64 if integral else torch.float32, device=device)
        self.sigmas = torch.tensor([s for s, _ in points] + sig[-1:], dtype=torch.float32)

    def _midpoint(self, s: tuple[float, float], t: tuple[float, float]) -> tuple[float, float]:
        """(sigma, model time) halfway in model time between grid points s and t, given as (sigma, time)."""
        c = self.config
        time = t[1] + (s[1] - t[1]) // 2 if c.discrete_timesteps else 0.5 * (s[1] + t[1])
        return self.sigma_at_time([time])[0], time

    # ------------------------------------------------------------------ step
    @staticmethod
    def _phi(x_s: torch.Tensor, e: torch.Tensor, s: NoiseLevel, t: NoiseLevel) -> torch.Tensor:
        """Transfer part, equal to formula 9: the DDIM step from level s to level t with noise estimate e."""
        x0 = (x_s - s.sigma * e) / s.alpha
        return t.alpha * x0 + t.sigma * e

    def _update(self, sample, x0, eps, noise):
        i = self.step_index
        ev = self._plan[i]
        if ev.start < self._first_index:  # started inside a warm-up step (img2img): transfer to the next point
            return self._phi(sample, eps, self._levels[i], self._levels[i + 1])
        if ev.stage == 0:  # at a grid point: the multistep history holds these outputs only
            self._x_s, self._stages = sample, []
            self._push_output(eps, 4)
        self._stages.append(eps)
        if ev.rule == "lms":  # formula 12, or a lower order while the history fills
            m = self.model_outputs
            order = min(len(m), 2 if self.config.warmup == "s-pndm" else 4)
            e = sum(w * m[-1 - j] for j, w in enumerate(ADAMS_BASHFORTH[order]))
        elif len(self._stages) < len(STAGE_WEIGHTS[ev.rule]):
            e = eps  # an intermediate stage: x_{k+1} = phi(x, e_k, t, stage point)
        else:
            e = sum(w * e_k for w, e_k in zip(STAGE_WEIGHTS[ev.rule], self._stages, strict=True))
        # each stage goes from the step's start to the next evaluation's noise level (or the final one)
        return self._phi(self._x_s, e, self._levels[ev.start], self._levels[i + 1])

"""UniPC (Zhao et al. 2023, arXiv 2302.04867): unified predictor (UniP) and corrector (UniC), B(h) variants.

With (A, B, H) = (sigma, alpha, -h) for data prediction (``predict_x0=True``, m = x0) and (alpha, sigma, h) for
noise prediction (m = eps), both as in DPM-Solver(++) (see :mod:`diffalign.samplers.exponential`), the paper's
updates are, from the current point s = t_{i-1} to t = t_i with r_k = (lambda_{s_k} - lambda_s) / h and
D_k = m_{s_k} - m_s (Sec. 3, "UniC" and "UniP", multistep variant):

    UniP-p: x_t   = (A_t / A_s) x_s   - B_t (e^H - 1) m_s - B_t B(H) sum_{k=1}^{p-1} rho_k D_k / r_k
    UniC-p: x_t^c = (A_t / A_s) x_s^c - B_t (e^H - 1) m_s - B_t B(H) (sum_{k=1}^{p-1} rho_k D_k / r_k + rho_p D_t)

where UniC adds the new output m_t = m(x_t, t) at r_p = 1 (D_t = m_t - m_s). The rho solve R_p rho = g_p / B(H)
with (R_p)_{jk} = r_k^{j-1} and (g_p)_j = j! H phi_{j+1}(H) (phi_1(H) = (e^H - 1)/H, phi_{j+1} = (phi_j - 1/j!)/H);
UniP-p uses the first p - 1 rows and columns. B(H) = H ("bh1") or e^H - 1 ("bh2"). As in the official code and
diffusers, UniP-2 uses rho = 1/2 and UniC-1 rho = 1/2. UniC-p raises the order of UniP-p by one.

The corrector costs no model evaluation: x_t^c is computed at the start of the next ``step`` from the output the
pipeline evaluated at the predicted x_t, and the outputs stay in the history unchanged (diffusers' pattern). The
rho systems are solved in float64 (numpy), so the scheduler runs in float32 and float64 (diffusers 0.42.1's
UniPCMultistepScheduler fails in float64 with a dtype mismatch in ``torch.linalg.solve``).

Order rules as diffusers: the order rises 1, 2, ... while the history fills; with ``lower_order_final`` the order
is min(solver_order, steps left). ``disable_corrector`` lists step indices whose *result* is not corrected (the
corrector applied at the start of step i + 1 is skipped when i is listed). One deviation: a step that lands on
sigma = 0 is first order (diffusers' higher-order terms are NaN there, lambda = inf).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .base import DiffAlignScheduler, NoiseLevel, check_choice, schedule_config

DIFFUSERS_SOLVER_TYPES = ("midpoint", "heun", "logrho")
"""Solver types of other diffusers schedulers that map to ``bh2`` when a config is switched (as diffusers does)."""


def unipc_rhos(rks: list[float], big_h: float, variant: str, corrector: bool) -> list[float]:
    """The rho_k of UniP-p (``corrector=False``, p - 1 = len(rks) earlier points) or UniC-p (``corrector=True``,
    the earlier points plus the new output at r = 1), solved in float64."""
    p = len(rks) + 1
    if not corrector and p == 1:
        return []
    if p == 1 or (not corrector and p == 2):  # UniC-1 and UniP-2: the papers' and diffusers' rho = 1/2
        return [0.5]
    b_h = big_h if variant == "bh1" else math.expm1(big_h)
    g, h_phi, fact = [], math.expm1(big_h) / big_h - 1.0, 1.0  # h_phi = H phi_2(H)
    for j in range(1, p + 1):
        g.append(h_phi * fact / b_h)
        fact *= j + 1
        h_phi = h_phi / big_h - 1.0 / fact
    points = list(rks) + ([1.0] if corrector else [])
    n = len(points)
    R = np.vander(np.asarray(points, dtype=np.float64), n, increasing=True).T  # R[j, k] = r_k^j
    return np.linalg.solve(R, np.asarray(g[:n], dtype=np.float64)).tolist()


class UniPCScheduler(DiffAlignScheduler):
    """UniPC multistep: UniP-p predictor + UniC corrector (no extra model evaluation), orders 1-3.

    Args:
        solver_order: 1, 2 or 3 (order of UniP; UniC adds one). 2 is the authors' advice for guided sampling.
        predict_x0: integrate the data prediction (default, as diffusers) or the noise prediction.
        solver_type: ``"bh1"`` (B(h) = h) or ``"bh2"`` (B(h) = e^h - 1); diffusers' DPM-Solver types map to bh2.
        lower_order_final: lower the order on the last steps (order <= steps left), as diffusers.
        disable_corrector: step indices whose result is not corrected (e.g. ``[0]``, DC-Solver's SD setting).
        use_corrector: ``False`` runs the predictor UniP alone.
        Shared schedule parameters: :data:`diffalign.samplers.base.SCHEDULE_DEFAULTS`.
    """

    _replaces = ("UniPCMultistepScheduler",)

    @classmethod
    def _map_config(cls, config: dict, source: str | None) -> dict:
        """diffusers' UniPC options that diffalign's UniPC does not have are refused unless unset."""
        config = super()._map_config(config, source)
        for key in ("solver_p", "shift_terminal"):
            if config.get(key) is not None:
                raise ValueError(f"{cls.__name__} does not support diffusers' {key}={config[key]!r}; unset it or keep "
                                 "diffusers' UniPCMultistepScheduler.")
        return config

    @register_to_config
    @schedule_config
    def __init__(
        self,
        *,
        solver_order: int = 2,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 (diffusers' default, read-only)
        use_corrector: bool = True,
        **schedule,
    ):
        check_choice("solver_order", solver_order, (1, 2, 3))
        if solver_type in DIFFUSERS_SOLVER_TYPES:
            self.register_to_config(solver_type="bh2")
        check_choice("solver_type", self.config.solver_type, ("bh1", "bh2"))
        if disable_corrector is not None and not all(isinstance(k, int) for k in disable_corrector):
            raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}.")
        self._solver_output = "x0" if predict_x0 else "eps"
        self._init_schedule(solver_order)

    def _reset_state(self) -> None:
        super()._reset_state()
        self._last_sample: torch.Tensor | None = None  # x_{i-1}^c, where the last predictor started
        self._last_order = 0  # order of the last predictor (the corrector's p)

    # ------------------------------------------------------------------ update
    def _update(self, sample, x0, eps, noise):
        i = self.step_index
        m = x0 if self.config.predict_x0 else eps
        if self._corrects(i):
            sample = self._corrector(sample, m)
        self._push_output(m, self._history_size())
        self._after_push()
        order = self._step_order(i)
        self._last_sample, self._last_order = sample, order
        return self._predictor(sample, order)

    def _corrects(self, i: int) -> bool:
        """Whether the result of step i - 1 is corrected at the start of step i (diffusers' condition)."""
        disabled = self.config.disable_corrector or ()
        return self.config.use_corrector and i > 0 and self._last_sample is not None and (i - 1) not in disabled

    def _history_size(self) -> int:
        return self.config.solver_order

    def _after_push(self) -> None:
        """Hook run after the current output joins the history (DC-Solver compensates it here)."""

    def _step_order(self, i: int) -> int:
        c, n = self.config, len(self.timesteps)
        order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
        order = min(order, len(self.model_outputs))  # warm-up
        if i == n - 1 and self._levels[-1].sigma == 0.0:
            return 1  # lambda_t = inf: only the first-order term is defined
        return order

    def _linear_part(self, s: NoiseLevel, t: NoiseLevel) -> tuple[float, float, float, float]:
        """(A_t / A_s, B_t, B_t (e^H - 1), H) of the step s -> t (see the module docstring)."""
        if self.config.predict_x0:
            ratio, b_s, b_t, big_h = t.sigma / s.sigma, s.alpha, t.alpha, -(t.lambda_ - s.lambda_)
        else:
            ratio, b_s, b_t, big_h = t.alpha / s.alpha, s.sigma, t.sigma, t.lambda_ - s.lambda_
        # B_t (e^H - 1) = A_t B_s / A_s - B_t: finite where H = inf (a noise-prediction step to sigma = 0)
        b_expm1 = b_t * math.expm1(big_h) if math.isfinite(big_h) else ratio * b_s - b_t
        return ratio, b_t, b_expm1, big_h

    def _terms(self, i_s: int, order: int, h: float) -> tuple[list[float], list[torch.Tensor]]:
        """r_k and D_k / r_k of the p - 1 outputs before the one at grid point ``i_s`` (history[-1])."""
        m, lam_s = self.model_outputs, self._levels[i_s].lambda_
        rks = [(self._levels[i_s - k].lambda_ - lam_s) / h for k in range(1, order)]
        return rks, [(m[-1 - k] - m[-1]) / r for k, r in enumerate(rks, start=1)]

    def _predictor(self, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP-p from grid point i to i + 1."""
        i = self.step_index
        s, t = self._levels[i], self._levels[i + 1]
        if self._zero_width(i):
            return x
        ratio, b_t, b_expm1, big_h = self._linear_part(s, t)
        x_t = ratio * x - b_expm1 * self.model_outputs[-1]
        if order == 1:
            return x_t
        rks, d = self._terms(i, order, t.lambda_ - s.lambda_)
        rhos = unipc_rhos(rks, big_h, self.config.solver_type, corrector=False)
        b_bh = b_t * (big_h if self.config.solver_type == "bh1" else math.expm1(big_h))
        return x_t - b_bh * sum(rho * dk for rho, dk in zip(rhos, d, strict=True))

    def _corrector(self, x_pred: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
        """UniC-p: the corrected x at grid point i, from x^c at i - 1, its history and the new output m_t."""
        i, order = self.step_index, self._last_order
        s, t = self._levels[i - 1], self._levels[i]
        ratio, b_t, b_expm1, big_h = self._linear_part(s, t)
        m0 = self.model_outputs[-1]
        rks, d = self._terms(i - 1, order, t.lambda_ - s.lambda_)
        rhos = unipc_rhos(rks, big_h, self.config.solver_type, corrector=True)
        b_bh = b_t * (big_h if self.config.solver_type == "bh1" else math.expm1(big_h))
        res = rhos[-1] * (m_t - m0)
        for rho, dk in zip(rhos[:-1], d, strict=True):
            res = res + rho * dk
        return ratio * self._last_sample - b_expm1 * m0 - b_bh * res

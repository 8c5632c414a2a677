"""DPM-Solver-v3 (Zheng, Lu, Chen, Zhu; NeurIPS 2023, arXiv 2310.13268) as a diffusers scheduler.

With the empirical model statistics (EMS) l, s, b of :mod:`diffalign.samplers.ems` and their integrals on the
EMS lambda grid (L = int l, S = int s, I = int e^{L+S}, B = int e^{-S} b, C = int e^{L+S} B, all cumulative from
lambda_T), f = (sigma eps - l x) / alpha and g(lambda) = e^{S_s - S(lambda)} f - e^{S_s} (B(lambda) - B_s), the
exact solution of the diffusion ODE from s to t is (Eq. 11)

    x_t = alpha_t e^{L_s - L_t} [ x_s / alpha_s
          - int_s^t e^{(L+S)(lambda) - (L+S)_s} (g(lambda) + e^{S_s} (B(lambda) - B_s)) dlambda ],

for any (l, s, b). The multistep predictor (Eq. 13-14, the official ``multistep_predictor_update``)
Taylor-expands g around lambda_s with derivatives from earlier points, g_j = e^{S_s - S_j} f_j - e^{S_s} (B_j - B_s):

    x_t = alpha_t / alpha_s e^{L_s - L_t} x_s - alpha_t e^{-L_t - S_s} (I_t - I_s) g_s
          - alpha_t e^{-L_t} (C_t - C_s - B_s (I_t - I_s))
          - sum_{k=1}^{order-1} alpha_t e^{L_s - L_t} [int_s^t e^{(L+S) - (L+S)_s} (lambda - lambda_s)^k / k!] g^(k).

g^(k) solve the Vandermonde system of the previous points (``predictor_pseudo=False``) or are Newton divided
differences times k! (pseudo-order, ``predictor_pseudo=True``; identical at order <= 2). Integrals use the
trapezoid rule on the EMS grid, as the official code; higher-order coefficients are cached per
(i_s, i_t, order). Sampling times are snapped to the nearest EMS grid point (``convert_to_indexes``); the
pipeline-facing ``timesteps``/``sigmas`` are the snapped ones.

**Corrector** (Sec. 4.3, UniPC-style, no extra model evaluation): when the model output at the new point t
arrives, x_t is recomputed from x_s with the same formula, the new output included, at order
``p + corrector_pseudo`` (p = the order of the predictor step that produced x_t; pseudo-order when
``corrector_pseudo``), as the official code. The cached output is then rewritten as
eps_c = eps + l (x_c - x) / sigma so that f (hence g) is unchanged -- the history stores f directly.

**Conventions chosen here.**

* *Half-corrector* (``half_corrector=True``) follows the paper and the official README: the corrector is only
  used where t <= 0.5 (the less noisy half; t = model timestep / num_train_timesteps of the corrected point).
  The official code's condition (``timesteps[step - 1] > 0.5 or not half``) does the opposite (corrector only
  where t > 0.5); we follow the documented intent. Default False, as the official samplers.
* *Final step*: diffusers grids end at sigma = 0 (lambda = infinity), outside every EMS grid; that step is the
  data prediction x0 of the (corrected) last point, i.e. DDIM / first-order DPM-Solver++ to sigma = 0, as in
  DPM-Solver++. With ``final_sigmas_type="sigma_min"`` the last step ends on the EMS grid (lambda_0) instead.
* *Lower-order final steps* follow diffusers' rule (``lower_order_final`` and fewer than 15 steps: last step
  first order, the one before at most second), so that degenerated v3 reproduces DPM-Solver++ exactly; the
  official code lowers the last steps at every step count.
* *Few steps* (``solver_order=None``, no guidance, <= 5 steps): the configuration the authors ran for their
  NFE-5 CIFAR-10 results (score_sde ``sample.sh``; Sec. 3.3 motivates the pseudo-order predictor for small NFE):
  order 3 with the pseudo-order predictor, no lower-order final steps, corrector of the predictor's order with
  exact derivatives. Otherwise the default is order 2 with the configured options (the authors' guided setting).
  An explicit ``solver_order`` always runs as configured.
* *Many steps* (``solver_order=None``, more than :data:`EMS_MAX_STEPS` = 20 steps): DPM-Solver++(2M) exactly as
  ``dpm-solver++`` runs it (degenerated statistics with the midpoint weight of its Alg. 2, the pipeline's grid
  unsnapped, no corrector unless ``use_corrector=True``); up to 20 steps, the EMS as configured. 20 steps is the top
  of the range the method is made for (the paper: gains "especially in 5~10 NFEs"; the authors' CIFAR-10 scripts
  run 5-25 steps). Beyond it estimated statistics cost more than they bring: their Monte-Carlo noise (independent
  per grid point) makes g rough on the scale of the EMS grid, its extrapolation errs by ~h^1.5 per step instead of
  h^3 and v3 converges at order ~1 (shipped ``reference:digits`` EMS, logSNR grid, RMS error at sigma_min at 80 /
  160 / 320 steps: 1.9e-3 / 9.5e-4 / 5.8e-4, DPM-Solver++ 4.1e-4 / 1.1e-4 / 2.7e-5), and snapping caps the step
  count (diffusers' default grid at 320 steps meets only 271 of the 401 EMS points). On grids ending at sigma = 0
  the first-order final jump dominates every sampler's error from ~20 steps on, and DPM-Solver++'s own error before
  it partly cancels it; a corrector (v3's, UniPC's) removes that error and the cancellation with it
  (docs/verification.md, Findings). An explicit ``solver_order`` keeps the EMS and the corrector at any step count.
* *Zero-length steps* (a final ``sigma_min`` equal to the last grid sigma, as diffusers builds logSNR, Karras,
  exponential and beta grids): both points snap to one EMS point and the step is the identity (after the
  corrector of the last point).
* *Degenerated EMS* (l = 1, s = 0, b = 0, App. A.2): ``degenerated=True`` needs no file and uses the exact
  integrals (x_t = sigma_t / sigma_s x_s + alpha_t (1 - e^{-h}) x0 + ...): at order 1 it is DDIM, at order 2
  without corrector DPM-Solver++(2M) in its "heun" (Taylor) form, at order 3 the Taylor-weighted 3M. Without
  ``ems_path`` and without ``degenerated=True`` the scheduler falls back to the degenerated EMS with a warning
  (so ``from_config`` on any pipeline works).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .base import DiffAlignScheduler, NoiseLevel, check_choice, schedule_config
from .ems import COMPUTE_HINT, EMS, Schedule, load_ems, schedule_mismatches, select_ems_file

logger = logging.getLogger(__name__)
_WARNED: set = set()


def _warn_once(msg: str, *args) -> None:
    key = (msg, *map(str, args))
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(msg, *args)


# ------------------------------------------------------------------------------------------------ integrals
def _phi(n: int, h: float) -> float:
    """int_0^h e^{u - h} u^n / n! du = h^{n+1} phi_{n+1}(-h), accurate for small h too."""
    z = -h
    if abs(z) < 0.5:  # series: phi_k(z) = sum_j z^j / (j + k)!
        k = n + 1
        total, term = 0.0, 1.0 / math.factorial(k)
        for j in range(30):
            total += term
            term *= z / (j + k + 1)
        return h ** (n + 1) * total
    phi = math.exp(z)  # phi_0
    for k in range(n + 1):  # phi_{k+1} = (phi_k - 1/k!) / z
        phi = (phi - 1.0 / math.factorial(k)) / z
    return h ** (n + 1) * phi


class _DegenerateIntegrals:
    """l = 1, s = 0, b = 0, integrated exactly; positions are lambda values.

    With ``midpoint`` the first-derivative term takes DPM-Solver++(2M)'s weight (Lu et al. 2022b, Alg. 2; diffusers'
    ``solver_type="midpoint"``, the ``dpm-solver++`` default), h (1 - e^{-h}) / 2, instead of the exact
    int_0^h e^{u - h} u du = h - 1 + e^{-h}: order 2 is then DPM-Solver++(2M) itself.
    """

    exact = True

    def __init__(self, midpoint: bool = False) -> None:
        self.midpoint = midpoint

    def l(self, p):  # noqa: E743
        return 1.0

    def step(self, ps: float, pt: float):
        h = pt - ps
        return math.exp(-h), -math.expm1(-h), None

    def high(self, ps: float, pt: float, n: int):
        if self.midpoint and n == 1:
            return 0.5 * (pt - ps) * -math.expm1(ps - pt)
        return _phi(n, pt - ps)

    def g(self, f: torch.Tensor, ps, pj) -> torch.Tensor:
        return f

    def cast(self, c, like: torch.Tensor):
        return c


def _cumtrapz(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cumulative trapezoid along dim 0 (0 at the first point)."""
    dx = (x[1:] - x[:-1]).reshape((-1,) + (1,) * (y.ndim - 1))
    out = torch.cumsum(0.5 * dx * (y[1:] + y[:-1]), dim=0)
    return torch.cat([torch.zeros_like(y[:1]), out])


class _EMSIntegrals:
    """Integrals of an EMS on its grid (trapezoid rule, float64, CPU); positions are grid indices.

    Returned coefficients are cast to the caller's dtype/device and cached.
    """

    exact = False

    def __init__(self, ems: EMS) -> None:
        lam = ems.lambdas.reshape((-1,) + (1,) * (ems.l.ndim - 1))
        self.lam = ems.lambdas
        self.l_arr = ems.l
        self.L = _cumtrapz(ems.l, lam)
        self.S = _cumtrapz(ems.s, lam)
        self.a = self.L + self.S
        # e^{L+S} can be large; the official code factors out the max, float64 covers |L + S| < 700
        self.I = _cumtrapz(torch.exp(self.a), lam)
        self.B = _cumtrapz(torch.exp(-self.S) * ems.b, lam)
        self.C = _cumtrapz(torch.exp(self.a) * self.B, lam)
        for name in ("L", "S", "I", "B", "C"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"the integral {name} of the EMS overflows (|int (l + s)| too large); the EMS at "
                                 f"{ems.meta.get('path', '?')} are unusable.")
        self._cache: dict = {}
        self._cast: dict = {}

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def l(self, p: int):  # noqa: E743
        return self._cached(("l", p), lambda: self.l_arr[p])

    def step(self, ps: int, pt: int):
        def make():
            d_i = self.I[pt] - self.I[ps]
            A = torch.exp(self.L[ps] - self.L[pt])
            G0 = torch.exp(-self.L[pt] - self.S[ps]) * d_i
            Bt = torch.exp(-self.L[pt]) * (self.C[pt] - self.C[ps] - self.B[ps] * d_i)
            return A, G0, Bt

        return self._cached(("step", ps, pt), make)

    def high(self, ps: int, pt: int, n: int):
        def make():
            lam = self.lam[ps:pt + 1].reshape((-1,) + (1,) * (self.a.ndim - 1))
            w = torch.exp(self.a[ps:pt + 1] - self.a[ps]) * (lam - lam[0]) ** n / math.factorial(n)
            integral = (0.5 * (lam[1:] - lam[:-1]) * (w[1:] + w[:-1])).sum(0)
            return torch.exp(self.L[ps] - self.L[pt]) * integral

        return self._cached(("high", ps, pt, n), make)

    def g(self, f: torch.Tensor, ps: int, pj: int) -> torch.Tensor:
        if ps == pj:
            return f
        scale, shift = self._cached(("g", ps, pj), lambda: (torch.exp(self.S[ps] - self.S[pj]),
                                                             torch.exp(self.S[ps]) * (self.B[pj] - self.B[ps])))
        return self.cast(scale, f) * f - self.cast(shift, f)

    def cast(self, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A cached coefficient in ``like``'s dtype and device (conversions are cached too)."""
        key = (id(c), like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = (c, c.to(device=like.device, dtype=like.dtype))
        return self._cast[key][1]


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> tuple[EMS, _EMSIntegrals]:
    ems = load_ems(path)
    return ems, _EMSIntegrals(ems)


def _derivatives(lambdas: list[float], gs: list[torch.Tensor], pseudo: bool) -> list[torch.Tensor]:
    """g^(1..n) at lambdas[0] from n + 1 points: Vandermonde solve (exact derivatives of the interpolating
    polynomial) or, with ``pseudo``, k! times Newton divided differences (the official pseudo-order)."""
    n = len(gs) - 1
    if pseudo or n == 1:
        table = list(gs)
        out = []
        for k in range(1, n + 1):
            table = [(table[j] - table[j + 1]) / (lambdas[j] - lambdas[j + k]) for j in range(n - k + 1)]
            out.append(math.factorial(k) * table[0])
        return out
    R = np.array([[(lambdas[j] - lambdas[0]) ** k for k in range(1, n + 1)] for j in range(1, n + 1)])
    Rinv = np.linalg.inv(R)
    diffs = [g - gs[0] for g in gs[1:]]
    out = []
    for k in range(n):
        d = sum(float(Rinv[k, j]) * diffs[j] for j in range(n))
        out.append(math.factorial(k + 1) * d)
    return out


# ------------------------------------------------------------------------------------------------ scheduler
class _Plan(NamedTuple):
    order: int
    predictor_pseudo: bool
    corrector_pseudo: bool
    lower_order_final: bool
    statistics: bool = True  # False: DPM-Solver++(2M) on the unsnapped grid, corrector off unless use_corrector=True


# The authors' configuration for 5 steps without guidance (score_sde ``sample.sh``, the CIFAR-10 NFE-5 runs):
# third-order pseudo-order predictor at every step, corrector of the predictor's order with exact derivatives.
FEW_STEP_PLAN = _Plan(order=3, predictor_pseudo=True, corrector_pseudo=False, lower_order_final=False)

EMS_MAX_STEPS = 20
"""The most steps at which the default (``solver_order=None``) samples with the EMS. Above it, the default is
DPM-Solver++(2M) as ``dpm-solver++`` runs it: degenerated statistics (l = 1, s = b = 0), the midpoint weight, the
pipeline's own grid, no corrector (see the module docstring, *Many steps*)."""


class DPMSolverV3Scheduler(DiffAlignScheduler):
    """DPM-Solver-v3: multistep predictor (order 1-3) + corrector on precomputed empirical model statistics.

    Args:
        ems_path: directory (or ``.safetensors`` file) of EMS computed for this model, resolution and noise
            schedule by ``diffalign ems compute`` / :func:`diffalign.samplers.ems.compute_ems`; a directory may
            hold one set per guidance scale in subdirectories, chosen by ``guidance_scale``
            (:func:`~diffalign.samplers.ems.select_ems_file`).
        degenerated: use l = 1, s = 0, b = 0 (DPM-Solver++'s ODE) instead of EMS statistics. With ``ems_path``
            the grid is still snapped to the EMS grid (for ablations on the same grid), except where the default
            ``solver_order`` runs DPM-Solver++(2M) (above :data:`EMS_MAX_STEPS` steps).
        solver_order: predictor order 1, 2 or 3. ``None`` (default): 2, and without guidance at <= 5 steps the
            authors' NFE-5 configuration (module docstring), which then replaces ``predictor_pseudo``,
            ``corrector_pseudo`` and ``lower_order_final``; above :data:`EMS_MAX_STEPS` (20) steps DPM-Solver++(2M)
            as ``dpm-solver++`` runs it (no statistics, no snapping, corrector off unless ``use_corrector=True``).
        predictor_pseudo: pseudo-order predictor (divided differences; only differs at order 3).
        use_corrector: apply the corrector (no extra model evaluation). ``None`` (default): on, except at
            ``guidance_scale`` >= 5, as in the authors' Stable Diffusion sampler (``use_corrector = scale < 5``;
            their pixel-space scripts keep it on). At large guidance it destabilises degenerated statistics as
            UniPC's does (digits model, guidance 7.5, NFE 5: MSE 1.03 with it, 5.9e-2 without) and, with guided EMS
            on builtin:fashion, doubles the error at NFE 8 (docs/verification.md, Findings).
        corrector_pseudo: corrector of order predictor + 1 with pseudo-order derivatives (the official README's
            recommendation and the authors' guided samplers; their unconditional scripts turn it off); otherwise a
            corrector of the predictor's order with exact derivatives.
        lower_order_final: lower the order of the last steps (diffusers' rule, see the module docstring).
        half_corrector: only correct where t <= 0.5 (the paper's convention; see the module docstring).
        guidance_scale: the guidance scale the sampler is used at, when known (diffalign's sampling and benchmark
            pass it). EMS are guidance-specific: on the closed-form digits model, unguided EMS used at guidance
            7.5 diverge (MSE ~30 at NFE 5). When no set under ``ems_path`` was computed at this guidance the
            scheduler warns and runs as with ``degenerated=True`` and no ``ems_path``.
        Shared schedule parameters: :data:`diffalign.samplers.base.SCHEDULE_DEFAULTS`.
    """

    _solver_output = "x0"

    @register_to_config
    @schedule_config
    def __init__(
        self,
        *,
        ems_path: str | None = None,
        degenerated: bool = False,
        solver_order: int | None = None,
        predictor_pseudo: bool = False,
        use_corrector: bool | None = None,
        corrector_pseudo: bool = True,
        lower_order_final: bool = True,
        half_corrector: bool = False,
        guidance_scale: float | None = None,
        **schedule,
    ):
        check_choice("solver_order", solver_order, (None, 1, 2, 3))
        self._init_schedule(solver_order or 2)
        self._grid = Schedule(self)
        self._ems: EMS | None = None
        if ems_path is not None:
            file = select_ems_file(Path(os.fspath(ems_path)), guidance_scale)
            if not file.is_file():
                raise FileNotFoundError(f"DPM-Solver-v3: no EMS at {file} (ems_path={str(ems_path)!r}); "
                                        f"{COMPUTE_HINT}.")
            self._ems, integrals = _load_cached(str(file.resolve()), file.stat().st_mtime)
            expected = self._ems.meta.get("schedule")
            if expected:
                bad = schedule_mismatches(expected, dict(self.config))
                if bad:
                    raise ValueError(f"the EMS at {file} were computed for another noise schedule ({'; '.join(bad)});"
                                     f" use the model's scheduler config or recompute the EMS.")
            self._integrals = _DegenerateIntegrals() if degenerated else integrals
            ems_guidance = self._ems.meta.get("guidance")
            if (not degenerated and guidance_scale is not None and ems_guidance is not None
                    and not math.isclose(float(guidance_scale), float(ems_guidance))):
                _warn_once("the EMS at %s were computed at guidance %g, not %g; DPM-Solver-v3 uses the degenerated "
                           "statistics (l=1, s=0, b=0) instead -- compute EMS at this guidance with `diffalign ems "
                           "compute --guidance %g --datapoints trajectories ...`.", file, ems_guidance, guidance_scale,
                           guidance_scale)
                self._ems, self._integrals = None, _DegenerateIntegrals()  # as without ems_path: no snapping
            elif (guidance_scale is None and ems_guidance is not None and Path(os.fspath(ems_path)).is_dir()
                    and not math.isclose(float(ems_guidance), 1.0)):
                _warn_once("%s holds no unguided EMS; using the set computed at guidance %g -- pass guidance_scale "
                           "so that DPM-Solver-v3 can check that it matches.", ems_path, ems_guidance)
        else:
            if not degenerated:
                _warn_once("DPMSolverV3Scheduler without ems_path runs with the degenerated statistics (l=1, s=0, "
                           "b=0); %s.", COMPUTE_HINT)
            self._integrals = _DegenerateIntegrals()
        self._ems_integrals = self._integrals  # the configured statistics; a grid beyond EMS_MAX_STEPS uses none
        self._grid_index: list[int] | None = None

    # ------------------------------------------------------------------ grid
    def _build_grid(self, num_inference_steps, device, mu, timesteps) -> None:
        self._base_grid(num_inference_steps, device, mu, timesteps)
        self._grid_index = None
        statistics = self._plan.statistics
        self._integrals = self._ems_integrals if statistics else _DegenerateIntegrals(midpoint=True)
        if self._ems is None or not statistics:
            return
        sig = self.sigmas.double().tolist()
        ends_at_zero = sig[-1] == 0.0
        points = sig[:-1] if ends_at_zero else sig
        idx = [self._ems.nearest_index(self._grid.lambda_of_sigma(s)) for s in points]
        # distinct noise levels must stay distinct; a repeated final sigma (a zero-length step) stays repeated
        merged = sum(a == b and p != q for a, b, p, q in zip(idx, idx[1:], points, points[1:], strict=False))
        if merged:
            raise ValueError(
                f"{len(points)} grid points snap to only {len(points) - merged} distinct points of the EMS grid "
                f"(N={self._ems.num_points}); use fewer steps, EMS computed on a finer grid (larger --grid), or "
                f"solver_order=None (above {EMS_MAX_STEPS} steps the default samples without EMS)."
            )
        lams = [float(self._ems.lambdas[i]) for i in idx]
        new_sig = [self._grid.sigma_of_lambda(lam) for lam in lams] + ([0.0] if ends_at_zero else [])
        sig_t = torch.tensor(new_sig, dtype=torch.float64)
        n_eval = len(self.timesteps)
        times = self._continuous_timesteps(sig_t[:n_eval])
        self.timesteps = (times.double().round().long() if self.config.discrete_timesteps else times).to(device)
        self.sigmas = sig_t.float().to("cpu")
        self._grid_index = idx
        self._grid_lambdas = lams

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None, sigmas=None) -> None:
        """Set the sampling grid (snapped to the EMS grid when EMS are loaded)."""
        super().set_timesteps(num_inference_steps, device, mu, timesteps, sigmas)
        if self._grid_index is not None:  # exact noise levels of the snapped EMS grid points
            levels = [self._level(lam) for lam in self._grid_lambdas]
            self._levels = levels + self._levels[len(levels):]

    def _level(self, lam: float) -> NoiseLevel:
        alpha, sigma = self._grid.alpha_sigma(lam)
        return NoiseLevel(alpha, sigma, lam)

    def _pos(self, i: int):
        """Position of grid point i for the integrals: EMS index, or lambda for the exact degenerate ones."""
        if self._integrals.exact:
            return self._levels[i].lambda_
        return self._grid_index[i]

    @property
    def _plan(self) -> _Plan:
        """Orders and options for the current grid: the config's, or with ``solver_order=None`` the authors'."""
        c = self.config
        unguided = c.guidance_scale is None or float(c.guidance_scale) <= 1.0
        steps = len(self.timesteps)
        if c.solver_order is None and unguided and steps <= 5:
            return FEW_STEP_PLAN
        many = c.solver_order is None and steps > EMS_MAX_STEPS
        return _Plan(c.solver_order or 2, c.predictor_pseudo, c.corrector_pseudo, c.lower_order_final,
                     statistics=not many)

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        super()._reset_state()
        self._hist_idx: list[int] = []
        self._prev_x: torch.Tensor | None = None
        self._prev_order = 0

    # ------------------------------------------------------------------ update
    def _update(self, sample, x0, eps, noise):
        if self._ems is not None and self._ems.sample_shape and tuple(sample.shape[1:]) != self._ems.sample_shape:
            raise ValueError(
                f"the EMS at {self._ems.meta.get('path', self.config.ems_path)} are for samples of shape "
                f"{self._ems.sample_shape}, but the sample has shape {tuple(sample.shape[1:])}; EMS are per model, "
                "resolution and latent shape -- compute EMS for this one with `diffalign ems compute`."
            )
        i = self.step_index
        lvl = self._levels[i]
        l_i = self._integrals.cast(self._integrals.l(self._pos(i)), sample)
        # f = (sigma eps - l x) / alpha = (1 - l) x / alpha - x0  (exactly -x0 for l = 1)
        f = (1.0 - l_i) * sample / lvl.alpha - x0
        x = sample
        plan = self._plan
        corrector = self._corrector_on() if plan.statistics else bool(self.config.use_corrector)
        if corrector and self._prev_x is not None and self._corrector_active(i):
            order = min(self._prev_order + int(plan.corrector_pseudo), len(self.model_outputs) + 1)
            if order > 1:
                points = [i - 1, i] + [i - 1 - k for k in range(1, order - 1)]
                outputs = dict(zip(self._hist_idx, self.model_outputs, strict=True))
                outputs[i] = f
                exact = None if plan.statistics else _DegenerateIntegrals()  # the midpoint weight predicts only
                x = self._v3_step(self._prev_x, i - 1, i, points, outputs, order, plan.corrector_pseudo, exact)
        self._push_output(f, plan.order + 1)
        self._hist_idx.append(i)
        del self._hist_idx[:-(plan.order + 1)]
        if self._zero_width(i):  # a repeated final sigma: the exact solution over a zero-length step
            return x
        nxt = self._levels[i + 1]
        if nxt.sigma == 0.0:  # to sigma = 0: the data prediction of the (corrected) point
            return nxt.alpha * ((1.0 - l_i) * x / lvl.alpha - f)
        order = self._multistep_order(plan.order, plan.lower_order_final)
        points = [i - k for k in range(order)]
        outputs = dict(zip(self._hist_idx, self.model_outputs, strict=True))
        x_next = self._v3_step(x, i, i + 1, points, outputs, order, plan.predictor_pseudo)
        self._prev_x, self._prev_order = x, order
        return x_next

    def _corrector_on(self) -> bool:
        c = self.config
        if c.use_corrector is not None:
            return bool(c.use_corrector)
        return c.guidance_scale is None or float(c.guidance_scale) < 5.0

    def _corrector_active(self, i: int) -> bool:
        if not self.config.half_corrector:
            return True
        return float(self.timesteps[i]) / self.config.num_train_timesteps <= 0.5

    def _v3_step(self, x_s, s: int, t: int, points: list[int], outputs: dict, order: int, pseudo: bool,
                 integ=None):
        """x_t from x_s with the g values of ``points`` (``points[0] == s``), Taylor order ``order``."""
        integ = self._integrals if integ is None else integ
        lv_s, lv_t = self._levels[s], self._levels[t]
        ps, pt = self._pos(s), self._pos(t)
        A, G0, Bt = integ.step(ps, pt)
        gs = [integ.g(outputs[j], ps, self._pos(j)) for j in points[:order]]
        a_t = lv_t.alpha
        x_t = (a_t / lv_s.alpha) * integ.cast(A, x_s) * x_s - a_t * integ.cast(G0, x_s) * gs[0]
        if Bt is not None:
            x_t = x_t - a_t * integ.cast(Bt, x_s)
        if order > 1:
            lams = [self._levels[j].lambda_ for j in points[:order]]
            for k, d in enumerate(_derivatives(lams, gs, pseudo), start=1):
                x_t = x_t - a_t * integ.cast(integ.high(ps, pt, k), x_s) * d
        return x_t

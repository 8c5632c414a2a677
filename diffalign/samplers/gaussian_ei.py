"""The Gaussian exponential integrator: a multistep solver that integrates the data Gaussian's share of the denoiser
exactly and interpolates only the rest.

In VE coordinates (z = x / alpha, sigma = sigma_VP / alpha) the probability-flow ODE is dz / dsigma = (z - D) / sigma
(Karras et al. 2022, Eq. 4 with the denoiser D = E[x0 | z]). Split D into the posterior mean of the data's Gaussian
N(mu, C) (Wang & Vastola 2023, Eq. 6, see :mod:`diffalign.samplers.teleport`) and a remainder R:

    D(z, sigma) = mu + C (C + sigma^2 I)^-1 (z - mu) + R(z, sigma).

With y = z - mu the Gaussian part is linear, and variation of constants (as DPM-Solver's Eq. 3.4 does for the scalar
linear part of the ODE) is exact:

    y(b) = Phi(b, a) y(a) - int_a^b Phi(b, s) R(s) ds / s,      Phi(b, s) = (C + b^2 I)^(1/2) (C + s^2 I)^(-1/2).

The order-k multistep update replaces R by its Lagrange interpolant in sigma through the last k evaluations,
R(s) ~ sum_j L_j(s) R_j, so that

    y_{i+1} = Phi(sigma_{i+1}, sigma_i) y_i - sum_j W_j R_j,      W_j = int_{sigma_i}^{sigma_{i+1}} Phi L_j ds / s.

Phi and W_j are functions of C, applied in its stored eigenbasis (top eigenpairs plus an isotropic rest, the
teleport's format); each W_j is a Gauss-Legendre quadrature in log sigma per eigenvalue. The last step, to sigma = 0,
returns the data prediction, as DPM-Solver++'s multistep samplers do there (the integral diverges for eigenvalues
> 0 unless R vanishes at sigma = 0).

* Without statistics (``gaussian_path=None``: C = 0, mu = 0) the first-order step is DDIM, and higher orders are
  Adams-type exponential integrators of the data prediction with a polynomial in sigma.
* With Gaussian data R = 0, and every step before the last is exact, whatever the grid.
* The statistics are the unconditional Gaussian of a teleport file (``diffalign calibrate teleport``); under
  classifier-free guidance R also carries the guidance's share.

DPM-Solver-v3 (Zheng et al. 2023) also integrates a linear part of the model exactly, with a per-dimension
coefficient estimated from the model's outputs; here the linear part is the data covariance's full (low-rank plus
isotropic) operator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .base import DiffAlignScheduler, check_choice, schedule_config
from .dc_solver import lagrange_weights
from .teleport import spectral_apply


class GaussianEIScheduler(DiffAlignScheduler):
    """Multistep exponential integrator with the data Gaussian's denoiser as its exact linear part (orders 1-3).

    Args:
        solver_order: 1, 2 or 3: the number of evaluations R is interpolated through (fewer while they build up).
        gaussian_path: a teleport statistics file (``diffalign calibrate teleport``) whose unconditional Gaussian
            is the linear part; ``None``: no statistics (C = 0, mu = 0).
        quadrature_nodes: Gauss-Legendre nodes per step for the weights W_j.
        Shared schedule parameters: :data:`diffalign.samplers.base.SCHEDULE_DEFAULTS`.
    """

    @register_to_config
    @schedule_config
    def __init__(self, *, solver_order: int = 3, gaussian_path: str | None = None, quadrature_nodes: int = 32,
                 **schedule):
        check_choice("solver_order", solver_order, (1, 2, 3))
        if not quadrature_nodes >= 4:
            raise ValueError(f"quadrature_nodes must be >= 4, got {quadrature_nodes}.")
        self._gaussian = None
        if gaussian_path is not None:
            from .teleport import load_cached

            self._gaussian = load_cached(gaussian_path)
        self._cast: dict = {}
        self._init_schedule(1)  # warm-up by lower orders: any number of steps works

    def _reset_state(self) -> None:
        super()._reset_state()
        self._history: list[tuple[float, torch.Tensor]] = []  # (VE sigma, R) of the last evaluations

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(mu [D], U [D, r], eigenvalues [r + 1]: the top ones, then the rest's) on ``like``'s device and dtype."""
        key = (like.device, like.dtype, like.shape[1])
        if key not in self._cast:
            dim = like.shape[1]
            if self._gaussian is None:
                mu, u, ev = like.new_zeros(dim), like.new_zeros(dim, 0), np.zeros(1)
            else:
                g = self._gaussian
                if math.prod(g.shape) != dim:
                    raise ValueError(f"the statistics in {self.config.gaussian_path} are for samples of shape "
                                     f"{g.shape}, got {dim} values a sample; make them for this model with "
                                     "`diffalign calibrate teleport`.")
                u = g.uncond
                mu, ev = u.mu.to(like), np.concatenate([u.lam.double().cpu().numpy(), [float(u.rho)]])
                u = u.U.to(like)
            self._cast[key] = (mu, u, ev)
        return self._cast[key]

    @staticmethod
    def _apply(v: torch.Tensor, U: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        """f(C) v for the function with ``values`` on C's eigenvalues (the top ones, then the rest's)."""
        return spectral_apply(v, U, torch.as_tensor(values[:-1], dtype=v.dtype, device=v.device), float(values[-1]))

    def weights(self, a: float, b: float, points: list[float], eigenvalues: np.ndarray) -> np.ndarray:
        """W_j(lambda) = int_a^b Phi_lambda(b, s) L_j(s) ds / s, [len(points), len(eigenvalues)], for the Lagrange
        basis L_j through ``points`` (VE sigmas); Gauss-Legendre in log sigma."""
        nodes, w = np.polynomial.legendre.leggauss(self.config.quadrature_nodes)
        ua, ub = math.log(a), math.log(b)
        u = 0.5 * (ub - ua) * nodes + 0.5 * (ub + ua)
        w = 0.5 * (ub - ua) * w
        s = np.exp(u)
        phi = np.sqrt((eigenvalues[None] + b * b) / (eigenvalues[None] + s[:, None] ** 2))  # [q, E]
        return np.stack([((w * basis)[:, None] * phi).sum(0) for basis in lagrange_weights(points, s)])

    def _update(self, sample, x0, eps, noise):
        i = self.step_index
        s_lvl, t_lvl = self._levels[i], self._levels[i + 1]
        if t_lvl.sigma == 0.0:  # the last step: the data prediction
            return t_lvl.alpha * x0
        if self._zero_width(i):
            return sample
        a, b = s_lvl.sigma / s_lvl.alpha, t_lvl.sigma / t_lvl.alpha
        x, x0 = sample.flatten(1), x0.flatten(1)
        mu, U, ev = self._statistics(x)
        y = x / s_lvl.alpha - mu
        remainder = (x0 - mu) - self._apply(y, U, ev / (ev + a * a))  # R = D - D_Gaussian
        self._history.append((a, remainder))
        del self._history[:-self.config.solver_order]
        points = [p for p, _ in self._history]
        y_next = self._apply(y, U, np.sqrt((ev + b * b) / (ev + a * a)))
        for w, (_, r) in zip(self.weights(a, b, points, ev), self._history, strict=True):
            y_next = y_next - self._apply(r, U, w)
        return (t_lvl.alpha * (y_next + mu)).reshape(sample.shape)

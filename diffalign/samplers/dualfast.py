"""DualFast (Yu, Luo, Wang, Zhao; arXiv 2506.13058): a training-free, zero-extra-NFE wrapper of any sampler.

The paper splits the sampling error into the discretization error (large steps) and the approximation error (the
network's error), and reduces the latter by mixing the current prediction with an earlier, noisier cached one:

    eps~(x_t, t) = (1 + c_t) eps(x_t, t) - c_t eps(x_tau, tau),   tau > t an already-evaluated (cached) time,

which replaces the model output the base sampler integrates. Here the mix happens once per ``step``, on the
(x0, eps) pair before the sampler's update (the ``_adjust_prediction`` hook of
:class:`~diffalign.samplers.base.DiffAlignScheduler`), so every sampler gets it without sampler-specific code:
with ``dualfast_space="eps"`` (default) eps is mixed and x0 = (x_t - sigma_t eps~) / alpha_t follows, so
data-prediction solvers (DPM-Solver++, UniPC) integrate the x0 implied by eps~; ``"x0"`` mixes the data
predictions instead. The cache holds the raw (unmixed) previous prediction; a step whose previous evaluation is
not strictly noisier (repeated or intermediate points of PNDM's warm-up) is not mixed. Multistep samplers store
the mixed outputs in their history. With c_t = 0 the base sampler is reproduced exactly. With ``thresholding``
the x0 implied by eps~ is not clipped again.

tau is the previous model evaluation (``dualfast_reference="previous"``, default) or the first one, at x_T
(``"first"``). The first evaluation has no cache (c = 0). ``dualfast_schedule``, with w_i = i / (N - 1) over the
N model evaluations and s = ``dualfast_scale`` (0.15):

* ``"linear"``: c_i = s w_i, growing as the noise decreases: the paper's reading (below), diffalign's default
  until it was found to break the convergence of every base of order >= 2;
* ``"first-order"`` (default, diffalign's): c_i = s w_i on first-order bases (DDIM, DPM-Solver(++) of order 1),
  c = 0 (the base sampler exactly) on bases of order >= 2;
* ``"step-scaled"``: c_i = s w_i (h_i / H)^(p - 1) (h_i / g_i): h_i = lambda_i - lambda_(i-1), H = lambda_(N-1) -
  lambda_0 the span of the evaluated points, g_i = lambda_i - lambda_tau (= h_i for tau = previous), p the base's
  order (:func:`base_order`); keeps every base's order, measured but not the default;
* ``"constant"``: c_i = s.

Why (lambda = log(alpha / sigma)): the mix adds c_i (eps_i - eps_tau) = c_i h_i eps'(lambda_i) + O(h^2) to the
prediction the base integrates over the next step h_(i+1): it shifts the prediction to ~ eps(lambda_i + c_i h_i),
a local error O(c h^2) and a global error O(c h). A first-order (exponential Euler) step holds eps constant over
the step; its own leading error is that term with the opposite sign (the exact step integrates eps at an effective
shift delta(h) = 1 - h / (e^h - 1), ~ h / 2 for small h). So on a first-order base any c_i h_i in (0, 2
delta(h_(i+1))) shrinks the leading error (c = 0.15 qualifies unless consecutive steps shrink by more than ~6x or
exceed ~13); the order stays 1. A base of order p >= 2 already cancels that term with its own history; the mix
puts it back, first order unless c = O(h^(p-1)) (``"step-scaled"``), and even then the added error is of the
base's order with a problem-dependent sign: on ``builtin:digits`` at guidance 7.5, NFE 5 (seed 7), a constant c
of 0.001 / 0.005 makes UniPC 1.02x / 1.11x worse and the paper's ramp 17x (``"step-scaled"`` 1.10x), while at
guidance 1 the ramp helps. No c > 0 is safe there, hence the default; measurements in ``docs/verification.md``
(DualFast: the default schedule).

What was verified of the paper and what was not: the abstract of arXiv 2506.13058 and third-party notes on it
could be read; Section 4 of the paper could not be retrieved. The notes give the mixing form above (tau > t cached,
c_t growing toward low noise, substituted into the solver's first-order term, for DDIM / DPM-Solver /
DPM-Solver++) but not tau or the constants. The only concrete schedule found is in a public DPM-Solver file of the
first author (github.com/yuhuUSTC/Debias, ``guided_diffusion/DPM_solver.py``): ``lamda = torch.linspace(0, 0.15,
steps)`` passed with ``x_T`` to the multistep updates, whose mixing code was removed. Hence the paper's reading: a
linear ramp from 0 to ``dualfast_scale = 0.15``, tau = the previous evaluation, mixing in eps.
``benchmarks/dualfast_variants.py`` measures the schedules and the other readings (tau = first evaluation, x0
space, larger c); c = 1 with tau = previous is the gradient-estimation sampler of Permenter & Yuan
(smalldiffusion, eps_av = 2 eps_t - eps_prev) on the last step. The benchmark's reference is the same network's
ODE solution, so it measures discretization error only, not the approximation (network) error DualFast targets.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.configuration_utils import register_to_config

from .base import DiffAlignScheduler, check_choice

DUALFAST_DEFAULTS = {"dualfast_scale": 0.15, "dualfast_schedule": "first-order", "dualfast_space": "eps",
                     "dualfast_reference": "previous"}
SCHEDULES = ("first-order", "linear", "step-scaled", "constant")
SPACES = ("eps", "x0")
REFERENCES = ("previous", "first")


class DualFastMixin:
    """DualFast's mixing of the current and the previous (noisier) prediction; combined with a base sampler by
    :func:`dualfast_class`."""

    def _reset_state(self) -> None:
        super()._reset_state()
        self._dualfast_prev: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (index, x0, eps), raw
        self._dualfast_first: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def dualfast_base_order(self) -> int:
        """p, the convergence order of the base sampler (see :func:`base_order`)."""
        return base_order(self)

    def dualfast_coefficient(self, i: int) -> float:
        """c for the model evaluation ``i`` of the current grid."""
        c, n = self.config, len(self.timesteps)
        if c.dualfast_schedule == "first-order" and self.dualfast_base_order() > 1:
            return 0.0
        weight = 1.0 if c.dualfast_schedule == "constant" or n < 2 else i / (n - 1)
        coef = float(c.dualfast_scale) * weight
        if c.dualfast_schedule != "step-scaled" or i == 0 or coef == 0.0:
            return coef
        lam = [lvl.lambda_ for lvl in self._levels[:n]]
        ref = 0 if c.dualfast_reference == "first" else i - 1
        h, gap, span = lam[i] - lam[i - 1], lam[i] - lam[ref], lam[-1] - lam[0]
        if not (h > 0 and gap > 0 and 0 < span < float("inf")):
            return 0.0
        return coef * (h / span) ** (self.dualfast_base_order() - 1) * h / gap

    def _adjust_prediction(self, sample, x0, eps):
        x0, eps = super()._adjust_prediction(sample, x0, eps)
        i = self.step_index
        prev, self._dualfast_prev = self._dualfast_prev, (i, x0, eps)
        if i == 0:
            self._dualfast_first = (i, x0, eps)
        if self.config.dualfast_reference == "first":
            prev = self._dualfast_first if i > 0 else None
        elif prev is not None and prev[0] != i - 1:
            prev = None
        c_t = self.dualfast_coefficient(i)
        if prev is None or c_t == 0.0:
            return x0, eps
        lvl = self._levels[i]
        if not self._levels[prev[0]].lambda_ < lvl.lambda_:
            return x0, eps  # the cached evaluation is not noisier
        if self.config.dualfast_space == "eps":
            eps = (1.0 + c_t) * eps - c_t * prev[2]
            return (sample - lvl.sigma * eps) / lvl.alpha, eps
        x0 = (1.0 + c_t) * x0 - c_t * prev[1]
        return x0, ((sample - lvl.alpha * x0) / lvl.sigma if lvl.sigma > 0 else eps)


def base_order(sched) -> int:
    """The nominal convergence order p of a base sampler, from its class and config: DDIM 1; PNDM 2 (S-PNDM) or 4;
    otherwise ``solver_order`` (None: 3), plus 1 with a corrector (UniPC, DC-Solver, DPM-Solver-v3); 4 for a
    sampler without ``solver_order``. Overestimating p only makes DualFast's coefficient smaller."""
    from .ddim import DDIMScheduler
    from .pndm import PNDMScheduler

    c = sched.config
    if isinstance(sched, DDIMScheduler):
        return 1
    if isinstance(sched, PNDMScheduler):
        return 2 if c.warmup == "s-pndm" else 4
    if "solver_order" not in c:
        return 4
    return (c.solver_order or 3) + (1 if "use_corrector" in c and c.use_corrector is not False else 0)


_CLASSES: dict[type, type] = {}


def dualfast_class(base: type) -> type:
    """The DualFast version of scheduler class ``base`` (any :class:`DiffAlignScheduler` subclass), created once.

    Its config is the base's plus ``dualfast_scale``, ``dualfast_schedule``, ``dualfast_space`` and
    ``dualfast_reference``; it is a module
    attribute named ``DualFast<Base>`` so saved pipelines can import it again.
    """
    if not (isinstance(base, type) and issubclass(base, DiffAlignScheduler)):
        raise ValueError(f"DualFast wraps diffalign schedulers (DiffAlignScheduler subclasses), not {base!r}.")
    if issubclass(base, DualFastMixin):
        raise ValueError(f"{base.__name__} is already a DualFast scheduler.")
    if base in _CLASSES:
        return _CLASSES[base]
    base_init = base.__init__
    raw_init = getattr(base_init, "__wrapped__", base_init)  # the body, without diffusers' config registration
    params = list(inspect.signature(base_init).parameters.values())
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in DUALFAST_DEFAULTS.items()]

    def __init__(self, **kwargs):
        scale = kwargs.pop("dualfast_scale", DUALFAST_DEFAULTS["dualfast_scale"])
        check_choice("dualfast_schedule", kwargs.pop("dualfast_schedule", DUALFAST_DEFAULTS["dualfast_schedule"]),
                     SCHEDULES)
        check_choice("dualfast_space", kwargs.pop("dualfast_space", "eps"), SPACES)
        check_choice("dualfast_reference", kwargs.pop("dualfast_reference", "previous"), REFERENCES)
        if not isinstance(scale, (int, float)) or scale != scale:
            raise ValueError(f"dualfast_scale must be a number, got {scale!r}.")
        raw_init(self, **kwargs)

    __init__.__signature__ = inspect.Signature(params)
    name = f"DualFast{base.__name__}"
    doc = (f"DualFast (see :mod:`diffalign.samplers.dualfast`) around :class:`{base.__module__}.{base.__name__}`: "
           "the base's arguments plus ``dualfast_scale``, ``dualfast_schedule`` (``first-order``/``linear``/"
           "``step-scaled``/``constant``), "
           "``dualfast_space`` (``eps``/``x0``) and ``dualfast_reference`` (``previous``/``first``).")
    cls = type(name, (DualFastMixin, base), {"__init__": register_to_config(__init__), "__module__": __name__,
                                             "__qualname__": name, "__doc__": doc})
    _CLASSES[base] = cls
    globals()[name] = cls
    return cls

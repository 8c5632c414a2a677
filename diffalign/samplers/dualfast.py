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
(``"first"``). c_t = ``dualfast_scale`` * w_i with w_i = i / (N - 1) over the N model evaluations
(``dualfast_schedule="linear"``, growing as the noise decreases) or w_i = 1 (``"constant"``); the first evaluation
has no cache (c = 0).

What was verified and what was not: the abstract of arXiv 2506.13058 and third-party notes on it could be read;
Section 4 of the paper could not be retrieved. The notes give the mixing form above (tau > t cached, c_t growing
toward low noise, substituted into the solver's first-order term, for DDIM / DPM-Solver / DPM-Solver++) but not
tau or the constants. The only concrete schedule found is in a public DPM-Solver file of the first author
(github.com/yuhuUSTC/Debias, ``guided_diffusion/DPM_solver.py``): ``lamda = torch.linspace(0, 0.15, steps)`` passed
with ``x_T`` to the multistep updates, whose mixing code was removed. Hence the default: a linear ramp from 0 to
``dualfast_scale = 0.15``, tau = the previous evaluation, mixing in eps. ``benchmarks/dualfast_variants.py``
measures the other readings (tau = first evaluation, x0 space, larger c); c = 1 with tau = previous is the
gradient-estimation sampler of Permenter & Yuan (smalldiffusion, eps_av = 2 eps_t - eps_prev) on the last step.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.configuration_utils import register_to_config

from .base import DiffAlignScheduler, check_choice

DUALFAST_DEFAULTS = {"dualfast_scale": 0.15, "dualfast_schedule": "linear", "dualfast_space": "eps",
                     "dualfast_reference": "previous"}
SCHEDULES = ("linear", "constant")
SPACES = ("eps", "x0")
REFERENCES = ("previous", "first")


class DualFastMixin:
    """DualFast's mixing of the current and the previous (noisier) prediction; combined with a base sampler by
    :func:`dualfast_class`."""

    def _reset_state(self) -> None:
        super()._reset_state()
        self._dualfast_prev: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (index, x0, eps), raw
        self._dualfast_first: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def dualfast_coefficient(self, i: int) -> float:
        """c for the model evaluation ``i`` of the current grid."""
        c, n = self.config, len(self.timesteps)
        weight = 1.0 if c.dualfast_schedule == "constant" or n < 2 else i / (n - 1)
        return float(c.dualfast_scale) * weight

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


_CLASSES: dict[type, type] = {}


def dualfast_class(base: type) -> type:
    """The DualFast version of scheduler class ``base`` (any :class:`DiffAlignScheduler` subclass), created once.

    Its config is the base's plus ``dualfast_scale``, ``dualfast_schedule`` and ``dualfast_space``; it is a module
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
        check_choice("dualfast_schedule", kwargs.pop("dualfast_schedule", "linear"), SCHEDULES)
        check_choice("dualfast_space", kwargs.pop("dualfast_space", "eps"), SPACES)
        check_choice("dualfast_reference", kwargs.pop("dualfast_reference", "previous"), REFERENCES)
        if not isinstance(scale, (int, float)) or scale != scale:
            raise ValueError(f"dualfast_scale must be a number, got {scale!r}.")
        raw_init(self, **kwargs)

    __init__.__signature__ = inspect.Signature(params)
    name = f"DualFast{base.__name__}"
    doc = (f"DualFast (see :mod:`diffalign.samplers.dualfast`) around :class:`{base.__module__}.{base.__name__}`: "
           "the base's arguments plus ``dualfast_scale``, ``dualfast_schedule`` (``linear``/``constant``), "
           "``dualfast_space`` (``eps``/``x0``) and ``dualfast_reference`` (``previous``/``first``).")
    cls = type(name, (DualFastMixin, base), {"__init__": register_to_config(__init__), "__module__": __name__,
                                             "__qualname__": name, "__doc__": doc})
    _CLASSES[base] = cls
    globals()[name] = cls
    return cls

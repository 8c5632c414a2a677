"""Shared machinery of diffalign's schedulers.

Every sampler is a diffusers scheduler. The noise schedule, the timestep/sigma grids (linspace, leading,
trailing, Karras, exponential, beta, uniform-logSNR, flow-matching sigmas), ``add_noise`` and the step-index
bookkeeping are inherited from diffusers' :class:`~diffusers.DPMSolverMultistepScheduler`, whose
implementation of them is correct; this module adds

* the shared config (:func:`schedule_config` puts the schedule parameters in every sampler's signature once),
* model-output conversion to the pair (x0, eps) for epsilon / sample / v / flow predictions,
* input validation with actionable messages, and
* a ``step`` template: validate -> convert -> the sampler's update -> advance.

A sampler subclass implements :meth:`DiffAlignScheduler._update` (its update equation) and, if it is not a plain
one-evaluation-per-grid-point method, :meth:`DiffAlignScheduler._build_grid`.

Notation (as in the DPM-Solver papers): x_t = alpha_t x0 + sigma_t eps, lambda_t = log(alpha_t / sigma_t),
``s`` is the current (noisier) point and ``t`` the next one, h = lambda_t - lambda_s.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import diffusers
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import FrozenDict
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerOutput

SCHEDULE_DEFAULTS: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "sigma_min": None,
    "sigma_max": None,
    "timesteps_path": None,
    "timesteps_missing": "error",
    "discrete_timesteps": False,
    "check_finite": True,
}
"""Noise-schedule parameters shared by every diffalign scheduler (diffusers' names and defaults), plus
``discrete_timesteps`` (round model timesteps to integers even when the sigma grid is off the integer grid, as
diffusers does; the default evaluates the model at the exact continuous time of each sigma) and
``check_finite`` (raise when the model output is NaN/Inf). ``sigma_min`` / ``sigma_max`` bound the Karras grid
(diffusers' UniPC names). ``timesteps_path`` is a searched schedule file (:mod:`diffalign.samplers.timesteps`,
``diffalign calibrate timesteps``): ``set_timesteps(n)`` then uses its grid for n steps, and when the file has none
for n, raises (``timesteps_missing="error"``) or uses the default grid (``"default"``)."""
_OWN_KEYS = ("discrete_timesteps", "check_finite", "sigma_min", "sigma_max", "timesteps_path", "timesteps_missing")

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
SPACINGS = ("linspace", "leading", "trailing", "time_quadratic")


def schedule_config(init):
    """Give a sampler's ``__init__(self, *, <own params>, **schedule)`` the full signature.

    The shared :data:`SCHEDULE_DEFAULTS` become keyword-only parameters of the signature that diffusers'
    ``register_to_config`` / ``from_config`` introspect, so each sampler lists only its own parameters.
    """
    own = [p for p in inspect.signature(init).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in own}
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in SCHEDULE_DEFAULTS.items()
        if name not in names
    ]
    allowed = names | set(SCHEDULE_DEFAULTS)

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - allowed)
        if unknown:  # diffusers' schedulers raise here too; a typo must not silently change nothing
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword argument(s) {', '.join(unknown)}; valid: "
                f"{', '.join(sorted(allowed - {'self'}))}."
            )
        init(self, *args, **kwargs)

    checked.__signature__ = inspect.Signature(own[:1] + shared + own[1:])
    return checked


def init_defaults(cls: type) -> dict[str, object]:
    """The keyword defaults of a scheduler class's ``__init__`` (its config keys)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


@functools.cache
def _diffusers_key_sets() -> dict[frozenset, str]:
    names = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler", "DDPMScheduler"]
    sets: dict[frozenset, str] = {}
    for name in dict.fromkeys(names):
        cls = getattr(diffusers, name, None)
        if cls is not None:
            sets.setdefault(frozenset(init_defaults(cls)), name)
    return sets


def diffusers_source(config: Mapping) -> str | None:
    """The diffusers scheduler class a config comes from: its ``_class_name``, or the class whose config keys are
    exactly the config's (an in-memory ``scheduler.config`` has no class name); None if not a diffusers class."""
    name = config.get("_class_name")
    if name is None:
        name = _diffusers_key_sets().get(frozenset(k for k in config if not k.startswith("_")))
    return name if isinstance(name, str) and hasattr(diffusers, name) else None


@dataclass(frozen=True)
class NoiseLevel:
    """alpha, sigma and lambda = log(alpha / sigma) of one grid point, as Python floats (float64)."""

    alpha: float
    sigma: float
    lambda_: float


class DiffAlignScheduler(DPMSolverMultistepScheduler):
    """Base class: diffusers' schedule machinery + validation + a ``step`` template. Not used directly."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    # output kind the update integrates: "x0" (data prediction) or "eps" (noise prediction)
    _solver_output = "x0"
    # config keys that decide the same thing: an explicit ``from_config`` keyword drops the others' config values
    _linked_keys: tuple[tuple[str, ...], ...] = ()
    _replaces: tuple[str, ...] = ()  # the diffusers scheduler classes whose configs this class takes over
    _leading_ddim = False  # "leading" spacing as DDIM / PNDM (T // n apart) instead of the DPM-Solvers' T // (n + 1)

    # ------------------------------------------------------------------ configs
    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """diffusers' Karras-family and flow-matching Euler schedulers and every diffalign scheduler
        (``scheduler.compatibles``; a switched config keeps their keys without a warning)."""
        from . import SAMPLERS

        return list(dict.fromkeys([*super()._get_compatibles(), diffusers.FlowMatchEulerDiscreteScheduler,
                                   *SAMPLERS.values()]))

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' config parsing, after translating a diffusers scheduler's config (:meth:`_map_config`).

        A config of a diffusers scheduler (named by ``_class_name``, or recognised by its exact set of keys)
        of a class this one replaces (``_replaces``) gets that class's defaults for the keys it lacks, so that
        ``from_config`` behaves as that class's would; other configs' missing keys take diffalign's defaults.
        Keyword arguments win over the config's values, also over linked keys (an explicit ``warmup`` drops the
        config's ``skip_prk_steps``); unknown ones are warned about.
        """
        config = dict(config_dict)
        source = diffusers_source(config)
        used_defaults = set(config.pop("_use_default_values", []))
        config = {k: v for k, v in config.items() if k not in used_defaults}
        if source == "FlowMatchEulerDiscreteScheduler":
            config = cls._flow_config(config)
        if source in cls._replaces:
            linked = {k: group for group in cls._linked_keys for k in group}
            for key, default in init_defaults(getattr(diffusers, source)).items():
                if key not in config and not any(k in config for k in linked.get(key, ())):
                    config[key] = default
        for group in cls._linked_keys:
            if any(k in kwargs for k in group):
                for k in group:
                    if k not in kwargs:
                        config.pop(k, None)
        config = cls._map_config(config, source)
        unknown = sorted(set(kwargs) - set(init_defaults(cls)))
        if unknown:  # diffusers drops unknown keyword arguments silently
            warnings.warn(f"{cls.__name__}.from_config ignores unknown keyword argument(s) {', '.join(unknown)}.",
                          stacklevel=3)
        return super().extract_init_dict(config, **kwargs)

    @classmethod
    def _map_config(cls, config: dict, source: str | None) -> dict:
        """Translate the values of a diffusers scheduler's config into this class's terms (extended per sampler)."""
        return config

    @classmethod
    def _flow_config(cls, config: dict) -> dict:
        """A ``FlowMatchEulerDiscreteScheduler`` config (SD3, Flux) as the flow-matching configuration:
        ``use_flow_sigmas``, ``prediction_type="flow_prediction"`` and ``flow_shift`` from its ``shift``."""
        for key, default in (("invert_sigmas", False), ("shift_terminal", None), ("stochastic_sampling", False)):
            if config.get(key) not in (None, default):
                raise ValueError(f"{cls.__name__} cannot follow a flow-matching config with {key}={config[key]!r}; "
                                 f"set it to {default!r} or keep FlowMatchEulerDiscreteScheduler.")
        config.setdefault("use_flow_sigmas", True)
        config.setdefault("prediction_type", "flow_prediction")
        config.setdefault("flow_shift", config.get("shift", 1.0))
        return config

    def _init_schedule(self, solver_order: int = 1) -> None:
        """Build betas/alphas/sigmas from the config (diffusers' code) and reset the sampler state."""
        c = self.config
        if c.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={c.prediction_type!r} is not one of {PREDICTION_TYPES}.")
        if c.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing={c.timestep_spacing!r} is not one of {SPACINGS}.")
        if c.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={c.final_sigmas_type!r} must be 'zero' or 'sigma_min'.")
        kwargs = {k: c[k] for k in SCHEDULE_DEFAULTS if k not in _OWN_KEYS}
        DPMSolverMultistepScheduler.__init__.__wrapped__(
            self, **kwargs, solver_order=solver_order, algorithm_type="dpmsolver++"
        )
        self._levels: list[NoiseLevel] = []
        self._reset_state()

    def _resolve_final_alpha(self) -> None:
        """Reconcile DDIM's / PNDM's ``set_alpha_to_one`` with ``final_sigmas_type`` (both registered, consistent).

        In diffusers' DDIM and PNDM the last step goes to alphabar = 1 (``set_alpha_to_one=True``, sigma 0) or to
        the first training alphabar (``False``, diffusers' ``final_sigmas_type="sigma_min"``); unset, sigma 0.
        """
        c = self.config
        implied = None if c.set_alpha_to_one is None else ("zero" if c.set_alpha_to_one else "sigma_min")
        final = c.final_sigmas_type or implied or "zero"
        if implied is not None and implied != final:
            raise ValueError(f"set_alpha_to_one={c.set_alpha_to_one} contradicts final_sigmas_type={final!r}; "
                             "set_alpha_to_one=True means 'zero', False means 'sigma_min'. Pass only one of them.")
        self.register_to_config(final_sigmas_type=final, set_alpha_to_one=final == "zero")

    # ------------------------------------------------------------------ grid
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Set the sampling grid: ``num_inference_steps`` model evaluations, or explicit ``timesteps`` / ``sigmas``.

        ``sigmas`` are in diffusers' convention (VE sigmas, or flow sigmas with ``use_flow_sigmas``), strictly
        decreasing, without the final one (added by ``final_sigmas_type``); flow sigmas get the configured shift
        (``flow_shift``, or ``mu`` with ``use_dynamic_shifting``) as in diffusers' flow schedulers.
        """
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass either `timesteps` or `sigmas` to set_timesteps, not both.")
        custom = timesteps if timesteps is not None else sigmas
        if custom is not None:
            values = np.asarray(custom, dtype=np.float64).reshape(-1)
            if len(values) == 0 or not np.isfinite(values).all() or (np.diff(values) >= 0).any() or values[-1] < 0:
                name = "timesteps" if timesteps is not None else "sigmas"
                raise ValueError(f"custom {name} must be finite, non-negative and strictly decreasing, got {custom!r}.")
            if num_inference_steps is not None and num_inference_steps != len(values):
                raise ValueError(f"num_inference_steps={num_inference_steps} but {len(values)} custom steps given.")
            num_inference_steps, n_evals = None, len(values)
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs `num_inference_steps` (or explicit `timesteps` / `sigmas`).")
        else:
            if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")
            n_evals = int(num_inference_steps)
        self._check_num_steps(n_evals)
        self._custom_sigmas = None if sigmas is None else np.asarray(sigmas, dtype=np.float64).reshape(-1)
        self._searched = False
        if custom is None and self.config.timesteps_path is not None:
            from .timesteps import searched_sigmas

            found = searched_sigmas(self, n_evals)
            if found is not None:
                self._custom_sigmas, self._searched, num_inference_steps = np.asarray(found), True, None
        try:
            self._build_grid(num_inference_steps, device, mu, timesteps)
        finally:
            self._custom_sigmas = None
        self._levels = [self._noise_level(float(s)) for s in self.sigmas.double().tolist()]
        self._reset_state()

    def _sigmas_grid(self, sigmas: np.ndarray, device, mu) -> None:
        """One grid point per custom sigma, then the final sigma; model times are the sigmas' (continuous) times."""
        c = self.config
        if c.use_flow_sigmas and not getattr(self, "_searched", False):  # a searched grid is stored as used
            if sigmas[0] > 1.0:
                raise ValueError(f"flow sigmas must lie in [0, 1], got {sigmas[0]:g}.")
            shift = math.exp(mu) if mu is not None and c.use_dynamic_shifting else c.flow_shift
            sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
            sigmas = np.minimum(sigmas, 1.0 - 1e-6)  # alpha = 0 at sigma = 1 (diffusers' UniPC moves it too)
        final = 0.0 if c.final_sigmas_type == "zero" else float(sigmas[-1] if c.use_flow_sigmas else self._sigma_min())
        all_sigmas = torch.tensor([*sigmas.tolist(), final], dtype=torch.float64)
        self.timesteps = self._model_times(all_sigmas[:-1], device)
        self.sigmas = all_sigmas.float()
        self.num_inference_steps = len(self.timesteps)

    def _sigma_min(self) -> float:
        """The VE sigma of the least noisy training timestep (diffusers' ``final_sigmas_type="sigma_min"``)."""
        a0 = float(self.alphas_cumprod[0])
        return math.sqrt((1.0 - a0) / a0)

    def _check_num_steps(self, num_inference_steps: int) -> None:
        """Raise if the sampler cannot run with this many model evaluations (overridden per sampler)."""

    def _build_grid(self, num_inference_steps, device, mu, timesteps) -> None:
        """Default grid: one model evaluation per point of diffusers' grid for this config."""
        self._base_grid(num_inference_steps, device, mu, timesteps)

    def _base_grid(self, num_inference_steps, device=None, mu=None, timesteps=None) -> None:
        """The grid of :meth:`_grid_points`, refused where its noise levels repeat (more steps than the schedule's
        integer timesteps can space apart): the error names the largest step count that works."""
        self._grid_points(num_inference_steps, device, mu, timesteps)
        if num_inference_steps is None or self._strictly_decreasing():
            return
        works, fails = 1, num_inference_steps
        while fails - works > 1:  # bisect for the largest step count with distinct noise levels
            mid = (works + fails) // 2
            self._grid_points(mid, device, mu, None)
            works, fails = (mid, fails) if self._strictly_decreasing() else (works, mid)
        c = self.config
        raise ValueError(
            f"num_inference_steps={num_inference_steps} repeats noise levels on this schedule (timestep_spacing="
            f"{c.timestep_spacing!r}, num_train_timesteps={c.num_train_timesteps}): use at most {works} steps, or a "
            "continuous grid (use_lu_lambdas=True or use_karras_sigmas=True)."
        )

    def _strictly_decreasing(self) -> bool:
        """Whether the grid's noise levels strictly decrease (a final ``sigma_min`` may equal the last one)."""
        sig = self.sigmas.double()
        return bool((sig[1:-1] < sig[:-2]).all()) and bool(sig[-1] <= sig[-2])

    def _grid_points(self, num_inference_steps, device=None, mu=None, timesteps=None) -> None:
        """diffusers' timesteps/sigmas for the config, plus the time-quadratic spacing diffusers lacks.

        ``time_quadratic`` (DPM-Solver, Lu et al. 2022, Sec. 3.4): t_i quadratic in i. Uniform-logSNR grids are
        diffusers' ``use_lu_lambdas=True``. Unless ``discrete_timesteps``, model timesteps are the exact
        continuous times of the sigmas, so the model is evaluated at the noise level the solver assumes.
        """
        if getattr(self, "_custom_sigmas", None) is not None:
            return self._sigmas_grid(self._custom_sigmas, device, mu)
        c = self.config
        off_grid = c.use_lu_lambdas or c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas
        ddim_leading = self._leading_ddim and not (off_grid or c.use_flow_sigmas)
        if timesteps is None and c.timestep_spacing == "leading" and ddim_leading:
            # DDIM's and PNDM's own leading grid (T // n apart); the DPM-Solvers' is T // (n + 1) apart
            step_ratio = c.num_train_timesteps // num_inference_steps
            timesteps = (np.arange(num_inference_steps) * step_ratio)[::-1] + c.steps_offset
            num_inference_steps = None
        if timesteps is None and c.timestep_spacing == "time_quadratic":
            last = self._last_timestep()
            grid = np.linspace(math.sqrt(last - 1), 0.0, num_inference_steps + 1) ** 2
            timesteps, num_inference_steps = grid[:-1].round().astype(np.int64), None
            if len(np.unique(timesteps)) != len(timesteps):
                raise ValueError(
                    f"time_quadratic spacing with {len(timesteps)} steps repeats integer timesteps; use fewer "
                    "steps or use_lu_lambdas=True."
                )
        saved = self._internal_dict
        patch = {}
        if saved.get("solver_order") is None:  # diffusers' grid code sizes its history by solver_order
            patch["solver_order"] = 1
        if mu is not None and c.use_flow_sigmas and c.use_dynamic_shifting:
            patch["flow_shift"] = math.exp(mu)  # diffusers' code would write it into the config for good
        self._internal_dict = FrozenDict({**saved, **patch})
        try:  # ``mu`` without use_dynamic_shifting is ignored, as diffusers' flow-matching schedulers do
            DPMSolverMultistepScheduler.set_timesteps(self, num_inference_steps, device, None, timesteps)
        finally:
            self._internal_dict = saved
        if c.use_flow_sigmas and off_grid:
            # a VE-sigma grid made from the betas, mapped to flow sigmas s / (1 + s) (as diffusers' UniPC does)
            flow = self.sigmas.double() / (1.0 + self.sigmas.double())
            if c.final_sigmas_type == "sigma_min":
                flow[-1] = flow[-2]
            self.sigmas = flow.float()
            self.timesteps = self._model_times(self.sigmas[:-1], device)
        elif (off_grid or c.use_flow_sigmas) and not c.discrete_timesteps:
            self.timesteps = self._continuous_timesteps(self.sigmas[:-1]).to(device)

    def _last_timestep(self) -> int:
        clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), self.config.lambda_min_clipped)
        return int(self.config.num_train_timesteps - clipped)

    def _continuous_timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Continuous model times of VE sigmas (log-sigma interpolation between training timesteps)."""
        if self.config.use_flow_sigmas:
            return (sigmas.double() * self.config.num_train_timesteps).float()
        log_sigmas = np.log(((1 - self.alphas_cumprod.double()) / self.alphas_cumprod.double()).sqrt().numpy())
        return torch.from_numpy(np.array([self._sigma_to_t(s, log_sigmas) for s in sigmas.double().numpy()])
                                ).float()

    def _model_times(self, sigmas: torch.Tensor, device) -> torch.Tensor:
        """Model times of a sigma grid: continuous, or rounded to integers with ``discrete_timesteps``."""
        times = self._continuous_timesteps(sigmas)
        return (times.double().round().long() if self.config.discrete_timesteps else times).to(device)

    def _noise_level(self, sigma: float) -> NoiseLevel:
        """(alpha, sigma, lambda) of a diffusers sigma (VE sigma, or flow sigma with ``use_flow_sigmas``)."""
        if self.config.use_flow_sigmas:
            alpha, sig = 1.0 - sigma, sigma
        else:
            alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
            sig = sigma * alpha
        lam = math.inf if sig == 0.0 else (-math.inf if alpha == 0.0 else math.log(alpha) - math.log(sig))
        return NoiseLevel(alpha, sig, lam)

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.model_outputs: list[torch.Tensor] = []
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
        self._first_index = 0

    @property
    def noise_levels(self) -> list[NoiseLevel]:
        """(alpha, sigma, lambda) of every grid point, the final one included."""
        return self._levels

    # ------------------------------------------------------------------ model output
    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor | None = None,
                             **kwargs) -> torch.Tensor:
        """The model output as the quantity this solver integrates (x0 or eps), as diffusers' API expects."""
        x0, eps = self.predict_x0_eps(model_output, sample)
        return x0 if self._solver_output == "x0" else eps

    def predict_x0_eps(self, model_output: torch.Tensor, sample: torch.Tensor,
                       index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Data and noise predictions at grid point ``index`` (default: the current step) from any supported
        ``prediction_type``.

        With ``thresholding`` (Imagen's dynamic thresholding, pixel-space models only) x0 is clipped and eps
        recomputed from it.
        """
        lvl = self._levels[self.step_index if index is None else index]
        a, s = lvl.alpha, lvl.sigma
        kind = self.config.prediction_type
        if self.config.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, : sample.shape[1]]
        if kind == "epsilon":
            eps = model_output
            x0 = (sample - s * eps) / a
        elif kind == "sample":
            x0 = model_output
            eps = (sample - a * x0) / s if s > 0 else torch.zeros_like(sample)
        elif kind == "v_prediction":
            x0 = a * sample - s * model_output
            eps = a * model_output + s * sample
        else:  # flow_prediction: x = (1 - s) x0 + s eps, velocity = eps - x0
            x0 = sample - s * model_output
            eps = sample + (1.0 - s) * model_output
        if self.config.thresholding:
            x0 = self._threshold_sample(x0)
            if s > 0:
                eps = (sample - a * x0) / s
        return x0, eps

    # ------------------------------------------------------------------ step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
    ) -> SchedulerOutput | tuple:
        """Advance ``sample`` from the current grid point to the next one, given the model output there.

        ``eta`` and ``use_clipped_model_output`` are DDIM's (``DDIMPipeline`` passes them to any scheduler): eta 0
        and an unset clipping are accepted, anything else is refused here and works with DDIMScheduler.
        """
        if (eta is not None and eta != 0) or use_clipped_model_output is not None:
            raise ValueError(f"{type(self).__name__}.step() takes eta=0 and no use_clipped_model_output (got "
                             f"eta={eta}, use_clipped_model_output={use_clipped_model_output}); these are DDIM's: use "
                             "diffalign.samplers.DDIMScheduler, or pass eta=0.")
        if self.num_inference_steps is None or not self._levels:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called before set_timesteps(); call "
                "scheduler.set_timesteps(num_inference_steps) first."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
            self._first_index = self.step_index  # > 0 when a pipeline starts part-way (img2img strength)
        i = self.step_index
        if i >= len(self.timesteps):
            raise RuntimeError(
                f"step() called {i + 1} times but the grid has {len(self.timesteps)} steps; call set_timesteps() "
                "again to start a new trajectory."
            )
        if model_output.shape[0] != sample.shape[0] or model_output.shape[2:] != sample.shape[2:]:
            raise ValueError(
                f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}."
            )
        if self.config.check_finite:
            self._check_finite(model_output, i)
        dtype = sample.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        x0, eps = self.predict_x0_eps(model_output.to(work), sample.to(work))
        x0, eps = self._adjust_prediction(sample.to(work), x0, eps)
        noise = None
        if self._needs_noise():
            noise = (variance_noise if variance_noise is not None else
                     torch.randn(sample.shape, generator=generator, device=sample.device, dtype=work))
            noise = noise.to(device=sample.device, dtype=work)
        prev_sample = self._update(sample.to(work), x0, eps, noise).to(dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def host_timesteps(self) -> list[float]:
        """``self.timesteps`` as Python floats, read back from their device once per grid."""
        if getattr(self, "_host_timesteps_of", None) is not self.timesteps:
            self._host_timesteps, self._host_timesteps_of = self.timesteps.double().tolist(), self.timesteps
        return self._host_timesteps

    @staticmethod
    def _reads_back_cheaply(device: torch.device) -> bool:
        """Whether reading a value of ``device`` back costs nothing (the host runs it: no queue to drain)."""
        return device.type == "cpu"

    def _check_finite(self, model_output: torch.Tensor, i: int) -> None:
        """Raise on a NaN/Inf model output, naming the first step that gave one.

        On the CPU every step is checked at once. On an accelerator, reading a value back would make the host wait
        for the model at every step (on a GPU a sampler then runs slower than diffusers' own, which checks
        nothing), so the check stays on the device, as the index of the first non-finite step, and is read at the
        trajectory's last step."""
        if self._reads_back_cheaply(model_output.device):
            first = i if not math.isfinite(float(model_output.detach().sum())) else -1
        else:
            if i == self._first_index:  # a trajectory's first step (step() sets _first_index there)
                self._nonfinite_step = torch.full((), -1, device=model_output.device)
            flag, bad = self._nonfinite_step, ~torch.isfinite(model_output.detach().sum())
            self._nonfinite_step = torch.where(bad & (flag < 0), torch.full_like(flag, i), flag)
            if i < len(self.timesteps) - 1:
                return
            first = int(self._nonfinite_step)
        if first >= 0:
            raise FloatingPointError(
                f"the model output is NaN/Inf at step {first} (timestep {float(self.timesteps[first]):g}); check "
                "the model, its dtype (try float32) and the inputs. Set check_finite=False to skip this check."
            )

    def _needs_noise(self) -> bool:
        return False

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise at model times ``timesteps`` (one per sample, or one for all).

        A time on the current grid uses that grid point's noise level (img2img starts there); any other time, also
        before ``set_timesteps`` (training code), the training schedule's: alphas_cumprod[t] at integer t, log-sigma
        interpolation in between, sigma = t / num_train_timesteps for flow matching.
        """
        t = torch.as_tensor(timesteps).detach().double().cpu().reshape(-1).tolist()
        on_grid = {}
        if self._levels:
            on_grid = {float(g): lvl for g, lvl in zip(self.timesteps.tolist(), self._levels, strict=False)}
        if self.config.use_flow_sigmas:
            training = [value / self.config.num_train_timesteps for value in t]
        else:
            training = self.sigma_at_time(t)
        levels = [on_grid.get(value) or self._noise_level(sigma) for value, sigma in zip(t, training, strict=True)]
        alphas, sigmas = [lvl.alpha for lvl in levels], [lvl.sigma for lvl in levels]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = torch.tensor(alphas, dtype=torch.float64).reshape(shape)
        s = torch.tensor(sigmas, dtype=torch.float64).reshape(shape)
        work = torch.float64 if original_samples.dtype == torch.float64 else torch.float32
        a, s = a.to(original_samples.device, work), s.to(original_samples.device, work)
        x = a * original_samples.to(work) + s * noise.to(original_samples.device, work)
        return x.to(original_samples.dtype)

    def sigma_at_time(self, t) -> list[float]:
        """VE sigmas of the training schedule at model times ``t`` (a sequence): sqrt((1 - alphabar) / alphabar) at
        integer t, log-sigma interpolation in between."""
        if getattr(self, "_log_sigmas", None) is None:  # alphas_cumprod is fixed once the schedule is built
            ac = self.alphas_cumprod.double().numpy()
            self._log_sigmas = 0.5 * np.log((1.0 - ac) / ac)
        return [math.exp(v) for v in np.interp(t, np.arange(len(self._log_sigmas)), self._log_sigmas)]

    def _zero_width(self, i: int) -> bool:
        """Whether grid points i and i + 1 share one noise level (a final ``sigma_min`` equal to the last grid
        sigma, as diffusers builds Karras, exponential, beta and logSNR grids): the exact step is the identity."""
        return self._levels[i].lambda_ == self._levels[i + 1].lambda_

    def _adjust_prediction(self, sample: torch.Tensor, x0: torch.Tensor,
                           eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook on the step's (x0, eps) before the update (identity; DualFast mixes in an earlier output)."""
        return x0, eps

    def _update(self, sample: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                noise: torch.Tensor | None) -> torch.Tensor:
        """The sampler's update from grid point ``step_index`` to ``step_index + 1``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ multistep helpers
    def _push_output(self, output: torch.Tensor, keep: int) -> None:
        """Append to the history of solver outputs, keeping the last ``keep``."""
        self.model_outputs.append(output)
        del self.model_outputs[:-keep]

    def _multistep_order(self, solver_order: int, lower_order_final: bool, euler_at_final: bool = False) -> int:
        """Order of the current multistep update (diffusers' warm-up and final-step rules).

        Orders rise 1, 2, ... as the history fills. The last step is first order when it lands on sigma = 0
        (higher-order terms are undefined at lambda = inf), with ``euler_at_final``, or with
        ``lower_order_final`` under 15 steps; then the second-to-last is at most second order.
        """
        i, n = self.step_index, len(self.timesteps)
        order = min(solver_order, len(self.model_outputs))
        short = lower_order_final and n < 15
        if i == n - 1 and (euler_at_final or short or self._levels[-1].sigma == 0.0):
            return 1
        if i == n - 2 and short:
            return min(order, 2)
        return order


def check_choice(name: str, value: object, choices: tuple) -> None:
    """Raise a ValueError naming the valid choices when a config value is not one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}.")


def singlestep_orders(num_evals: int, solver_order: int, final_to_zero: bool) -> list[int]:
    """Orders of the singlestep groups for a budget of model evaluations (DPM-Solver, Lu et al. 2022, App. D.1).

    Uses as many order-``solver_order`` steps as fit and finishes with lower orders; when the grid ends at
    sigma = 0 the last step is first order (the intermediate points of a higher-order step would lie at lambda =
    inf).
    """
    if final_to_zero and solver_order > 1:
        return singlestep_orders(num_evals - 1, solver_order, False) + [1] if num_evals > 1 else [1]
    k, rest = divmod(num_evals, solver_order)
    if solver_order == 3 and rest == 0 and k > 1:
        return [3] * (k - 1) + [2, 1]
    return [solver_order] * k + ([rest] if rest else [])


SINGLESTEP_RATIOS = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}
"""Intermediate points of a singlestep group, as fractions r of the step in lambda (Lu et al. 2022, Alg. 1-2)."""


@dataclass(frozen=True)
class SinglestepSlot:
    """Where grid point ``i`` sits: in the group starting at ``start``, position ``pos`` of ``order``."""

    start: int
    pos: int
    order: int


class SinglestepMixin:
    """Grid and bookkeeping of singlestep solvers: each group of ``order`` model evaluations goes from one
    outer grid point to the next through intermediate points uniform in lambda, one evaluation per ``step``."""

    def _singlestep_grid(self, num_evals, device, mu, timesteps, solver_order: int) -> None:
        if timesteps is not None or getattr(self, "_custom_sigmas", None) is not None:
            raise ValueError("custom `timesteps` / `sigmas` need solver_mode='multistep': a singlestep solver adds "
                             "its own intermediate points between the grid points.")
        final_zero = self.config.final_sigmas_type == "zero"
        orders = singlestep_orders(num_evals, solver_order, final_zero)
        self._base_grid(len(orders), device, mu)
        outer_t, outer_s = self.timesteps.cpu(), self.sigmas.double()
        sigmas, times, slots = [], [], []
        for k, order in enumerate(orders):
            s, t = self._noise_level(float(outer_s[k])), self._noise_level(float(outer_s[k + 1]))
            start = len(sigmas)
            sigmas.append(float(outer_s[k]))
            times.append(float(outer_t[k]))
            for r in SINGLESTEP_RATIOS[order]:
                sigmas.append(self._sigma_of_lambda(s.lambda_ + r * (t.lambda_ - s.lambda_)))
                times.append(float("nan"))
            slots += [SinglestepSlot(start, pos, order) for pos in range(order)]
        sigmas.append(float(outer_s[-1]))
        sig = torch.tensor(sigmas, dtype=torch.float64)
        times_t = torch.tensor(times, dtype=torch.float64)
        inner = torch.isnan(times_t)
        if inner.any():
            cont = self._continuous_timesteps(sig[:-1][inner])
            times_t[inner] = cont.double().round() if self.config.discrete_timesteps else cont.double()
        self.sigmas = sig.float()
        dtype = torch.int64 if self.config.discrete_timesteps or not inner.any() else torch.float32
        self.timesteps = times_t.to(dtype=dtype, device=device)
        self.num_inference_steps = len(self.timesteps)
        self._slots = slots

    def _sigma_of_lambda(self, lam: float) -> float:
        """diffusers sigma (VE sigma, or flow sigma) at half-log-SNR ``lam``."""
        ve = math.exp(-lam)
        return ve / (1.0 + ve) if self.config.use_flow_sigmas else ve

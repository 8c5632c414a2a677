"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al. 2023, arXiv 2310.13268, Sec. 3-4, App. C-D).

DPM-Solver-v3 rewrites the diffusion ODE in lambda = log(alpha / sigma) with three per-element statistics
l, s, b (one value per latent element and per noise level):

    dx/dlambda = (d log alpha / dlambda - l) x - (sigma eps - l x),
    f  = (sigma eps - l x) / alpha,
    g  = e^{-int s} f - int e^{-int s} b.

The solution formula is exact for *any* (l, s, b); the EMS are the choices that make g as close to linear in
lambda (i.e. as easy to extrapolate) as possible:

* ``l = E[diag(sigma d eps / d x)]`` (minimises ||grad_x (sigma eps - l x)||_F^2, Eq. 9), estimated with
  Rademacher probes v: ``l ~ mean_{x, v} (sigma J_eps v) * v`` where ``J_eps v`` is a forward-mode JVP;
* ``(s, b) = argmin E||f' - s f - b||^2`` (Eq. 10), the per-element linear regression of f' on f:
  ``s = Cov(f, f') / Var(f)``, ``b = E[f'] - s E[f]``, where f' is the total derivative of f along the ODE:

      f' = e^{-lambda} ((l - 1) eps + eps') - l' x / alpha,

  eps' = d eps / dlambda along the ODE (one JVP with tangents dx/dlambda = (d log alpha/dlambda) x - sigma eps,
  i.e. sigma^2 x - sigma eps for VP schedules, and dt/dlambda for the model time), and l' = dl/dlambda by
  central finite differences on the lambda grid (one-sided at the ends) smoothed by a moving average, as in
  the authors' EMS script for ScoreSDE (+-5 points of a grid with spacing ~0.01; here +-0.05 in lambda: the same
  on fine grids, no smoothing on coarse ones, where +-5 points would span a large part of the range).

**Derivatives at the grid's resolution** (``derivatives="grid"``, not in the paper). The EMS enter the solver
only through trapezoid integrals over the grid (L, S, B, C). With eps' taken by central differences along the ODE
over one grid cell (lambda +- half the grid spacing), the integral of f' over grid cells telescopes to the change
of f, whatever the model does between grid points. Discrete-time UNets vary in their time input on the scale of a
few training timesteps (the fastest sinusoid of the time embedding has a period of ~6 steps), and at high noise one
cell of a coarse grid spans several timesteps (dt/dlambda ~ -100 near t = T for DDPM's linear betas): an exact
derivative (JVP) samples that wiggle at arbitrary phases and aliases it into b, whose integral then drifts far from
the change the sampler sees. On builtin:fashion the JVP b at the noisy end jumps between ~0.5 and ~6 from one grid
point to the next (mean |b|), with grid differences ~1 (docs/verification.md, Findings).

Two safeguards not in the paper (both vanish as K -> infinity; see :func:`regression`): elements whose f varies
by less than 1e-4 of its magnitude get s = 0, and other slopes are shrunk toward 0 by their standard error. On the
digits model, pixels that are background in almost every digit otherwise get |s| ~ 1e2-1e4 from sampling noise
and the sampler diverges; with the safeguards |s| <= ~9 there.

Expectations are over x_lambda = alpha x0 + sigma z with x0 from K datapoints (the paper uses the training data
in place of model samples; for guided sampling, samples at that guidance scale) and z ~ N(0, I), or, with
``trajectories`` (not in the paper), over the states of K solutions of the sampled ODE itself. For an exact
unguided model the two have the same marginals; a classifier-free-guided ODE does not carry noise along the forward
process of its own samples, and its states at mid noise differ (on builtin:digits at guidance 7.5 the mean x^2 is
1.43 vs 0.98 at lambda = -1.2), so guided statistics are best taken on its trajectories (docs/verification.md,
Findings).

**Grid.** N + 1 points uniform in lambda from lambda_T = lambda(t = num_train_timesteps - 1) (the noisiest
training timestep, sigma_hat = sqrt((1 - abar_{T-1}) / abar_{T-1})) to lambda_0 = lambda(t = 0) (the cleanest,
sigma_hat = sqrt((1 - abar_0) / abar_0)). This covers every point of every diffusers grid for the schedule
(linspace / leading / trailing timesteps, Karras, exponential, beta and uniform-logSNR sigmas all lie in
[sigma_hat(0), sigma_hat(T - 1)]) except the final sigma = 0, which DPM-Solver-v3 reaches by a data-prediction
step. For flow-matching schedules (``use_flow_sigmas``) the range is that of diffusers' flow sigmas for
``num_train_timesteps`` steps with the config's ``flow_shift``.

**Files.** A directory with ``ems.safetensors`` (float64 ``l``, ``s``, ``b`` of shape [N + 1, C, H, W] and
``lambdas`` [N + 1], increasing from lambda_T to lambda_0; the JSON header in the safetensors metadata under
``"diffalign_ems"``) and ``ems.json`` (the same header, human-readable). Computation is resumable: partial
sums are written to ``ems.partial.safetensors`` in the output directory after every chunk of grid points and
picked up by a later run with the same settings (noise is seeded per grid point, so a resumed run gives the
same numbers as an uninterrupted one). EMS are guidance-specific, so a model may ship one set per guidance scale:
the unguided set in the directory itself and others in subdirectories (``guidance_7.5/ems.safetensors``);
:func:`select_ems_file` picks the set matching a guidance scale. :func:`load_official_ems` /
:func:`save_official_ems` read and write the official code's ``l.npz`` / ``sb.npz`` layout (same grid).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "EMS",
    "EMS_FILE",
    "ems_guidance",
    "select_ems_file",
    "SCHEDULE_KEYS",
    "compute_ems",
    "compute_model_ems",
    "load_ems",
    "load_official_ems",
    "model_eps_fn",
    "model_trajectories",
    "save_official_ems",
    "schedule_lambda_range",
]

EMS_FILE = "ems.safetensors"
HEADER_FILE = "ems.json"
PARTIAL_FILE = "ems.partial.safetensors"
META_KEY = "diffalign_ems"
FORMAT = "diffalign-ems"
VERSION = 1

SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr", "use_flow_sigmas")
"""Scheduler-config keys that determine the noise schedule (alpha, sigma as functions of the model time); an EMS
is only valid for a scheduler whose values of these keys match (``flow_shift`` too for flow matching)."""

COMPUTE_HINT = ("compute one with `diffalign ems compute --model <name> --num-datapoints 1024 --grid 1000 --out "
                "<dir>` (or diffalign.samplers.ems.compute_ems for any model callable), or pass degenerated=True "
                "(l=1, s=0, b=0: DPM-Solver++ with the v3 corrector)")


# ------------------------------------------------------------------------------------------------ schedule
class Schedule:
    """lambda <-> (alpha, sigma, model time) of a diffusers noise schedule, in float64.

    Model times are those of diffalign's schedulers (``DiffAlignScheduler._continuous_timesteps``): for VP
    schedules log(sigma_hat) is interpolated linearly between integer training timesteps (diffusers'
    ``_sigma_to_t``), for flow matching t = sigma * num_train_timesteps.
    """

    def __init__(self, scheduler) -> None:
        c = scheduler.config
        self.flow = bool(c.use_flow_sigmas)
        self.num_train_timesteps = int(c.num_train_timesteps)
        self._config = dict(c)
        abar = scheduler.alphas_cumprod.double()
        self.log_sigmas = (0.5 * (torch.log1p(-abar) - torch.log(abar))).numpy()  # increasing in t

    @functools.cached_property
    def lambda_range(self) -> tuple[float, float]:
        """(lambda_T, lambda_0): the default EMS range (see the module docstring)."""
        if not self.flow:
            return -float(self.log_sigmas[-1]), -float(self.log_sigmas[0])
        from .dpm_solver_pp import DPMSolverPlusPlusScheduler

        probe = DPMSolverPlusPlusScheduler.from_config(self._config)
        probe.set_timesteps(self.num_train_timesteps)
        sig = probe.sigmas.double()
        sig = sig[sig > 0]
        return self.lambda_of_sigma(float(sig.max())), self.lambda_of_sigma(float(sig.min()))

    @classmethod
    def from_config(cls, config: Mapping | None) -> Schedule:
        from .dpm_solver_pp import DPMSolverPlusPlusScheduler

        return cls(DPMSolverPlusPlusScheduler.from_config(dict(config or {})))

    def lambda_of_sigma(self, sigma: float) -> float:
        """lambda of a diffusers sigma (VE sigma_hat, or flow sigma)."""
        if self.flow:
            return math.log1p(-sigma) - math.log(sigma)
        return -math.log(sigma)

    def sigma_of_lambda(self, lam: float) -> float:
        """diffusers sigma (VE sigma_hat, or flow sigma) at lambda."""
        return 1.0 / (1.0 + math.exp(lam)) if self.flow else math.exp(-lam)

    def alpha_sigma(self, lam: float) -> tuple[float, float]:
        if self.flow:
            return 1.0 / (1.0 + math.exp(-lam)), 1.0 / (1.0 + math.exp(lam))
        return math.sqrt(1.0 / (1.0 + math.exp(-2.0 * lam))), math.sqrt(1.0 / (1.0 + math.exp(2.0 * lam)))

    def time(self, lam: float) -> float:
        """Continuous model time at lambda."""
        if self.flow:
            return self.sigma_of_lambda(lam) * self.num_train_timesteps
        ls = self.log_sigmas
        # piecewise linear in log(sigma_hat), extended linearly past both ends (finite differences at the ends
        # of the grid look slightly outside)
        lo = min(max(int(np.searchsorted(ls, -lam)) - 1, 0), len(ls) - 2)
        return lo + (-lam - float(ls[lo])) / float(ls[lo + 1] - ls[lo])

    def dtime_dlambda(self, lam: float) -> float:
        """dt/dlambda (on the interpolation segment [floor(t), floor(t) + 1] a model evaluated at t uses)."""
        if self.flow:
            alpha, sigma = self.alpha_sigma(lam)
            return -alpha * sigma * self.num_train_timesteps
        lo = min(max(int(math.floor(self.time(lam))), 0), len(self.log_sigmas) - 2)
        return -1.0 / float(self.log_sigmas[lo + 1] - self.log_sigmas[lo])

    def dlogalpha_dlambda(self, lam: float) -> float:
        """d log(alpha) / dlambda: sigma^2 for VP, sigma for flow matching (alpha = 1 - sigma)."""
        _, sigma = self.alpha_sigma(lam)
        return sigma if self.flow else sigma * sigma


def schedule_lambda_range(scheduler_config: Mapping | None) -> tuple[float, float]:
    """(lambda_T, lambda_0): the default EMS lambda range of a scheduler config (see the module docstring)."""
    return Schedule.from_config(scheduler_config).lambda_range


def ems_lambdas(scheduler_config: Mapping | None, num_points: int,
                lambda_range: tuple[float, float] | None = None) -> Tensor:
    """The N + 1 grid lambdas (float64, uniform from lambda_T to lambda_0) of EMS for a scheduler config."""
    lam_T, lam_0 = lambda_range if lambda_range is not None else schedule_lambda_range(scheduler_config)
    return torch.linspace(lam_T, lam_0, int(num_points) + 1, dtype=torch.float64)


def schedule_signature(config: Mapping) -> dict:
    """The values of :data:`SCHEDULE_KEYS` (plus ``flow_shift`` for flow matching) in a scheduler config."""
    from .base import SCHEDULE_DEFAULTS

    keys = SCHEDULE_KEYS + (("flow_shift",) if config.get("use_flow_sigmas") else ())
    out = {}
    for k in keys:
        v = config.get(k, SCHEDULE_DEFAULTS.get(k))
        if isinstance(v, np.ndarray | torch.Tensor):
            v = v.tolist()
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def schedule_mismatches(expected: Mapping, config: Mapping) -> list[str]:
    """Human-readable differences between an EMS's schedule signature and a scheduler config."""
    got = schedule_signature(config)
    bad = []
    for k, v in expected.items():
        w = got.get(k)
        same = v == w
        if not same and isinstance(v, int | float) and isinstance(w, int | float):
            same = math.isclose(float(v), float(w), rel_tol=1e-9, abs_tol=1e-12)
        if not same:
            bad.append(f"{k}: EMS {v!r} vs scheduler {w!r}")
    return bad


# ------------------------------------------------------------------------------------------------ EMS
@dataclass
class EMS:
    """Empirical model statistics on a lambda grid.

    Attributes:
        l, s, b: float64 tensors [N + 1, *sample_shape] (``sample_shape`` may be ``()``: one value per noise
            level, broadcast over any sample shape).
        lambdas: float64 [N + 1], uniform, increasing from lambda_T (noisiest) to lambda_0 (cleanest).
        meta: the JSON header (model id, sample shape, schedule, guidance, N, K, ...).
    """

    l: Tensor
    s: Tensor
    b: Tensor
    lambdas: Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.l, self.s, self.b = (torch.as_tensor(a, dtype=torch.float64).cpu() for a in (self.l, self.s, self.b))
        self.lambdas = torch.as_tensor(self.lambdas, dtype=torch.float64).cpu().flatten()
        n = self.lambdas.numel()
        where = self.meta.get("path", "the EMS")
        if n < 2:
            raise ValueError(f"{where}: an EMS needs at least 2 grid points, got {n}.")
        for name in ("l", "s", "b"):
            a = getattr(self, name)
            if a.shape[0] != n or a.shape != self.l.shape:
                raise ValueError(f"{where}: {name} has shape {tuple(a.shape)}; expected [{n}, ...] like l "
                                 f"{tuple(self.l.shape)} (one row per lambda grid point).")
        for name in ("lambdas", "l", "s", "b"):
            a = getattr(self, name)
            bad = ~torch.isfinite(a.reshape(n, -1)).all(dim=1) if a.ndim > 1 else ~torch.isfinite(a)
            if bad.any():
                rows = torch.nonzero(bad).flatten().tolist()
                raise ValueError(f"{where}: non-finite values in {name} at grid points {rows[:10]}"
                                 f"{' ...' if len(rows) > 10 else ''} (of {n}); the statistics are unusable -- "
                                 "recompute them (more datapoints, float64 model) or use degenerated=True.")
        steps = torch.diff(self.lambdas)
        if not (steps > 0).all() or (steps.max() - steps.min()) > 1e-6 * max(1.0, float(steps.abs().max())):
            raise ValueError(f"{where}: lambdas must be uniform and increasing (lambda_T -> lambda_0).")

    @property
    def num_points(self) -> int:
        """N (the grid has N + 1 points)."""
        return self.lambdas.numel() - 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    @property
    def lambda_T(self) -> float:
        return float(self.lambdas[0])

    @property
    def lambda_0(self) -> float:
        return float(self.lambdas[-1])

    def nearest_index(self, lam: float) -> int:
        """Index of the grid point nearest to ``lam`` (the official ``convert_to_indexes``); raises outside."""
        n = self.num_points
        pos = n * (lam - self.lambda_T) / (self.lambda_0 - self.lambda_T)
        if not -0.5 <= pos <= n + 0.5:
            raise ValueError(
                f"lambda={lam:.6g} lies outside the EMS grid [{self.lambda_T:.6g}, {self.lambda_0:.6g}]; the "
                "sampling grid reaches noise levels the EMS do not cover -- recompute the EMS for this schedule "
                "(a wider lambda range) or change the timestep spacing."
            )
        return int(min(max(round(pos), 0), n))

    @classmethod
    def degenerate(cls, shape: tuple[int, ...] = (), lambdas: Tensor | None = None, *,
                   scheduler_config: Mapping | None = None, num_points: int = 1000) -> EMS:
        """l = 1, s = 0, b = 0 (DPM-Solver++'s data-prediction ODE, App. A.2) on a uniform lambda grid.

        The grid is ``lambdas`` or N = ``num_points`` intervals over the schedule's default range.
        """
        if lambdas is None:
            lam_T, lam_0 = schedule_lambda_range(scheduler_config)
            lambdas = torch.linspace(lam_T, lam_0, num_points + 1, dtype=torch.float64)
        lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
        full = (lambdas.numel(), *tuple(shape))
        meta = {"format": FORMAT, "version": VERSION, "degenerate": True, "sample_shape": list(shape),
                "num_points": lambdas.numel() - 1}
        if scheduler_config is not None:
            meta["schedule"] = schedule_signature(dict(scheduler_config))
        return cls(torch.ones(full, dtype=torch.float64), torch.zeros(full, dtype=torch.float64),
                   torch.zeros(full, dtype=torch.float64), lambdas, meta)

    def save(self, path: str | Path) -> Path:
        """Write ``ems.safetensors`` + ``ems.json`` into directory ``path`` (or to ``path`` if it ends in
        ``.safetensors``, with the JSON next to it); returns the safetensors file."""
        from safetensors.torch import save_file

        file = _ems_file(Path(path), create=True)
        meta = {k: v for k, v in self.meta.items() if k != "path"}
        tensors = {k: getattr(self, k).contiguous().clone() for k in ("l", "s", "b", "lambdas")}
        tmp = file.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        tmp.chmod(0o644)  # safetensors creates files readable by the owner only
        tmp.replace(file)
        file.with_name(HEADER_FILE if file.name == EMS_FILE else file.stem + ".json").write_text(
            json.dumps(meta, indent=2) + "\n")
        return file


def _ems_file(path: Path, create: bool = False) -> Path:
    if path.suffix == ".safetensors":
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        return path
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path / EMS_FILE


def _file_meta(fh) -> dict:
    """The JSON header stored under :data:`META_KEY` in an open safetensors file (``{}`` when absent)."""
    return json.loads((fh.metadata() or {}).get(META_KEY, "{}"))


def ems_guidance(file: str | Path) -> float | None:
    """The guidance scale in an EMS file's header (``None`` when unrecorded), read without loading the arrays."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        meta = _file_meta(fh)
    return None if meta.get("guidance") is None else float(meta["guidance"])


def select_ems_file(path: str | Path, guidance_scale: float | None = None) -> Path:
    """The EMS file for ``guidance_scale`` under ``path``.

    ``path`` is an EMS file or a directory holding ``ems.safetensors`` and/or subdirectories with one EMS each
    (e.g. ``guidance_7.5/``): EMS are guidance-specific, so a model can ship one set per guidance scale. The set
    whose header guidance equals ``guidance_scale`` is chosen (``None``: the unguided set, guidance 1); otherwise the
    top-level file (the caller decides what a guidance mismatch means), else the first subdirectory's.
    """
    path = Path(path)
    top = _ems_file(path)
    if path.suffix == ".safetensors" or not path.is_dir():
        return top
    candidates = ([top] if top.is_file() else []) + sorted(p / EMS_FILE for p in path.iterdir()
                                                           if p.is_dir() and (p / EMS_FILE).is_file())
    want = 1.0 if guidance_scale is None else float(guidance_scale)
    for file in candidates:
        g = ems_guidance(file)
        if g is not None and math.isclose(g, want):
            return file
    return candidates[0] if candidates else top


def load_ems(path: str | Path) -> EMS:
    """Load (and validate) an EMS written by :meth:`EMS.save` / :func:`compute_ems` (directory or file)."""
    from safetensors import safe_open

    file = _ems_file(Path(path))
    if not file.is_file():
        raise FileNotFoundError(f"no EMS file at {file}; {COMPUTE_HINT}.")
    with safe_open(str(file), framework="pt") as fh:
        meta = _file_meta(fh)
        missing = {"l", "s", "b", "lambdas"} - set(fh.keys())
        if missing:
            raise ValueError(f"{file} is not an EMS file (missing {sorted(missing)}); {COMPUTE_HINT}.")
        arrays = {k: fh.get_tensor(k) for k in ("l", "s", "b", "lambdas")}
    meta["path"] = str(file)
    return EMS(arrays["l"], arrays["s"], arrays["b"], arrays["lambdas"], meta)


# ------------------------------------------------------------------------------------------------ official layout
OFFICIAL_L, OFFICIAL_SB = "l.npz", "sb.npz"


def load_official_ems(directory: str | Path, scheduler_config: Mapping, *, guidance: float = 1.0,
                      model: str | None = None) -> EMS:
    """EMS from the official code's ``statistics_dir`` (``l.npz`` with key ``l``, ``sb.npz`` with ``s``, ``b``,
    each [N + 1, C, H, W]) for a discrete VP model with this scheduler config.

    The official sampler places the N + 1 rows uniformly in lambda from lambda(t = 1) to lambda(t = 1 / T), which
    for a discrete schedule are the noisiest and the cleanest training timesteps: diffalign's default range, so
    the arrays are used as they are. The files are read with ``allow_pickle=False``.
    """
    directory = Path(directory)
    config = dict(scheduler_config)
    if config.get("use_flow_sigmas"):
        raise ValueError("the official EMS layout is defined for VP (DDPM-type) schedules only; this scheduler "
                         "config uses flow-matching sigmas.")
    arrays = {}
    for name, keys in ((OFFICIAL_L, ("l",)), (OFFICIAL_SB, ("s", "b"))):
        file = directory / name
        if not file.is_file():
            raise FileNotFoundError(f"no {name} in {directory}; an official statistics directory holds {OFFICIAL_L} "
                                    f"(key 'l') and {OFFICIAL_SB} (keys 's', 'b').")
        with np.load(file, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ValueError(f"{file} lacks the array(s) {missing} (it has {z.files}).")
            arrays.update({k: torch.from_numpy(np.asarray(z[k], dtype=np.float64)) for k in keys})
    n = arrays["l"].shape[0]
    lam_T, lam_0 = schedule_lambda_range(config)
    meta = {"format": FORMAT, "version": VERSION, "model": model, "guidance": float(guidance),
            "source": f"official layout: {directory}", "sample_shape": list(arrays["l"].shape[1:]),
            "num_points": n - 1, "schedule": schedule_signature(config), "lambda_T": lam_T, "lambda_0": lam_0,
            "path": str(directory)}  # names the files in validation errors; not part of the header
    ems = EMS(arrays["l"], arrays["s"], arrays["b"], torch.linspace(lam_T, lam_0, n, dtype=torch.float64), meta)
    ems.meta.pop("path")
    return ems


def save_official_ems(ems: EMS, directory: str | Path, dtype: str = "float32") -> Path:
    """Write ``l.npz`` / ``sb.npz`` for the official sampler, in float32 by default: the official sampler mixes the
    statistics with its float32 tensors and fails on float64 ones ("expected m1 and m2 to have the same dtype").
    ``dtype="float64"`` keeps full precision (for :func:`load_official_ems` round trips).

    Raises if the EMS grid is not the official one (uniform from lambda(t = 1) to lambda(t = 1 / T) of the EMS's
    schedule): the official files carry no lambdas, so another grid would be silently misplaced.
    """
    schedule = ems.meta.get("schedule")
    if not schedule or schedule.get("use_flow_sigmas"):
        raise ValueError("only EMS of VP (DDPM-type) schedules with a recorded schedule can be written in the "
                         "official layout.")
    lam_T, lam_0 = schedule_lambda_range(schedule)
    if not (math.isclose(ems.lambda_T, lam_T, abs_tol=1e-6) and math.isclose(ems.lambda_0, lam_0, abs_tol=1e-6)):
        raise ValueError(f"the EMS grid spans lambda {ems.lambda_T:.6g}..{ems.lambda_0:.6g}, not the official "
                         f"{lam_T:.6g}..{lam_0:.6g} (lambda(t=1)..lambda(t=1/T)); the official files carry no "
                         "lambdas, so this grid cannot be written in that layout.")
    if not ems.sample_shape:
        raise ValueError("the official layout stores per-element statistics [N + 1, C, H, W]; this EMS has one "
                         "value per noise level.")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / OFFICIAL_L, l=ems.l.numpy().astype(dtype))
    np.savez(directory / OFFICIAL_SB, s=ems.s.numpy().astype(dtype), b=ems.b.numpy().astype(dtype))
    return directory


# ------------------------------------------------------------------------------------------------ computation
EpsFn = Callable[..., Tensor]


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _fingerprint(x: Tensor, labels: Tensor | None) -> str:
    h = hashlib.sha1(x.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def smoothed_derivative(values: Tensor, lambdas: Tensor, window: int = 5) -> Tensor:
    """d values / dlambda on a uniform grid: central differences (one-sided at the ends), then a moving average
    over +-``window`` points truncated at the ends (the authors' treatment of l')."""
    n = values.shape[0]
    gap = float(lambdas[1] - lambdas[0])
    d = torch.empty_like(values)
    d[0] = (values[1] - values[0]) / gap
    d[-1] = (values[-1] - values[-2]) / gap
    if n > 2:
        d[1:-1] = (values[2:] - values[:-2]) / (2 * gap)
    if window <= 0:
        return d
    csum = torch.cat([torch.zeros_like(d[:1]), torch.cumsum(d, dim=0)])
    idx = torch.arange(n)
    lo, hi = (idx - window).clamp(min=0), (idx + window + 1).clamp(max=n)
    shape = (n,) + (1,) * (values.ndim - 1)
    return (csum[hi] - csum[lo]) / (hi - lo).to(values.dtype).reshape(shape)


class _Caller:
    """Calls ``eps_fn(x, t)`` or ``eps_fn(x, t, labels)`` with a per-sample time tensor.

    Attention runs on PyTorch's math backend: the fused scaled-dot-product kernels have no forward-mode AD.
    """

    def __init__(self, eps_fn: EpsFn, labels: Tensor | None):
        self.eps_fn, self.labels = eps_fn, labels

    def __call__(self, x: Tensor, t: Tensor, rows: slice) -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            if self.labels is None:
                return self.eps_fn(x, t)
            return self.eps_fn(x, t, self.labels[rows])


def _double_vjp(fn: Callable, primals: tuple, tangents: tuple) -> Tensor:
    """J v by reverse mode twice (u -> J^T u, then d(J^T u . v)/du), for ops without forward-mode AD."""
    with torch.enable_grad():
        xs = [p.detach().requires_grad_(True) for p in primals]
        out = fn(*xs)
        u = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, xs, u, create_graph=True, allow_unused=True)
        dot = sum((g * v).sum() for g, v in zip(grads, tangents, strict=True) if g is not None)
        if not isinstance(dot, Tensor) or not dot.requires_grad:
            return torch.zeros_like(out).detach()
        (jv,) = torch.autograd.grad(dot, u)
    return jv.detach()


class _JVP:
    """Forward-mode JVP (``torch.func.jvp``), falling back to :func:`_double_vjp` for models with ops that have no
    forward-mode derivative (e.g. group norm on non-contiguous inputs in diffusers' UNets)."""

    def __init__(self) -> None:
        self.forward_mode = True

    def __call__(self, fn: Callable, primals: tuple, tangents: tuple) -> Tensor:
        from torch.func import jvp

        if self.forward_mode:
            try:
                return jvp(fn, primals, tangents)[1]
            except (RuntimeError, NotImplementedError) as err:
                logger.info("forward-mode AD failed (%s); using reverse mode twice for JVPs.", str(err)[:200])
                self.forward_mode = False
        return _double_vjp(fn, primals, tangents)


def _time_tangent_works(call: _Caller, jvp: _JVP, x: Tensor, t_mid: float, rows: slice) -> bool:
    """Whether forward-mode AD through the model's time input gives its time derivative (checked against a
    central difference inside one interpolation segment of the schedule)."""
    t_c = math.floor(t_mid) + 0.5
    tt = torch.full((x.shape[0],), t_c, dtype=x.dtype, device=x.device)
    try:
        dt = jvp(lambda t_: call(x, t_, rows), (tt,), (torch.ones_like(tt),))
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    with torch.no_grad():
        fd = (call(x, tt + 0.25, rows) - call(x, tt - 0.25, rows)) / 0.5
    scale = float(fd.double().norm())
    if scale == 0.0:
        return True
    return float((dt.double() - fd.double()).norm()) <= 0.05 * scale


def compute_ems(
    eps_fn: EpsFn,
    data_x0: Tensor,
    scheduler_config: Mapping | None = None,
    num_points: int = 1000,
    *,
    labels: Tensor | None = None,
    num_probes: int = 1,
    batch_size: int = 256,
    seed: int = 0,
    out: str | Path | None = None,
    meta: Mapping | None = None,
    smooth_lambda: float = 0.05,
    time_derivative: str = "auto",
    lambda_range: tuple[float, float] | None = None,
    chunk_points: int | None = None,
    shrink: bool = True,
    derivatives: str = "jvp",
    fd_lambda_step: float | None = None,
    trajectories: Tensor | None = None,
    progress: bool = True,
) -> EMS:
    """Estimate DPM-Solver-v3's EMS of a noise-prediction model (see the module docstring for the maths).

    Args:
        eps_fn: ``eps_fn(x, t) -> eps`` (or ``eps_fn(x, t, labels)`` when ``labels`` is given): the noise
            prediction at model time ``t`` (a tensor [B] of continuous diffusers timesteps, dtype of ``x``).
            For guided sampling pass the guided callable. Must support ``torch.func.jvp`` in ``x``; its time
            derivative is taken by JVP too when ``t`` is differentiable (``time_derivative="jvp"``), otherwise by
            central differences in lambda (``"fd"``); ``"auto"`` checks once which applies.
        data_x0: the K datapoints [K, C, H, W] (their dtype and device are the model's); all are used.
        scheduler_config: the model's diffusers scheduler config (noise schedule).
        num_points: N; the grid has N + 1 points uniform in lambda over ``lambda_range`` (default: the
            schedule's [lambda(t=T-1), lambda(t=0)]).
        labels: per-datapoint labels passed to ``eps_fn`` (class-conditional / guided EMS).
        num_probes: Rademacher probes per datapoint and grid point for l.
        batch_size: datapoints per JVP (bounds memory).
        seed: seeds the forward noise and the probes (per grid point, so resuming is exact).
        out: directory for the result (and the resumable partial sums); nothing is written when None.
        meta: extra header entries (model id, guidance, datapoints kind, ...).
        smooth_lambda: half-width in lambda of the moving average applied to l' (rounded to grid points; 0.05
            is the authors' +-5 points at their grid density, ~0.01 in lambda).
        chunk_points: grid points per chunk between partial saves (default: N / 20).
        shrink: shrink each element's regression slope s toward 0 by its standard error (see :func:`regression`);
            False gives the paper's plain least-squares slope.
        derivatives: ``"jvp"`` (forward-mode AD, as the paper), ``"fd"``: central differences, 2 model
            evaluations per directional derivative instead of a JVP (~5x a forward pass on the built-in UNets), so
            about twice as fast overall; steps (float32 / float64 models) 1e-2 / 1e-4 in x along the probe and 1e-3 /
            1e-4 in lambda along the ODE; the derivatives agree with the JVPs to <1% on the built-in models, far
            below the Monte-Carlo error of K datapoints; or ``"grid"``: as ``"fd"`` but the lambda step along the
            ODE is half the grid spacing (see the module docstring), for models trained at discrete timesteps.
        fd_lambda_step: the lambda step of the finite differences in time for ``"fd"`` (default above).
        trajectories: states [N + 1, K, C, H, W] of K solutions of the sampled ODE at the grid points
            (:func:`model_trajectories`); they replace the forward-noised ``alpha x0 + sigma z``, whose marginals
            are not those of a guided ODE (``data_x0`` then only gives K and the shape).
        progress: show a tqdm progress bar.

    Returns:
        The :class:`EMS` (also saved to ``out`` when given). Non-finite statistics raise a ValueError.
    """
    from tqdm.auto import tqdm

    jvp = _JVP()
    if derivatives not in ("jvp", "fd", "grid"):
        raise ValueError(f"derivatives={derivatives!r} must be 'jvp', 'fd' or 'grid'.")
    if derivatives != "fd" and fd_lambda_step is not None:
        raise ValueError(f"fd_lambda_step applies to derivatives='fd' only (derivatives={derivatives!r}).")
    if time_derivative not in ("auto", "jvp", "fd"):
        raise ValueError(f"time_derivative={time_derivative!r} must be 'auto', 'jvp' or 'fd'.")
    if num_points < 2 or int(num_points) != num_points:
        raise ValueError(f"num_points (N) must be an integer >= 2, got {num_points!r}.")
    if data_x0.ndim < 2 or data_x0.shape[0] < 2:
        raise ValueError(f"data_x0 must have shape [K, ...] with K >= 2 datapoints, got {tuple(data_x0.shape)}.")
    if num_probes < 1 or batch_size < 1:
        raise ValueError("num_probes and batch_size must be >= 1.")
    if labels is not None and len(labels) != len(data_x0):
        raise ValueError(f"labels has {len(labels)} entries for {len(data_x0)} datapoints.")
    if trajectories is not None and tuple(trajectories.shape) != (int(num_points) + 1, *data_x0.shape):
        raise ValueError(f"trajectories must have shape [N + 1, K, ...] = {[int(num_points) + 1, *data_x0.shape]}, "
                         f"got {list(trajectories.shape)}; compute them on the same grid (model_trajectories).")
    config = dict(scheduler_config or {})
    sched = Schedule.from_config(config)
    lambdas = ems_lambdas(config, num_points, lambda_range or sched.lambda_range)
    lam_T, lam_0 = float(lambdas[0]), float(lambdas[-1])
    n = int(num_points)
    smooth_window = int(round(smooth_lambda / abs(float(lambdas[1] - lambdas[0]))))
    k_data = data_x0.shape[0]
    shape = tuple(data_x0.shape[1:])
    device, dtype = data_x0.device, data_x0.dtype
    # finite-difference steps: in x along a probe, and in lambda (the model's time embedding varies on the scale of
    # one training timestep, ~1e-2 in lambda, so the lambda step is smaller; on builtin:digits 1e-3 agrees with the
    # JVP to <0.5%, 1e-2 only to 10-20%)
    delta_x, delta = (1e-4, 1e-4) if dtype == torch.float64 else (1e-2, 1e-3)
    if fd_lambda_step is not None:
        delta = float(fd_lambda_step)
    if derivatives == "grid":
        delta = abs(float(lambdas[1] - lambdas[0])) / 2
    call = _Caller(eps_fn, labels)
    header = {
        "format": FORMAT, "version": VERSION, **dict(meta or {}),
        "sample_shape": list(shape), "num_points": n, "num_datapoints": k_data, "num_probes": int(num_probes),
        "seed": int(seed), "smooth_window": smooth_window, "schedule": schedule_signature(config),
        "lambda_T": float(lam_T), "lambda_0": float(lam_0),
        "data_sha1": _fingerprint(data_x0 if trajectories is None else trajectories, labels),
    }
    finite = derivatives in ("fd", "grid")
    if finite:
        header.update(derivatives=derivatives, fd_steps=[delta_x, delta])
    else:  # the lambda step of the time-derivative fallback (models whose time input carries no tangent)
        header.update(fd_time_step=delta)
    chunk = max(1, int(chunk_points) if chunk_points else math.ceil((n + 1) / 20))
    out_dir = Path(out) if out is not None else None
    # phase 2 accumulates moments of f - c, f' - c' with per-point shifts c (the first batch's means): f can be
    # nearly deterministic (Var(f) ~ 1e-12 E[f^2]), where raw second moments would cancel catastrophically
    names = ("l_sum", "f_sum", "fd_sum", "ff_sum", "ffd_sum", "fdfd_sum", "f_shift", "fd_shift")
    sums = {k: torch.zeros((n + 1, *shape), dtype=torch.float64) for k in names}
    state = {"phase": "l", "next": 0, "time_derivative": time_derivative, "seconds": 0.0}
    if out_dir is not None and (out_dir / PARTIAL_FILE).is_file():
        state, sums = _load_partial(out_dir / PARTIAL_FILE, header, sums)
        logger.info("resuming EMS computation from %s (phase %s, point %d)", out_dir, state["phase"], state["next"])
    t_start = time.perf_counter() - state["seconds"]

    def save_partial() -> None:
        if out_dir is None:
            return
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        state["seconds"] = time.perf_counter() - t_start
        tmp = out_dir / (PARTIAL_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in sums.items()}, str(tmp),
                  metadata={META_KEY: json.dumps({"header": header, "state": state})})
        tmp.replace(out_dir / PARTIAL_FILE)

    batches = [slice(i, min(i + batch_size, k_data)) for i in range(0, k_data, batch_size)]
    done = (0 if state["phase"] == "l" else n + 1) + state["next"]
    bar = tqdm(total=2 * (n + 1), initial=done, desc="EMS", disable=not progress, unit="pt")

    def noise(tag: int, j: int, rows: slice, kind: str) -> Tensor:
        gen = torch.Generator().manual_seed(_seed(seed, tag, j, rows.start))
        z = torch.randn((rows.stop - rows.start, *shape), generator=gen, dtype=torch.float64)
        if kind == "both":
            v = torch.randint(0, 2, (num_probes, *z.shape), generator=gen, dtype=torch.int64) * 2 - 1
            return z.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
        return z.to(device=device, dtype=dtype)

    def x_at(j: int, rows: slice, alpha: float, sigma: float, tag: int, z: Tensor | None = None) -> Tensor:
        """States at grid point j: the trajectories', or alpha x0 + sigma z (z drawn for ``tag`` unless given)."""
        if trajectories is not None:
            return trajectories[j, rows].to(device=device, dtype=dtype)
        return alpha * data_x0[rows] + sigma * (noise(tag, j, rows, "z") if z is None else z)

    # ---- phase 1: l = E[(sigma J v) * v]
    if state["phase"] == "l":
        for j in range(state["next"], n + 1):
            lam = float(lambdas[j])
            alpha, sigma = sched.alpha_sigma(lam)
            t = sched.time(lam)
            acc = torch.zeros(shape, dtype=torch.float64, device=device)
            for rows in batches:
                z, probes = noise(0, j, rows, "both")
                x = x_at(j, rows, alpha, sigma, 0, z)
                tt = torch.full((x.shape[0],), t, dtype=dtype, device=device)
                for v in probes:
                    if finite:
                        with torch.no_grad():
                            jv = (call(x + delta_x * v, tt, rows) - call(x - delta_x * v, tt, rows)) / (2 * delta_x)
                    else:
                        jv = jvp(lambda x_, tt=tt, rows=rows: call(x_, tt, rows), (x,), (v,))
                    acc += (sigma * jv.double() * v.double()).sum(0)
            sums["l_sum"][j] = acc.cpu()
            state["next"] = j + 1
            bar.update(1)
            if (j + 1) % chunk == 0 or j == n:
                save_partial()
        state.update(phase="f", next=0)
        save_partial()

    l_all = sums["l_sum"] / (k_data * num_probes)
    _check_finite({"l": l_all}, lambdas, "l")
    l_prime = smoothed_derivative(l_all, lambdas, smooth_window)

    # ---- phase 2: regression statistics of f' on f
    if finite:
        state["time_derivative"] = "fd"
    if state["time_derivative"] == "auto":
        rows = slice(0, min(4, k_data))
        lam_mid = float(lambdas[n // 2])
        alpha, sigma = sched.alpha_sigma(lam_mid)
        x = x_at(n // 2, rows, alpha, sigma, 2)
        state["time_derivative"] = "jvp" if _time_tangent_works(call, jvp, x, sched.time(lam_mid), rows) else "fd"
        if state["time_derivative"] == "fd":
            logger.info("eps_fn does not propagate a tangent through its time input; its time derivative is "
                        "taken by central differences in lambda.")
    use_jvp_time = state["time_derivative"] == "jvp"
    for j in range(state["next"], n + 1):
        lam = float(lambdas[j])
        alpha, sigma = sched.alpha_sigma(lam)
        t = sched.time(lam)
        dlog_alpha = sched.dlogalpha_dlambda(lam)
        l_j = l_all[j].to(device)
        ld_j = l_prime[j].to(device)
        acc = {k: torch.zeros(shape, dtype=torch.float64, device=device) for k in names[1:]}
        for rows in batches:
            x = x_at(j, rows, alpha, sigma, 1)
            tt = torch.full((x.shape[0],), t, dtype=dtype, device=device)
            with torch.no_grad():
                eps = call(x, tt, rows)
            vx = dlog_alpha * x - sigma * eps
            if finite:  # along the ODE: x and lambda together
                with torch.no_grad():
                    t_hi = torch.full_like(tt, sched.time(lam + delta))
                    t_lo = torch.full_like(tt, sched.time(lam - delta))
                    eps_d = (call(x + delta * vx, t_hi, rows) - call(x - delta * vx, t_lo, rows)) / (2 * delta)
            elif use_jvp_time:
                vt = torch.full_like(tt, sched.dtime_dlambda(lam))
                eps_d = jvp(lambda x_, t_, rows=rows: call(x_, t_, rows), (x, tt), (vx, vt))
            else:
                eps_d = jvp(lambda x_, tt=tt, rows=rows: call(x_, tt, rows), (x,), (vx,))
                with torch.no_grad():
                    t_hi = torch.full_like(tt, sched.time(lam + delta))
                    t_lo = torch.full_like(tt, sched.time(lam - delta))
                    eps_d = eps_d + (call(x, t_hi, rows) - call(x, t_lo, rows)) / (2 * delta)
            xd, ed, epsd = x.double(), eps.double(), eps_d.double()
            f = (sigma * ed - l_j * xd) / alpha
            fd = math.exp(-lam) * ((l_j - 1.0) * ed + epsd) - ld_j * xd / alpha
            if rows.start == 0:
                acc["f_shift"], acc["fd_shift"] = f.mean(0), fd.mean(0)
            f, fd = f - acc["f_shift"], fd - acc["fd_shift"]
            acc["f_sum"] += f.sum(0)
            acc["fd_sum"] += fd.sum(0)
            acc["ff_sum"] += (f * f).sum(0)
            acc["ffd_sum"] += (f * fd).sum(0)
            acc["fdfd_sum"] += (fd * fd).sum(0)
        for k, v in acc.items():
            sums[k][j] = v.cpu()
        state["next"] = j + 1
        bar.update(1)
        if (j + 1) % chunk == 0 or j == n:
            save_partial()
    bar.close()

    s, b = regression(sums, k_data, shrink)
    _check_finite({"s": s, "b": b}, lambdas, "s, b")
    header.update(time_derivative=state["time_derivative"], shrink=bool(shrink),
                  seconds=round(time.perf_counter() - t_start, 3))
    ems = EMS(l_all, s, b, lambdas, header)
    if out_dir is not None:
        ems.save(out_dir)
        (out_dir / PARTIAL_FILE).unlink(missing_ok=True)
    return ems


def regression(sums: dict[str, Tensor], k: int, shrink: bool = True, z: float = 3.0,
               deterministic_tol: float = 1e-4) -> tuple[Tensor, Tensor]:
    """(s, b) of the per-element regression f' ~ s f + b from the accumulated (shifted) moments.

    Least squares (Eq. 10): s = Cov(f, f') / Var(f), b = E[f'] - s E[f]. Where f is (nearly) deterministic --
    e.g. digit pixels that are almost always background -- Var(f) is tiny and the slope is dominated by sampling
    noise (|s| ~ 100 with K = 512 on the digits model), and such s make e^{-int s} vary wildly between grid
    points, which breaks both the trapezoid integrals and the polynomial extrapolation of g. With ``shrink`` the
    slope is shrunk by its standard error SE^2 = Var(residual) / (K Var(f)):
    s = s_ls * s_ls^2 / (s_ls^2 + z^2 SE^2) -- nearly unchanged where the regression is significant (|s_ls| >>
    z SE), -> 0 (the data-prediction choice s = 0, b = E[f']) where it is not (on the digits model those
    regressions explain ~0.1 % of the variance of f'); the paper's estimator as K -> infinity.
    Elements whose f varies by less than ``deterministic_tol`` of its magnitude get s = 0, b = E[f'] (any s fits
    a deterministic f; the fitted one is noise).
    """
    mean_f, mean_fd = sums["f_sum"] / k, sums["fd_sum"] / k
    var_f = (sums["ff_sum"] / k - mean_f**2).clamp(min=0.0)
    var_fd = (sums["fdfd_sum"] / k - mean_fd**2).clamp(min=0.0)
    cov = sums["ffd_sum"] / k - mean_f * mean_fd
    # f varying by less than 1e-4 of its magnitude is treated as deterministic (s = 0): there the regression
    # fits rounding and finite-difference noise of f' that is correlated with the rounding of f (slopes ~1e4)
    zero = var_f <= (deterministic_tol**2) * ((sums["f_shift"] + mean_f) ** 2 + var_f) + 1e-300
    safe_var = torch.where(zero, torch.ones_like(var_f), var_f)
    s = torch.where(zero, torch.zeros_like(cov), cov / safe_var)
    if shrink:
        resid = (var_fd - cov * s).clamp(min=0.0)
        se2 = resid / (k * safe_var)
        denom = s * s + z * z * se2
        s = torch.where(denom > 0, s * s * s / torch.where(denom > 0, denom, torch.ones_like(denom)), s)
    b = (sums["fd_shift"] + mean_fd) - s * (sums["f_shift"] + mean_f)
    return s, b


def _check_finite(arrays: dict[str, Tensor], lambdas: Tensor, what: str) -> None:
    for name, a in arrays.items():
        bad = ~torch.isfinite(a.reshape(a.shape[0], -1)).all(dim=1)
        if bad.any():
            rows = torch.nonzero(bad).flatten().tolist()
            lam = ", ".join(f"{float(lambdas[r]):.3g}" for r in rows[:5])
            raise ValueError(f"EMS estimation produced non-finite {name} ({what}) at {len(rows)} grid points "
                             f"(lambda = {lam}{' ...' if len(rows) > 5 else ''}); the model output or its JVP is "
                             "NaN/Inf there -- check the model in float32/float64 and its lambda range.")


def _load_partial(file: Path, header: dict, sums: dict) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        saved = _file_meta(fh)
        loaded = {k: fh.get_tensor(k) for k in sums if k in fh.keys()}
    if saved.get("header") != json.loads(json.dumps(header)) or set(loaded) != set(sums):
        raise ValueError(f"{file} holds partial EMS results computed with different settings (model, data, "
                         "schedule, N, K, seed or probes); delete it or choose another output directory.")
    for k, v in loaded.items():
        if v.shape != sums[k].shape:
            raise ValueError(f"{file}: partial array {k} has shape {tuple(v.shape)}, expected {tuple(sums[k].shape)}.")
    return saved["state"], loaded


# ------------------------------------------------------------------------------------------------ named models
def model_eps_fn(named_model, guidance: float = 1.0) -> EpsFn:
    """``eps_fn(x, t[, labels])`` of a :class:`~diffalign.models.registry.NamedModel`: its prediction (guided
    when ``guidance != 1`` and labels are given; unconditional without labels) converted to eps."""
    from ..models.reference import NoiseSchedule

    kind = named_model.scheduler_config.get("prediction_type", "epsilon")
    schedule = NoiseSchedule.from_config(named_model.scheduler_config)

    def eps_fn(x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        out = named_model.predict(x, t, labels, guidance)
        if kind == "epsilon":
            return out
        alpha, sigma = schedule.alpha_sigma(t.detach().cpu())
        shape = (-1,) + (1,) * (x.ndim - 1)
        a = alpha.to(device=x.device, dtype=x.dtype).reshape(shape)
        s = sigma.to(device=x.device, dtype=x.dtype).reshape(shape)
        if kind == "sample":
            return (x - a * out) / s
        if kind == "v_prediction":
            return a * out + s * x
        if kind == "flow_prediction":
            return x + (1.0 - s) * out
        raise ValueError(f"unsupported prediction_type {kind!r}")

    return eps_fn


def model_datapoints(named_model, num_datapoints: int, kind: str = "data", guidance: float = 1.0, seed: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True,
                     labelled: bool = False) -> tuple[Tensor, Tensor | None]:
    """K datapoints (x0, labels) for a named model.

    ``kind="data"``: the data set the model was built on, drawn without replacement (with, past the data set's
    size); for the closed-form reference models, draws from the mixture itself (a data point plus N(0, s0^2)
    noise: the model's exact data distribution, e.g. the scikit-learn digits plus the components' width); a
    model registers its own
    with ``named_model.extra["datapoints"] = fn(K, generator) -> (x0, labels)``. ``kind="samples"``: samples of
    the model at ``guidance`` (50-step DPM-Solver++, labels cycling over the classes when guided), as the paper
    does for guided EMS. Labels are None for unguided EMS (``guidance == 1``) unless ``labelled`` (then samples are
    class-conditional at every guidance, labels cycling over the classes).
    """
    gen = torch.Generator().manual_seed(_seed(seed, 7))
    k = int(num_datapoints)
    if k < 2:
        raise ValueError(f"num_datapoints must be >= 2, got {k}.")
    if kind == "data":
        provider = named_model.extra.get("datapoints") if isinstance(named_model.extra, dict) else None
        if provider is not None:
            x0, labels = provider(k, gen)
        elif hasattr(named_model.model, "denoiser"):
            den = named_model.model.denoiser
            total = den.num_points
            idx = torch.cat([torch.randperm(total, generator=gen) for _ in range(math.ceil(k / total))])[:k]
            x0 = den.data[idx.to(den.data.device)]
            # the mixture's data distribution: a point plus N(0, s0^2) (bare points would make pixels that are
            # constant in the data set constant in x0, unlike the model's distribution)
            noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
            x0 = x0 + den.component_std * noise.to(device=x0.device, dtype=x0.dtype)
            labels = den.labels[idx.to(den.data.device)] if den.labels is not None else None
        else:
            raise ValueError(f"model {named_model.name} has no data set registered for EMS; use datapoints='samples' "
                             "(--datapoints samples).")
    elif kind == "samples":
        x0, labels = _model_samples(named_model, k, guidance, gen, device, progress, labelled=labelled)
    else:
        raise ValueError(f"datapoints={kind!r} must be 'data' or 'samples'.")
    if guidance == 1.0 and not labelled:
        labels = None
    return x0.to(device=device, dtype=named_model.dtype), (None if labels is None else labels.to(device))


def _model_samples(named_model, k: int, guidance: float, gen: torch.Generator, device, progress: bool,
                   steps: int = 50, batch: int = 512, labelled: bool = False) -> tuple[Tensor, Tensor | None]:
    from tqdm.auto import tqdm

    from . import make_scheduler

    labels = torch.arange(k) % len(named_model.class_names) if guidance != 1.0 or labelled else None
    x_T = torch.randn((k, *named_model.sample_shape), generator=gen, dtype=named_model.dtype)
    out = []
    for start in tqdm(range(0, k, batch), desc="datapoints (samples)", disable=not progress):
        sched = make_scheduler("dpm-solver++", named_model.scheduler_config)
        sched.set_timesteps(steps, device=device)
        x = x_T[start:start + batch].to(device) * sched.init_noise_sigma
        lab = None if labels is None else labels[start:start + batch].to(device)
        for t in sched.timesteps:
            with torch.no_grad():
                x = sched.step(named_model.predict(sched.scale_model_input(x, t), t, lab, guidance), t, x).prev_sample
        out.append(x)
    return torch.cat(out), labels


def model_trajectories(named_model, num_datapoints: int, lambdas: Tensor, guidance: float = 1.0, seed: int = 0,
                       device: str | torch.device = "cpu", progress: bool = True, substeps: int = 2,
                       batch: int = 256) -> tuple[Tensor, Tensor | None]:
    """(states, labels): K solutions of the model's ODE at ``guidance`` (the one the sampler integrates), recorded
    at every lambda of the EMS grid: states [N + 1, K, C, H, W] in the model's dtype, from x ~ N(0, I) at
    lambda_T.

    Each grid cell is split into ``substeps`` equal lambda steps of DPM-Solver++(2M) (data prediction,
    exponential integrator in lambda; Lu et al. 2022, Alg. 2), evaluated at continuous model times. Labels cycle
    over the classes when guided, as for ``kind="samples"`` in :func:`model_datapoints`.
    """
    from tqdm.auto import tqdm

    if substeps < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}.")
    k = int(num_datapoints)
    if k < 2:
        raise ValueError(f"num_datapoints must be >= 2, got {k}.")
    sched = Schedule.from_config(named_model.scheduler_config)
    eps_fn = model_eps_fn(named_model, guidance)
    gen = torch.Generator().manual_seed(_seed(seed, 8))
    labels = torch.arange(k) % len(named_model.class_names) if guidance != 1.0 else None
    lam = lambdas.double()
    fine = torch.cat([torch.linspace(float(lam[i]), float(lam[i + 1]), substeps + 1, dtype=torch.float64)[:-1]
                      for i in range(len(lam) - 1)] + [lam[-1:]]).tolist()
    dtype = named_model.dtype
    x_all = torch.randn((k, *named_model.sample_shape), generator=gen, dtype=torch.float64)
    states = torch.empty((len(lam), k, *named_model.sample_shape), dtype=dtype)
    bar = tqdm(total=math.ceil(k / batch) * (len(fine) - 1), desc="trajectories", disable=not progress, unit="step")
    for start in range(0, k, batch):
        rows = slice(start, min(start + batch, k))
        x = x_all[rows].to(device)
        lab = None if labels is None else labels[rows].to(device)
        states[0, rows] = x.to("cpu", dtype)
        x0_prev, h_prev = None, None
        for i in range(len(fine) - 1):
            (a_s, s_s), (a_t, s_t) = sched.alpha_sigma(fine[i]), sched.alpha_sigma(fine[i + 1])
            h = fine[i + 1] - fine[i]
            tt = torch.full((x.shape[0],), sched.time(fine[i]), dtype=dtype, device=device)
            with torch.no_grad():
                eps = eps_fn(x.to(dtype), tt, lab).double()
            x0 = (x - s_s * eps) / a_s
            d = x0 if x0_prev is None else x0 + h / (2 * h_prev) * (x0 - x0_prev)
            x = (s_t / s_s) * x - a_t * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
            if (i + 1) % substeps == 0:
                states[(i + 1) // substeps, rows] = x.to("cpu", dtype)
            bar.update(1)
    bar.close()
    return states, labels


def compute_model_ems(named_model, num_datapoints: int, num_points: int, *, guidance: float = 1.0,
                      datapoints: str = "data", out: str | Path | None = None, seed: int = 0,
                      device: str | torch.device = "cpu", num_probes: int = 1, batch_size: int = 256,
                      progress: bool = True, network: str = "guided", derivatives: str = "jvp",
                      fd_lambda_step: float | None = None) -> EMS:
    """EMS of a :class:`~diffalign.models.registry.NamedModel` (what ``diffalign ems compute`` runs).

    For guided EMS (``guidance != 1``), ``network="guided"`` differentiates the classifier-free-guided eps that
    the sampler integrates; ``network="unconditional"`` differentiates the unconditional eps at the same
    datapoints (the paper's choice for Stable Diffusion, App. J.2; half the cost).
    ``datapoints``: ``"data"`` / ``"samples"`` (forward-noised, :func:`model_datapoints`) or ``"trajectories"``
    (states along the ODE itself, :func:`model_trajectories`).
    """
    if datapoints not in ("data", "samples", "trajectories"):
        raise ValueError(f"datapoints={datapoints!r} must be 'data', 'samples' or 'trajectories'.")
    if network not in ("guided", "unconditional"):
        raise ValueError(f"network must be 'guided' or 'unconditional', got {network!r}.")
    trajectories, meta = None, {"model": named_model.name, "guidance": float(guidance), "datapoints": datapoints}
    if datapoints == "trajectories":
        trajectories, labels, meta["trajectory_seconds"] = _cached_trajectories(
            named_model, num_datapoints, num_points, guidance, seed, device, progress, out)
        x0 = trajectories[-1].to(device)
        labels = None if labels is None else labels.to(device)
    else:
        x0, labels = model_datapoints(named_model, num_datapoints, datapoints, guidance, seed, device, progress)
    if network == "unconditional" and guidance != 1.0:
        meta["network"] = network
        labels, guidance = None, 1.0
    ems = compute_ems(model_eps_fn(named_model, guidance), x0, named_model.scheduler_config, num_points,
                      labels=labels, num_probes=num_probes, batch_size=batch_size, seed=seed, out=out, meta=meta,
                      derivatives=derivatives, fd_lambda_step=fd_lambda_step, trajectories=trajectories,
                      progress=progress)
    if out is not None:
        (Path(out) / TRAJECTORY_FILE).unlink(missing_ok=True)
    return ems


TRAJECTORY_FILE = "trajectories.safetensors"


def _cached_trajectories(named_model, k: int, n: int, guidance: float, seed: int, device, progress: bool,
                         out: str | Path | None) -> tuple[Tensor, Tensor | None, float]:
    """(states, labels, seconds to compute them) of :func:`model_trajectories` on the EMS grid, saved next to the
    partial sums so that a resumed computation reuses them (removed with them once the EMS are written)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    key = json.dumps({"model": named_model.name, "k": k, "n": n, "guidance": float(guidance), "seed": seed})
    file = Path(out) / TRAJECTORY_FILE if out is not None else None
    if file is not None and file.is_file():
        with safe_open(str(file), "pt") as fh:
            info = _file_meta(fh)
        if info.get("key") == key:
            saved = load_file(str(file))
            return saved["states"], saved.get("labels"), float(info["seconds"])
    t0 = time.perf_counter()
    states, labels = model_trajectories(named_model, k, ems_lambdas(named_model.scheduler_config, n), guidance,
                                        seed, device, progress)
    seconds = round(time.perf_counter() - t0, 3)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"states": states.contiguous()} | ({} if labels is None else {"labels": labels.contiguous()})
        save_file(tensors, str(file), metadata={META_KEY: json.dumps({"key": key, "seconds": seconds})})
    return states, labels, seconds

"""DC-Solver (Zhao et al., ECCV 2024, arXiv 2409.03755): UniPC with dynamic compensation.

UniPC's corrector moves x_i to x_i^c, but the buffered output m_i was evaluated at the uncorrected x_i
("misalignment"). Dynamic compensation replaces the buffered m_i, right after it joins the history (after the
corrector of step i, before the predictor of step i), by the Lagrange interpolation through the last
``dc_order + 1`` buffered outputs, evaluated at a time between t_{i-1} and t_i:

    t' = t_{i-1} + rho_i (t_i - t_{i-1}),   m_i <- sum_k prod_{l != k} (t' - t_{i-l}) / (t_{i-k} - t_{i-l}) m_{i-k}

(k, l = 0..dc_order). As in the official code (wl-zhao/DC-Solver, ``dynamic_compensation`` of the diffusers
scheduler): the interpolated quantity is the converted model output the solver integrates (x0 with
``predict_x0``), the variable is the model timestep (the integer timestep on diffusers' default grids), the
earlier points are the already compensated buffered outputs, and the compensated output is used by this step's
predictor, the next step's corrector and later steps as history. rho_i = 1 gives weights (1, 0, ..., 0): the
sampler is then exactly UniPC. Steps i < dc_order have too few outputs and are never compensated (the official
search fixes the first two ratios to 1).

Ratios, one per step, come from a JSON file (``dc_ratios_path``; see :func:`load_dc_ratios`) written by
``diffalign calibrate dc-solver`` (:mod:`diffalign.samplers.calibrate`), or are predicted for any (NFE, guidance)
by a cascade polynomial regression (``cpr_path``, :func:`cpr_predict`). ``use_corrector=False`` applies dynamic
compensation to the predictor alone (the paper's predictor-only variant).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .base import schedule_config
from .unipc import UniPCScheduler

RATIOS_FORMAT = "diffalign-dc-ratios"
CPR_FORMAT = "diffalign-dc-cpr"
CPR_SHAPE = (4, 3, 3)
"""CPR coefficients c[i, j, k]: rho(step) = sum_i a_i x^i, a_i = sum_j (g/12)^(2-j) c1[i, j],
c1[i, j] = sum_k (nfe/50)^(2-k) c[i, j, k], x = step / nfe (step 1-based), as the official ``sd2.1.npy``."""
CONFIG_KEYS = ("solver_order", "solver_type", "predict_x0", "lower_order_final", "use_corrector", "dc_order",
               "timestep_spacing", "use_lu_lambdas", "use_karras_sigmas", "use_exponential_sigmas",
               "use_beta_sigmas", "use_flow_sigmas", "final_sigmas_type")
"""Config entries a ratio set depends on; a ratio file records them and loading checks them."""


def lagrange_weights(times: Sequence[float], t_query: float | torch.Tensor) -> list:
    """Lagrange basis weights of the points ``times`` at ``t_query`` (a float, or a tensor to differentiate)."""
    weights = []
    for k, t_k in enumerate(times):
        w = 1.0
        for j, t_j in enumerate(times):
            if j != k:
                w = w * (t_query - t_j) / (t_k - t_j)
        weights.append(w)
    return weights


def dynamic_compensation(outputs: Sequence[torch.Tensor], times: Sequence[float], rho: float | torch.Tensor,
                         dc_order: int) -> torch.Tensor:
    """The compensated last output: Lagrange interpolation of ``outputs[-1 - k]`` (at ``times[-1 - k]``),
    k = 0..dc_order, at t' = times[-2] + rho (times[-1] - times[-2]). Differentiable in a tensor ``rho``."""
    n = min(dc_order + 1, len(outputs), len(times))
    if n < 2:
        return outputs[-1]
    pts = [float(t) for t in times[-n:]]
    t_query = pts[-2] + rho * (pts[-1] - pts[-2])
    weights = lagrange_weights(pts, t_query)
    out = outputs[-n] * weights[0]
    for w, m in zip(weights[1:], outputs[-n + 1:], strict=True):
        out = out + w * m
    return out


# ---------------------------------------------------------------------------------------------------- files
def ratio_entries(path: str | Path) -> tuple[list[dict], dict]:
    """(entries, header) of a ratio file: a JSON list of ratios (the official format) or a
    ``{"format": "diffalign-dc-ratios", "entries": [{"nfe", "guidance", "ratios", "config"}, ...]}`` table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DC-Solver ratio file {str(path)!r} does not exist; write one with "
                                "`diffalign calibrate dc-solver --out ...` or leave dc_ratios_path unset.")
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return [{"nfe": len(data), "guidance": None, "ratios": [float(r) for r in data]}], {}
    if not isinstance(data, dict) or data.get("format") != RATIOS_FORMAT or "entries" not in data:
        raise ValueError(f"{str(path)!r} is not a DC-Solver ratio file (a JSON list, or a {RATIOS_FORMAT!r} table).")
    return data["entries"], {k: v for k, v in data.items() if k != "entries"}


def load_dc_ratios(path: str | Path, num_steps: int, guidance: float | None = None) -> dict:
    """The ratio entry of ``path`` for ``num_steps`` steps and guidance scale ``guidance``.

    Raises a ValueError that names the available (steps, guidance) pairs when none matches.
    """
    entries, _ = ratio_entries(path)
    same_steps = [e for e in entries if int(e["nfe"]) == num_steps]
    for e in same_steps:
        if e.get("guidance") is None or guidance is None or abs(float(e["guidance"]) - float(guidance)) < 1e-9:
            if len(e["ratios"]) != num_steps:
                raise ValueError(f"{str(path)!r}: an entry for {num_steps} steps has {len(e['ratios'])} ratios.")
            return e
    have = ", ".join(f"{e['nfe']} steps" + ("" if e.get("guidance") is None else f" / guidance {e['guidance']}")
                     for e in entries)
    want = f"{num_steps} steps" + ("" if guidance is None else f" / guidance {guidance}")
    raise ValueError(f"DC-Solver ratio file {str(path)!r} has ratios for {have}, not for {want}; calibrate this "
                     "configuration (`diffalign calibrate dc-solver`) or set cpr_path to predict ratios.")


def cpr_features(nfe: int, guidance: float, steps: Sequence[int]) -> np.ndarray:
    """Design matrix of the cascade polynomial regression: one row per 1-based ``step``, 36 columns (c[i, j, k])."""
    x = np.asarray(steps, dtype=np.float64) / nfe
    g, n = guidance / 12.0, nfe / 50.0
    cols = [x**i * g ** (2 - j) * n ** (2 - k) for i in range(4) for j in range(3) for k in range(3)]
    return np.stack(cols, axis=1)


def load_cpr(path: str | Path) -> tuple[np.ndarray, int]:
    """(36 CPR coefficients, number of leading steps fixed to 1) from a ``.json`` written by
    ``diffalign calibrate cpr`` or an official ``.npy`` (36 floats, first 2 steps fixed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CPR file {str(path)!r} does not exist; fit one with `diffalign calibrate cpr`.")
    if path.suffix == ".npy":
        coeffs, fixed = np.load(path).astype(np.float64).ravel(), 2
    else:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != CPR_FORMAT:
            raise ValueError(f"{str(path)!r} is not a CPR file (format {CPR_FORMAT!r} or an official .npy).")
        coeffs, fixed = np.asarray(data["coeffs"], dtype=np.float64).ravel(), int(data.get("fixed_steps", 2))
    if coeffs.size != np.prod(CPR_SHAPE):
        raise ValueError(f"{str(path)!r} has {coeffs.size} CPR coefficients, expected {np.prod(CPR_SHAPE)}.")
    return coeffs, fixed


def cpr_configs(path: str | Path) -> list[tuple[int, float]]:
    """The (NFE, guidance) configurations a CPR ``.json`` was fitted on (empty for an official ``.npy``)."""
    path = Path(path)
    if path.suffix == ".npy":
        return []
    return [(int(n), float(g)) for n, g in json.loads(path.read_text()).get("configs", [])]


def _within(configs: list[tuple[int, float]], nfe: int, guidance: float | None) -> bool:
    nfes, scales = [n for n, _ in configs], [g for _, g in configs]
    g = 1.0 if guidance is None else float(guidance)
    return min(nfes) <= nfe <= max(nfes) and min(scales) - 1e-9 <= g <= max(scales) + 1e-9


def cpr_predict(coeffs: np.ndarray, nfe: int, guidance: float, fixed_steps: int = 2) -> list[float]:
    """Ratios for ``nfe`` steps at guidance ``guidance`` from CPR coefficients (the first ``fixed_steps`` are 1)."""
    if nfe <= fixed_steps:
        raise ValueError(f"NFE {nfe} is too small for DC-Solver: the first {fixed_steps} steps are never "
                         "compensated; use more steps.")
    steps = list(range(fixed_steps + 1, nfe + 1))
    pred = cpr_features(nfe, guidance, steps) @ np.asarray(coeffs, dtype=np.float64)
    return [1.0] * fixed_steps + [float(r) for r in pred]


class DCSolverScheduler(UniPCScheduler):
    """DC-Solver: UniPC whose buffered outputs are dynamically compensated (one ratio per step).

    Args:
        dc_order: degree of the Lagrange interpolation (``dc_order + 1`` points; the paper's K, best at 2).
        dc_ratios_path: JSON ratio file (one list, or a table with an entry per steps/guidance scale).
        cpr_path: cascade-polynomial-regression coefficients (``.json`` or the official ``.npy``); used when
            ``dc_ratios_path`` is unset or has no entry for this configuration.
        guidance_scale: the classifier-free guidance scale sampled with (selects ratios / feeds the CPR).
        cpr_nfe: NFE fed to the CPR (default: the number of steps of ``set_timesteps``).
        dc_ratios: explicit ratios (overrides the files; mostly for tests and calibration).
        UniPC's arguments (``solver_order``, ``solver_type``, ``predict_x0``, ``lower_order_final``,
        ``disable_corrector``, ``use_corrector``) and the shared schedule parameters.

    Without ratio data every ratio is 1 and the sampler equals ``UniPCScheduler`` with the same config.
    """

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
        dc_order: int = 2,
        dc_ratios_path: str | None = None,
        cpr_path: str | None = None,
        guidance_scale: float = 1.0,
        cpr_nfe: int | None = None,
        dc_ratios: list[float] | None = None,
        **schedule,
    ):
        if not isinstance(dc_order, int) or dc_order < 1:
            raise ValueError(f"dc_order must be an integer >= 1, got {dc_order!r}.")
        for name, p in (("dc_ratios_path", dc_ratios_path), ("cpr_path", cpr_path)):
            if p is not None and not Path(p).is_file():
                raise FileNotFoundError(f"{name}={str(p)!r} does not exist.")
        UniPCScheduler.__init__.__wrapped__(
            self, solver_order=solver_order, predict_x0=predict_x0, solver_type=solver_type,
            lower_order_final=lower_order_final, disable_corrector=disable_corrector, use_corrector=use_corrector)
        self.dc_ratios_list: list = []

    def _history_size(self) -> int:
        return max(self.config.solver_order, self.config.dc_order + 1)

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None, sigmas=None) -> None:
        super().set_timesteps(num_inference_steps, device, mu, timesteps, sigmas)
        c = self.config
        if self._searched and c.dc_ratios is None and (c.dc_ratios_path or c.cpr_path):
            raise ValueError("DC-Solver's calibrated ratios (dc_ratios_path / cpr_path) belong to the default grid, "
                             "not to a searched one (timesteps_path); drop one of them, or calibrate ratios on the "
                             "searched grid and pass them as dc_ratios.")
        self.dc_ratios_list = self.resolve_ratios(len(self.timesteps))

    def resolve_ratios(self, num_steps: int) -> list[float]:
        """The ratios for ``num_steps`` steps: explicit ``dc_ratios``, else the ratio file, else the CPR, else 1."""
        c = self.config
        if c.dc_ratios is not None:
            ratios = [float(r) for r in c.dc_ratios]
            if len(ratios) != num_steps:
                raise ValueError(f"dc_ratios has {len(ratios)} ratios but the sampler runs {num_steps} steps.")
            return ratios
        if c.dc_ratios_path is None and c.cpr_path is None:
            return [1.0] * num_steps
        if num_steps <= c.dc_order:
            raise ValueError(f"NFE {num_steps} is too small for DC-Solver with dc_order={c.dc_order}: at least "
                             f"{c.dc_order + 1} steps are needed to compensate one; use more steps.")
        if c.dc_ratios_path is not None:
            try:
                entry = load_dc_ratios(c.dc_ratios_path, num_steps, c.guidance_scale)
            except ValueError:
                if c.cpr_path is None:
                    raise
            else:
                self._check_entry_config(entry)
                return [float(r) for r in entry["ratios"]]
        coeffs, fixed = load_cpr(c.cpr_path)
        nfe = c.cpr_nfe or num_steps
        configs = cpr_configs(c.cpr_path)
        if configs and not _within(configs, nfe, c.guidance_scale):
            warnings.warn(f"the CPR in {c.cpr_path!r} was fitted on NFE {min(n for n, _ in configs)}-"
                          f"{max(n for n, _ in configs)} and guidance {min(g for _, g in configs)}-"
                          f"{max(g for _, g in configs)}; it does not extrapolate to NFE {nfe}, guidance "
                          f"{c.guidance_scale}: DC-Solver runs uncompensated (= UniPC). Calibrate this configuration "
                          "with `diffalign calibrate dc-solver`.", stacklevel=2)
            return [1.0] * num_steps
        return cpr_predict(coeffs, nfe, c.guidance_scale, fixed)[:num_steps]

    def _check_entry_config(self, entry: dict) -> None:
        saved = entry.get("config") or {}
        for key in CONFIG_KEYS:
            if key in saved and key in self.config and saved[key] != self.config[key]:
                raise ValueError(f"the DC-Solver ratios in {self.config.dc_ratios_path!r} were calibrated with "
                                 f"{key}={saved[key]!r}, but this scheduler has {key}={self.config[key]!r}; "
                                 "calibrate for this configuration.")

    def _after_push(self) -> None:
        """Dynamic compensation of the output just buffered (its ratio is rho_i of the current step)."""
        i = self.step_index
        rho = self.dc_ratios_list[i] if i < len(self.dc_ratios_list) else 1.0
        if isinstance(rho, float) and rho == 1.0:
            return
        k = min(len(self.model_outputs), self.config.dc_order + 1)
        if k < self.config.dc_order + 1:
            return  # warm-up: too few outputs to interpolate (the ratio of these steps is 1)
        times = self.host_timesteps()[i - k + 1:i + 1]
        self.model_outputs[-1] = dynamic_compensation(self.model_outputs[-k:], times, rho, self.config.dc_order)

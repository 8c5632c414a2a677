"""Offline calibration of DC-Solver: the per-step compensation ratios, and the cascade polynomial regression.

Ratio search (DC-Solver, Sec. 3.3; official ``find_optim_ratio``): along the trajectory of ``num_datapoints``
noises, greedily for each step i >= dc_order, rho_i is optimised with AdamW (lr 0.1, 40 iterations in the LDM
code) to minimise the MSE between the sample after step i's predictor and step i + 1's corrector (which needs one
model evaluation at the predicted sample) and the ground truth at grid point i + 1 (after the last step: the
final sample). The first dc_order ratios stay 1. ``bound="tanh"`` keeps rho in 1 +- 0.5.

The search replays the scheduler itself: :class:`~diffalign.samplers.dc_solver.DCSolverScheduler` takes a tensor
ratio, its dynamic compensation (:func:`~diffalign.samplers.dc_solver.dynamic_compensation`) and its UniPC update
are then differentiable in rho, so no update math is duplicated here and ``step()`` never needs the model. One
deviation from the official diffusers script, whose second-to-last step is compared with the *final* ground
truth: every step is compared with the ground truth at its own next grid point.

Ground truth: for closed-form reference models the exact probability-flow solution at every grid sigma
(:func:`~diffalign.models.reference.solve_reference`); otherwise a fine DDIM trajectory (200 steps in total,
uniform in log-SNR inside each interval; the official scripts use 200-step DDIM).

Cascade polynomial regression (CPR): rho(step) = sum_i a_i x^i, x = step / NFE, each a_i quadratic in
guidance / 12 whose coefficients are quadratic in NFE / 50 (36 coefficients; the official ``sd2.1.npy`` layout).
The model is linear in the coefficients, so it is fitted by linear least squares (scipy; minimum-norm when the
calibrated configurations do not determine all 36).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .base import SCHEDULE_DEFAULTS
from .dc_solver import CONFIG_KEYS, CPR_FORMAT, RATIOS_FORMAT, DCSolverScheduler, cpr_features, ratio_entries

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BOUNDS = ("none", "tanh")


@dataclass
class DCCalibration:
    """Result of :func:`calibrate_dc_ratios`: ratios and, per step, the loss at rho = 1 and at the found rho."""

    ratios: list[float]
    loss_initial: list[float] = field(default_factory=list)
    loss_final: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def entry(self, nfe: int, guidance: float, config: dict, **extra) -> dict:
        """The JSON entry of a ratio file."""
        return {"nfe": nfe, "guidance": guidance, "ratios": self.ratios, "loss_initial": self.loss_initial,
                "loss_final": self.loss_final, "seconds": round(self.seconds, 3),
                "config": {k: config[k] for k in CONFIG_KEYS if k in config}, **extra}


# ------------------------------------------------------------------------------------------------ ground truth
def exact_trajectory(reference_model, scheduler, x_T: torch.Tensor, class_labels=None, guidance_scale: float = 1.0,
                     tol: float = 1e-10) -> list[torch.Tensor]:
    """Exact states of a closed-form reference model at every grid point of ``scheduler`` (``[0]`` is ``x_T``),
    solved interval by interval with relative and absolute tolerance ``tol``."""
    from ..models.reference import solve_reference

    hats = [lvl.sigma / lvl.alpha for lvl in scheduler.noise_levels]
    states = [x_T]
    for a, b in zip(hats[:-1], hats[1:], strict=True):
        states.append(solve_reference(reference_model, states[-1], a, b, class_labels, guidance_scale, tol, tol))
    return states


@torch.no_grad()
def ddim_trajectory(model_fn: ModelFn, scheduler, x_T: torch.Tensor, total_steps: int = 200) -> list[torch.Tensor]:
    """States at every grid point of ``scheduler`` from a fine DDIM solve (``total_steps`` evaluations, spread
    uniformly in log-SNR inside each interval; the last interval to sigma = 0 spans 5 units of log-SNR, then
    denoises)."""
    from .ddim import DDIMScheduler

    levels = scheduler.noise_levels
    sub = max(1, math.ceil(total_steps / (len(levels) - 1)))
    flow = bool(scheduler.config.use_flow_sigmas)
    to_sigma = (lambda lam: 1.0 / (1.0 + math.exp(lam))) if flow else (lambda lam: math.exp(-lam))
    fine, marks = [float(scheduler.sigmas[0])], [0]
    for a, b in zip(levels[:-1], levels[1:], strict=True):
        end = b.lambda_ if math.isfinite(b.lambda_) else a.lambda_ + 5.0
        fine += [to_sigma(a.lambda_ + (end - a.lambda_) * k / sub) for k in range(1, sub + 1)]
        if not math.isfinite(b.lambda_):
            fine.append(0.0)
        marks.append(len(fine) - 1)
    ddim = DDIMScheduler(**{k: v for k, v in scheduler.config.items() if k in SCHEDULE_DEFAULTS})
    ddim.sigmas = torch.tensor(fine, dtype=torch.float64)
    ddim.timesteps = ddim._continuous_timesteps(ddim.sigmas[:-1])
    ddim.num_inference_steps = len(ddim.timesteps)
    ddim._levels = [ddim._noise_level(s) for s in fine]
    ddim._reset_state()
    x, states = x_T, {0: x_T}
    for k, t in enumerate(ddim.timesteps):
        x = ddim.step(model_fn(x, t), t, x).prev_sample
        states[k + 1] = x
    return [states[m] for m in marks]


# ------------------------------------------------------------------------------------------------ ratio search
def _snapshot(obj) -> dict:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(obj).items()}


def _restore(obj, snap: dict) -> None:
    vars(obj).update({k: (list(v) if isinstance(v, list) else v) for k, v in snap.items()})


def calibrate_dc_ratios(scheduler: DCSolverScheduler, model_fn: ModelFn, x_T: torch.Tensor, num_inference_steps: int,
                        ground_truth: Sequence[torch.Tensor], iters: int = 40, lr: float = 0.1, bound: str = "none",
                        progress: bool = False, sigmas: Sequence[float] | None = None) -> DCCalibration:
    """Search DC-Solver's ratios for ``scheduler`` (its config, ``num_inference_steps``) on the noises ``x_T``.

    ``model_fn(x, t)`` returns the raw model output (the scheduler's prediction type, guidance applied) and must
    be differentiable in x; ``ground_truth[k]`` is the exact state at grid point k (``k = 0..steps``). ``sigmas``
    (the grid's, without the final 0) calibrates on that grid instead of the ``num_inference_steps`` default one;
    ``x_T`` is then the state at its first sigma.
    """
    if not isinstance(scheduler, DCSolverScheduler):
        raise ValueError(f"calibration needs a DCSolverScheduler, got {type(scheduler).__name__}.")
    if bound not in BOUNDS:
        raise ValueError(f"bound={bound!r} is not one of {BOUNDS}.")
    if iters < 1 or not lr > 0:
        raise ValueError(f"iters must be >= 1 and lr > 0, got iters={iters}, lr={lr}.")
    k0 = scheduler.config.dc_order
    t_start = time.perf_counter()
    sched = scheduler
    if sigmas is None:
        sched.set_timesteps(num_inference_steps, device=x_T.device)
    else:
        sched.set_timesteps(sigmas=list(sigmas), device=x_T.device)
    n = len(sched.timesteps)
    if n <= k0:
        raise ValueError(f"NFE {n} is too small to calibrate DC-Solver with dc_order={k0}: the first {k0} steps are "
                         f"never compensated; use at least {k0 + 1} steps.")
    if len(ground_truth) != n + 1:
        raise ValueError(f"ground_truth has {len(ground_truth)} states; the grid has {n + 1} points.")
    sched.dc_ratios_list = [1.0] * n
    result = DCCalibration(ratios=[1.0] * n)
    to_rho = (lambda p: 1.0 + 0.5 * torch.tanh(p)) if bound == "tanh" else (lambda p: p)
    x = x_T
    for i, t in enumerate(tqdm(sched.timesteps, desc="calibrate", disable=not progress)):
        with torch.no_grad():
            out = model_fn(x, t)
        if i >= k0:
            snap, target = _snapshot(sched), ground_truth[i + 1]

            def loss_of(rho, snap=snap, out=out, target=target, i=i, t=t, x=x):
                _restore(sched, snap)
                sched.dc_ratios_list[i] = rho
                x_next = sched.step(out, t, x).prev_sample
                if i + 1 < n and sched._corrects(i + 1):  # the next corrector, at one model evaluation
                    sched.step(model_fn(x_next, sched.timesteps[i + 1]), sched.timesteps[i + 1], x_next)
                    x_next = sched._last_sample
                return torch.mean((x_next - target) ** 2)

            param = torch.tensor(0.0 if bound == "tanh" else 1.0, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.AdamW([param], lr=lr)
            for it in range(iters):
                opt.zero_grad()
                loss = loss_of(to_rho(param))
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(
                        f"the calibration loss is {float(loss.detach())} at step {i} (iteration {it}, rho = "
                        f"{float(to_rho(param.detach())):.4g}); try --bound tanh or a smaller --lr.")
                if it == 0:
                    result.loss_initial.append(float(loss.detach()))
                loss.backward()
                opt.step()
            rho = float(to_rho(param.detach()))
            if not math.isfinite(rho):
                raise FloatingPointError(f"the calibrated ratio of step {i} is {rho}; try --bound tanh.")
            with torch.no_grad():
                result.loss_final.append(float(loss_of(rho)))
            _restore(sched, snap)
            sched.dc_ratios_list[i] = result.ratios[i] = rho
        with torch.no_grad():
            x = sched.step(out, t, x).prev_sample
    result.seconds = time.perf_counter() - t_start
    return result


def write_ratio_entry(path: str | Path, entry: dict, model: str | None = None) -> Path:
    """Add ``entry`` to the ratio table at ``path`` (replacing one with the same steps and guidance)."""
    path = Path(path)
    entries, header = ratio_entries(path) if path.is_file() else ([], {})
    if path.is_file() and not header:
        raise ValueError(f"{str(path)!r} holds a plain ratio list; write to a new file.")
    same = lambda e: int(e["nfe"]) == int(entry["nfe"]) and e.get("guidance") == entry.get("guidance")  # noqa: E731
    entries = [e for e in entries if not same(e)] + [entry]
    entries.sort(key=lambda e: (float(e.get("guidance") or 0.0), int(e["nfe"])))
    data = {"format": RATIOS_FORMAT, "sampler": "dc-solver", **({"model": model} if model else {}),
            **{k: v for k, v in header.items() if k not in ("format", "sampler", "model")}, "entries": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ CPR
def fit_cpr(entries: Sequence[dict], fixed_steps: int = 2) -> dict:
    """Fit the 36 CPR coefficients to calibrated ratio entries (``{"nfe", "guidance", "ratios"}``).

    Returns the CPR file content: ``format``, ``coeffs``, ``fixed_steps``, ``rank``, ``max_abs_residual`` and the
    (nfe, guidance) configurations used.
    """
    from scipy.linalg import lstsq

    rows, targets, used = [], [], []
    for e in entries:
        if e.get("guidance") is None:
            raise ValueError("CPR needs the guidance scale of every ratio entry; this one has none (a plain list).")
        nfe, g, ratios = int(e["nfe"]), float(e["guidance"]), [float(r) for r in e["ratios"]]
        if len(ratios) != nfe:
            raise ValueError(f"an entry for NFE {nfe} has {len(ratios)} ratios.")
        if nfe <= fixed_steps:
            raise ValueError(f"NFE {nfe} is too small for CPR: its first {fixed_steps} ratios are fixed to 1.")
        steps = list(range(fixed_steps + 1, nfe + 1))
        rows.append(cpr_features(nfe, g, steps))
        targets.append(np.asarray(ratios[fixed_steps:]))
        used.append([nfe, g])
    if not rows:
        raise ValueError("no calibrated ratio entries to fit.")
    A, y = np.concatenate(rows), np.concatenate(targets)
    coeffs, _, rank, _ = lstsq(A, y, lapack_driver="gelsd")
    residual = float(np.max(np.abs(A @ coeffs - y)))
    return {"format": CPR_FORMAT, "coeffs": coeffs.tolist(), "fixed_steps": fixed_steps, "rank": int(rank),
            "num_points": int(len(y)), "max_abs_residual": residual, "configs": used}


def fit_cpr_files(inputs: Sequence[str | Path], out: str | Path, fixed_steps: int = 2) -> dict:
    """Fit a CPR to the entries of ratio files ``inputs`` and write it to ``out`` (JSON)."""
    entries = [e for p in inputs for e in ratio_entries(p)[0]]
    cpr = fit_cpr(entries, fixed_steps)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cpr, indent=1) + "\n")
    return cpr


# ------------------------------------------------------------------------------------------------ named models
def calibrate_dc_solver_model(named, num_inference_steps: int, guidance: float = 1.0, num_datapoints: int = 10,
                              seed: int = 1, iters: int = 40, lr: float = 0.1, bound: str = "none",
                              scheduler_overrides: dict | None = None, device: str | torch.device = "cpu",
                              progress: bool = True) -> dict:
    """Calibrate DC-Solver for a :class:`~diffalign.models.registry.NamedModel`; returns the ratio-file entry.

    The noises come from ``seed`` (keep it different from the benchmark's); with ``guidance != 1`` the labels
    cycle through the classes and the model is classifier-free guided, otherwise sampling is unconditional (the
    conventions of :func:`diffalign.eval.sampler_bench.bench_samplers`).
    """
    from ..models.reference import ReferenceModel

    if num_datapoints < 1:
        raise ValueError(f"num_datapoints must be >= 1, got {num_datapoints}.")
    config = {**named.scheduler_config, **(scheduler_overrides or {}), "guidance_scale": float(guidance),
              "dc_ratios_path": None, "cpr_path": None, "dc_ratios": None}
    sched = DCSolverScheduler.from_config(config)
    if num_inference_steps <= sched.config.dc_order:
        raise ValueError(f"NFE {num_inference_steps} is too small to calibrate DC-Solver (dc_order="
                         f"{sched.config.dc_order}); use at least {sched.config.dc_order + 1} steps.")
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((num_datapoints, *named.sample_shape), generator=gen, dtype=torch.float64)
    x_T = x_T.to(device=device, dtype=named.dtype)
    labels = (torch.arange(num_datapoints) % len(named.class_names)).to(device) if guidance != 1.0 else None

    def model_fn(x, t):
        return named.predict(x, t, labels, guidance)

    sched.set_timesteps(num_inference_steps, device=device)
    if isinstance(named.model, ReferenceModel):
        truth, kind = exact_trajectory(named.model, sched, x_T, labels, guidance), "exact"
    else:
        truth, kind = ddim_trajectory(model_fn, sched, x_T), "ddim-200"
    result = calibrate_dc_ratios(sched, model_fn, x_T, num_inference_steps, truth, iters=iters, lr=lr, bound=bound,
                                 progress=progress)
    return result.entry(num_inference_steps, float(guidance), dict(sched.config), num_datapoints=num_datapoints,
                        seed=seed, iters=iters, lr=lr, bound=bound, ground_truth=kind)

"""Searched time steps: where a sampler's few steps should go for one model, guidance and step count.

The error of a few-step sampler depends as much on *where* the steps are as on how each is taken. A search
minimises the final-sample error against reference solutions (the benchmark's 500-step DPM-Solver++(3M), or the
closed form) from a few dozen noises kept apart from any benchmark's, over the grid points between the schedule's
first sigma (fixed: the sampler starts where the model's noise starts) and its least-noisy training sigma; the grid
ends at 0 as usual.

Parametrisation: the n - 1 free points of an n-step grid lie in log-SNR lambda at
    lambda_k = lambda_0 + (lambda_max - lambda_0) * (w_1 + ... + w_k),   w = softmax(u_1, ..., u_{n-1}, 0),
so every u gives a strictly increasing lambda (decreasing sigma) grid, and u = 0 is the logSNR-uniform grid.
Search (``method``):

* ``"powell"`` (default): scipy's Powell method from the best of the default, logSNR-uniform and Align Your Steps
  grids (:func:`ays_timesteps`), a local derivative-free search;
* ``"evolution"``: scipy's differential evolution over u in [-4, 4]^(n-1), a population seeded with those three
  grids; the evolutionary search of AutoDiffusion (Li et al. 2023), here over the step positions only.

Compared at equal budgets (``docs/samplers.md``), Powell reached the same optimum on the closed-form model in
two thirds of the time and a lower error on ``builtin:fashion`` in the same 3.7 minutes, hence the default.

A schedule file holds the search results of one (model, sampler, guidance), one entry per step count; a sampler
reads it through its ``timesteps_path`` config value. The file records the model's noise schedule, and a sampler
refuses a file made for another schedule or sampler.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FORMAT = "diffalign-timesteps-1"
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                 "rescale_betas_zero_snr", "use_flow_sigmas", "flow_shift")
"""The config values that define the noise schedule a searched grid belongs to."""
METHODS = ("evolution", "powell")


def registry_name(scheduler) -> str:
    """The registry name of a diffalign scheduler (``"dpm-solver++"``, ``"dualfast:unipc"``, ...)."""
    from . import SAMPLERS

    for name, cls in SAMPLERS.items():
        if type(scheduler) is cls:
            return name
    return type(scheduler).__name__


def schedule_fingerprint(config) -> dict:
    return {k: config.get(k) for k in SCHEDULE_KEYS}


def load_schedule_file(path: str | Path) -> dict:
    """A schedule file, checked for its format."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"timesteps_path {str(path)!r} does not exist; make one with `diffalign calibrate "
                                "timesteps`.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"timesteps_path {str(path)!r} is not a schedule file (invalid JSON: {err}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"timesteps_path {str(path)!r} is not a diffalign schedule file (format {FORMAT!r}).")
    return data


def searched_sigmas(scheduler, steps: int) -> list[float] | None:
    """The searched grid (sigmas, without the final one) of ``scheduler``'s ``timesteps_path`` for ``steps`` steps;
    None when the file has no entry for ``steps`` and ``timesteps_missing="default"``."""
    c = scheduler.config
    path = c.timesteps_path
    data = load_schedule_file(path)
    name = registry_name(scheduler)
    if data["sampler"] != name:
        raise ValueError(f"timesteps_path {path!r} was searched for sampler {data['sampler']!r}, not {name!r}; "
                         "search one for this sampler (`diffalign calibrate timesteps`).")
    mine, theirs = schedule_fingerprint(c), data["schedule"]
    differs = {k: (theirs.get(k), mine[k]) for k in SCHEDULE_KEYS if theirs.get(k) != mine[k]}
    if differs:
        detail = ", ".join(f"{k}: file {a!r}, scheduler {b!r}" for k, (a, b) in differs.items())
        raise ValueError(f"timesteps_path {path!r} was searched for model {data.get('model')!r} with another noise "
                         f"schedule ({detail}).")
    for entry in data["entries"]:
        if entry["steps"] == steps:
            sigmas = [float(s) for s in entry["sigmas"]]
            if len(sigmas) != steps or any(b >= a for a, b in zip(sigmas, sigmas[1:], strict=False)):
                raise ValueError(f"timesteps_path {path!r}: the {steps}-step entry must hold {steps} strictly "
                                 "decreasing sigmas.")
            return sigmas
    if c.timesteps_missing == "default":
        return None
    have = sorted(e["steps"] for e in data["entries"])
    raise ValueError(f"timesteps_path {path!r} has searched grids for {have} steps, not {steps}; use one of those, "
                     f"search {steps} (`diffalign calibrate timesteps --nfe ...`), or set timesteps_missing='default'.")


def write_entry(path: str | Path, model: str, sampler: str, guidance: float, schedule: dict, entry: dict) -> Path:
    """Add (or replace) the entry for ``entry["steps"]`` in the schedule file at ``path`` (written atomically)."""
    path = Path(path)
    data = {"format": FORMAT, "model": model, "sampler": sampler, "guidance": guidance, "schedule": schedule,
            "entries": []}
    if path.exists():
        old = load_schedule_file(path)
        if (old["model"], old["sampler"], float(old["guidance"]), old["schedule"]) != (model, sampler, guidance,
                                                                                       schedule):
            raise ValueError(f"{path} holds schedules of {old['model']} / {old['sampler']} at guidance "
                             f"{old['guidance']}; write to another file.")
        data["entries"] = [e for e in old["entries"] if e["steps"] != entry["steps"]]
    data["entries"] = sorted([*data["entries"], entry], key=lambda e: e["steps"])
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def ays_timesteps(num_steps: int, schedule: str = "StableDiffusionTimesteps") -> list[int]:
    """Align Your Steps' fixed 10-step timesteps (Sabour et al. 2024, as diffusers ships them in ``AysSchedules``),
    for ``num_steps`` steps by linear interpolation over the normalised step index (the paper's recipe for other
    step counts, applied to timesteps). A baseline: they were optimised for Stable Diffusion, not for your model."""
    from diffusers.schedulers.scheduling_utils import AysSchedules

    if schedule not in AysSchedules or not schedule.endswith("Timesteps"):
        raise ValueError(f"unknown AYS schedule {schedule!r}; choose one of "
                         f"{[k for k in AysSchedules if k.endswith('Timesteps')]}.")
    base = np.asarray(AysSchedules[schedule], dtype=np.float64)
    t = np.interp(np.linspace(0, 1, num_steps), np.linspace(0, 1, len(base)), base).round().astype(int)
    if len(np.unique(t)) != num_steps:
        raise ValueError(f"AYS timesteps for {num_steps} steps repeat; use at most 900 steps.")
    return t.tolist()


# ---------------------------------------------------------------------------------------------------- search
def lambdas_of(u: np.ndarray, lambda_0: float, lambda_max: float) -> np.ndarray:
    """The n grid lambdas of parameters u (n - 1 values; see the module docstring), lambda_0 first."""
    w = np.exp(np.append(u, 0.0) - np.max(np.append(u, 0.0)))
    w = w / w.sum()
    return lambda_0 + (lambda_max - lambda_0) * np.concatenate([[0.0], np.cumsum(w)[:-1]])


def params_of(lambdas: np.ndarray, lambda_0: float, lambda_max: float) -> np.ndarray:
    """The parameters u of a grid of lambdas (inverse of :func:`lambdas_of`; the last gap fills up to lambda_max)."""
    gaps = np.diff(np.append(lambdas, lambda_max)) / (lambda_max - lambda_0)
    gaps = np.clip(gaps, 1e-6, None)
    return np.log(gaps[:-1] / gaps[-1])


def cached_reference(path: str | Path | None, key: dict, x_T: torch.Tensor, compute) -> tuple[torch.Tensor, float]:
    """``compute()`` -> (x_ref, sigma_start), read from / written to the safetensors file ``path`` for ``key``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    meta = {"key": json.dumps(key, sort_keys=True)}
    if path is not None and Path(path).is_file():
        with safe_open(str(path), framework="pt") as f:  # one read: the header, then the tensors if it matches
            stored = f.metadata() or {}
            if stored.get("key") == meta["key"] and torch.equal(f.get_tensor("x_T"), x_T.cpu()):
                return f.get_tensor("x_ref").to(x_T.device), float(stored["sigma_start"])
    x_ref, sigma_start = compute()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        save_file({"x_T": x_T.cpu().contiguous(), "x_ref": x_ref.detach().cpu().contiguous()}, str(tmp),
                  metadata={**meta, "sigma_start": repr(float(sigma_start))})
        tmp.replace(path)
    return x_ref, sigma_start


class _OutOfTime(Exception):
    """Raised by the objective once the search's time budget is spent."""


def optimise_grid(error: Callable[[np.ndarray], float], starts: list[np.ndarray], lambda_0: float, lambda_max: float,
                  deadline: float, method: str = "powell", seed: int = 0, max_evaluations: int | None = None,
                  callback: Callable[[float, dict], None] | None = None) -> dict:
    """Minimise ``error(sigmas)`` over the grid parameters u (module docstring) until ``deadline``.

    Every start is evaluated first, whatever the budget; then Powell runs from the best of them, or differential
    evolution from a population seeded with them. The optimiser stops at the first evaluation past ``deadline``
    (a ``time.perf_counter()`` value) or after ``max_evaluations`` grids in all. ``callback(value, best)`` runs after
    each evaluation. Returns ``best``: ``u``, ``sigmas``, ``loss``, ``evaluations`` and ``start_losses``.
    """
    from scipy.optimize import differential_evolution, minimize

    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; choose one of {METHODS}.")
    best: dict = {"loss": math.inf, "u": None, "evaluations": 0}
    searching = False

    def loss(u: np.ndarray) -> float:
        if searching and (time.perf_counter() > deadline  # within an optimiser's iteration too
                          or (max_evaluations is not None and best["evaluations"] >= max_evaluations)):
            raise _OutOfTime
        value = error(np.exp(-lambdas_of(np.asarray(u, dtype=np.float64), lambda_0, lambda_max)))
        best["evaluations"] += 1
        if value < best["loss"]:
            best.update(loss=value, u=np.array(u, dtype=np.float64))
        if callback is not None:
            callback(value, best)
        return value

    best["start_losses"] = [loss(u) for u in starts]
    bound, dim, searching = 4.0, len(starts[0]), True
    try:
        if method == "evolution":
            init = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(8 * max(dim, 2), dim))
            for k, u in enumerate(starts):
                init[k] = np.clip(u, -bound, bound)
            differential_evolution(loss, [(-bound, bound)] * dim, init=init, maxiter=100000, tol=0.0, polish=False,
                                   seed=seed)
        else:
            minimize(loss, best["u"], method="Powell", bounds=[(-bound, bound)] * dim,
                     options={"xtol": 1e-4, "ftol": 1e-9, "maxfev": 10**6})
    except _OutOfTime:
        pass
    best["sigmas"] = np.exp(-lambdas_of(best["u"], lambda_0, lambda_max))
    return best


def search_schedule(named_model, sampler: str, nfe: int, guidance: float = 1.0, num_noises: int = 32, seed: int = 1,
                    minutes: float = 10.0, method: str = "powell", device: str = "cpu", progress: bool = True,
                    state_path: str | Path | None = None, reference_steps: int | None = None,
                    reference_cache: str | Path | None = None, max_evaluations: int | None = None,
                    teleport=None) -> dict:
    """Search the grid of ``sampler`` with ``nfe`` model evaluations on ``named_model`` at ``guidance``.

    Returns the schedule-file entry: ``steps``, ``nfe``, ``sigmas``, the final-sample MSE of the searched, default
    and logSNR-uniform grids on the search's noises, the method and the time taken (and, for a diffusers pipeline, the
    prompts its labels index). ``state_path`` keeps the best grid so far (written as the search goes); a search
    started again with the same arguments resumes from it. ``reference_steps`` (default 500) sets the reference
    solution's steps: fewer make the search affordable on an expensive model, as long as the reference's own error
    stays far below the few-step sampler's. ``minutes`` bounds the whole search, the reference solution included
    (the starting grids are always evaluated); the optimiser stops at the first evaluation past it, and the entry's
    ``evaluations`` counts the grids tried. ``reference_cache`` (a safetensors file) keeps the reference solution,
    so that searches for other samplers and NFEs at the same model, guidance and noises do not pay for it again.
    ``max_evaluations`` also stops the search after that many grids (the starting grids included): a budget that,
    unlike ``minutes``, does not depend on the machine or its load.

    ``teleport`` (a :class:`~diffalign.samplers.teleport.GaussianTeleport`) searches the grid of a teleported run:
    ``steps + 1`` points, the teleport from the first to the second, the sampler's ``steps`` evaluations on the rest.
    The entry then has ``steps + 1`` points (``"teleport": true``), the grid :func:`~diffalign.samplers.teleport.
    teleport_grid` reads for ``steps`` evaluations; keep it in its own file (``schedule_file(..., teleport=True)``).
    """
    from tqdm.auto import tqdm

    from ..eval.sampler_bench import REFERENCE_STEPS, reference_solution, steps_for_nfe
    from ..models.sampler_data import sampler_overrides
    from . import make_scheduler, sample

    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; choose one of {METHODS}.")
    if num_noises < 1 or minutes <= 0 or (max_evaluations is not None and max_evaluations < 1):
        raise ValueError("num_noises and max_evaluations must be >= 1 and minutes > 0.")
    config = {**named_model.scheduler_config, **sampler_overrides(named_model, sampler, guidance, searched=False)}
    if config.get("use_flow_sigmas"):
        raise ValueError("the time-step search supports VP (beta) schedules; this model uses flow-matching sigmas.")
    probe = make_scheduler(sampler, config)
    if probe.config.get("solver_mode") == "singlestep":
        raise ValueError(f"{sampler} runs singlestep here, whose intermediate points it places itself; search a "
                         "multistep configuration (solver_mode='multistep').")
    steps = steps_for_nfe(probe, nfe)
    if teleport is not None:
        from .teleport import teleport_grid

        teleport_grid(probe, steps)  # refuses samplers that cannot run a teleported grid
    points = steps + (teleport is not None)  # the grid's points: the teleport's start comes on top
    if points < 2:
        raise ValueError(f"{sampler} makes {steps} step(s) with {nfe} model evaluations: nothing to place.")
    probe.set_timesteps(points)
    default_sigmas = probe.sigmas.double().numpy()[:-1]
    lam = lambda s: -math.log(s)  # noqa: E731  (VE sigma -> lambda = log(alpha / sigma))
    ac0 = float(probe.alphas_cumprod[0])
    lambda_0, lambda_max = lam(float(default_sigmas[0])), lam(math.sqrt((1 - ac0) / ac0))

    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((num_noises, *named_model.sample_shape), generator=gen, dtype=torch.float64)
    labels = (torch.arange(num_noises) % len(named_model.class_names)) if guidance != 1.0 else None
    key = {"model": named_model.name, "sampler": sampler, "nfe": nfe, "guidance": guidance, "seed": seed,
           "num_noises": num_noises}
    if reference_steps is not None and int(reference_steps) != REFERENCE_STEPS:
        key["reference_steps"] = int(reference_steps)
    if teleport is not None:
        key["teleport"] = True
    if "pipeline" in named_model.extra:  # a diffusers pipeline: label k is the k-th of these prompts
        key["prompts"] = list(named_model.class_names)
    t_start = time.perf_counter()  # the budget covers the reference solution too
    deadline = t_start + 60.0 * minutes
    ref_key = {k: v for k, v in key.items() if k not in ("sampler", "nfe")}
    x_ref, sigma_ref = cached_reference(reference_cache, ref_key, x_T, lambda: reference_solution(
        named_model, x_T.to(device), labels, guidance, device, reference_steps))
    if not math.isclose(sigma_ref, float(default_sigmas[0]), rel_tol=1e-4):
        raise ValueError(f"{sampler} starts at sigma {float(default_sigmas[0]):.4g} with {steps} steps and the "
                         f"reference at {sigma_ref:.4g}: the search needs a schedule whose every step count starts at "
                         "the same timestep (timestep_spacing 'trailing' or 'linspace', not 'leading').")

    def model(x_t, t):
        return named_model.predict(x_t, t, labels, guidance)

    def error(sigmas: np.ndarray) -> float:
        x = x_T.to(device=device, dtype=named_model.dtype)
        if teleport is not None:
            x = teleport(x, float(sigmas[0]), float(sigmas[1]), labels, guidance)
            sigmas = sigmas[1:]
        with torch.no_grad():
            x = sample(make_scheduler(sampler, config), model, x, sigmas=[float(v) for v in sigmas])
        value = float(torch.mean((x.double() - x_ref.double()) ** 2))
        return value if math.isfinite(value) else 1e6

    bar = tqdm(total=int(60 * minutes), desc=f"search {sampler} NFE {nfe}", unit="s", disable=not progress)
    last_save = 0.0

    def report(value: float, best: dict) -> None:
        nonlocal last_save
        if value == best["loss"]:
            bar.set_postfix(mse=f"{value:.3e}", refresh=False)
        now = time.perf_counter()
        bar.update(max(0, min(int(now - t_start), bar.total) - bar.n))
        if state_path is not None and now - last_save > 5.0:
            Path(state_path).write_text(json.dumps({**key, "u": best["u"].tolist(), "loss": best["loss"]}))
            last_save = now

    ays = make_scheduler(sampler, config)
    ays.set_timesteps(timesteps=ays_timesteps(points))
    starts = [params_of(-np.log(default_sigmas), lambda_0, lambda_max), np.zeros(points - 1),
              params_of(-np.log(ays.sigmas.double().numpy()[:points]), lambda_0, lambda_max)]
    saved = json.loads(Path(state_path).read_text()) if state_path is not None and Path(state_path).is_file() else {}
    if {k: saved.get(k) for k in key} == key and len(saved["u"]) == points - 1:  # an interrupted search: resume
        starts.append(np.asarray(saved["u"], dtype=np.float64))
    best = optimise_grid(error, starts, lambda_0, lambda_max, deadline, method, seed, max_evaluations, report)
    default_loss, uniform_loss, ays_loss = best["start_losses"][:3]
    bar.update(bar.total - bar.n)
    bar.close()
    sigmas = best["sigmas"]
    return {"steps": points, "nfe": nfe, "sigmas": sigmas.tolist(), "mse": best["loss"], "mse_default": default_loss,
            "mse_logsnr_uniform": uniform_loss, "mse_ays": ays_loss, "method": method, "seed": seed,
            "num_noises": num_noises, "seconds": round(time.perf_counter() - t_start, 1),
            "evaluations": best["evaluations"], "starts": len(starts),
            **{k: key[k] for k in ("prompts", "reference_steps", "teleport") if k in key}}

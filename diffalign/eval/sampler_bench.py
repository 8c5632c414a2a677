"""Sampler error benchmark: every sampler from the same noise, MSE against a reference solution.

MSE as in the DPM-Solver-v3 and DC-Solver papers: mean over images of mean((x_hat - x_ref)^2). For the
closed-form reference model x_ref is the exact ODE solution (adaptive DOP853, error ~1e-9); for trained models
it is a 500-step DPM-Solver++(3M) solution in float64.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.reference import ReferenceModel, solve_reference
from ..models.sampler_data import sampler_overrides
from ..samplers import make_scheduler
from ..samplers.loop import count_evaluations, sample

BASELINES = ("diffusers:DPMSolverMultistepScheduler", "diffusers:UniPCMultistepScheduler")


@dataclass
class BenchRecord:
    sampler: str
    nfe: int
    guidance: float
    mse: float
    seconds: float
    step_overhead_us: float

    def to_dict(self) -> dict:
        return asdict(self)


REFERENCE_STEPS = 500


def reference_solution(named_model, x_T: torch.Tensor, labels: torch.Tensor | None, guidance: float,
                       device: str = "cpu", steps: int | None = None) -> tuple[torch.Tensor, float]:
    """(x_ref, sigma_start): the exact ODE solution for closed-form models, else a ``steps``-step (default 500)
    DPM-Solver++(3M) solution in float64 (DESIGN: >= 500-step third-order multistep), from the samplers' common
    first sigma."""
    steps = REFERENCE_STEPS if steps is None else int(steps)
    config = dict(named_model.scheduler_config)
    sched = make_scheduler("dpm-solver++", config, solver_order=3)
    sched.set_timesteps(steps, device=device)
    sigma_start = float(sched.sigmas[0])
    if isinstance(named_model.model, ReferenceModel):
        return solve_reference(named_model.model, x_T, sigma_start, 0.0, labels, guidance), sigma_start
    def model(x, t):
        return named_model.predict(x.to(named_model.dtype), t, labels, guidance).double()

    with torch.no_grad():
        return sample(sched, model, x_T.double(), steps), sigma_start


def steps_for_nfe(scheduler, nfe: int) -> int:
    """The largest ``num_inference_steps`` whose number of model evaluations does not exceed ``nfe``."""
    for steps in range(nfe, 0, -1):
        try:
            if count_evaluations(scheduler, steps) <= nfe:
                return steps
        except ValueError:
            continue
    raise ValueError(f"{type(scheduler).__name__} cannot sample with {nfe} model evaluations; use a larger NFE.")


class _TimedStep:
    """Wraps ``scheduler.step`` to accumulate its wall time (the scheduler's own overhead)."""

    def __init__(self, scheduler):
        self.scheduler, self.seconds, self.calls = scheduler, 0.0, 0
        self._step = scheduler.step

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self._step(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


GRIDS = ("default", "logsnr", "ays", "searched", "teleport", "teleport-searched")
"""Grids a benchmark can run each sampler on: the model's default grid, uniform in logSNR, Align Your Steps' fixed
Stable Diffusion timesteps (a baseline), searched time steps, the default grid with one more point whose first
step the Gaussian teleport takes (:mod:`diffalign.samplers.teleport`), or a grid searched with the teleport."""


def bench_samplers(named_model, samplers: list[str], nfes: list[int], guidance: float = 1.0, num_images: int = 16,
                   seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   progress: bool = True, variants: dict[str, tuple[str, dict]] | None = None,
                   grids: tuple[str, ...] = ("default",), schedules: str | Path | None = None,
                   teleport=True) -> list[BenchRecord]:
    """Run each sampler at each NFE from the same noise; diffusers' DPM-Solver++ and UniPC are always included.

    ``variants`` adds rows ``label -> (sampler name, extra config)``, e.g. a sampler with non-default options.
    ``grids`` adds, per diffalign sampler, rows ``<name>@logsnr`` (``use_lu_lambdas``), ``<name>@ays`` (AYS' Stable
    Diffusion timesteps, :func:`~diffalign.samplers.timesteps.ays_timesteps`) and ``<name>@searched``
    (searched time steps: the files in the ``schedules`` directory, ``<sampler>_g<guidance>.json``, else the shipped
    ones; NFEs without a searched grid are left out), ``<name>@teleport`` (the Gaussian teleport, then the sampler's
    NFE evaluations on the rest of its default NFE + 1-point grid; multistep samplers only; ``teleport``: the shipped
    statistics, a file or a :class:`~diffalign.samplers.teleport.GaussianTeleport`) and ``<name>@teleport-searched``
    (the same on the NFE + 1-point grid searched with the teleport, ``<sampler>_g<guidance>_teleport.json``). Plain
    rows use the default grid.
    """
    from ..models.sampler_data import load_teleport, schedule_file
    from ..samplers.teleport import teleport_grid
    from ..samplers.timesteps import ays_timesteps

    variants = dict(variants or {})
    unknown = set(grids) - set(GRIDS)
    if unknown:
        raise ValueError(f"unknown grid(s) {sorted(unknown)}; choose from {GRIDS}.")
    for name in samplers:
        if name.startswith("diffusers:"):
            continue
        if "logsnr" in grids:
            variants[f"{name}@logsnr"] = (name, {"use_lu_lambdas": True})
        if "ays" in grids:
            variants[f"{name}@ays"] = (name, {})
        if "searched" in grids:
            file = (Path(schedules) / schedule_file("", name, guidance).name if schedules is not None
                    else schedule_file(named_model.name, name, guidance))
            if file.is_file():
                variants[f"{name}@searched"] = (name, {"timesteps_path": str(file), "timesteps_missing": "error"})
        if "teleport" in grids:
            variants[f"{name}@teleport"] = (name, {})
        if "teleport-searched" in grids:
            file = (Path(schedules) / schedule_file("", name, guidance, teleport=True).name if schedules is not None
                    else schedule_file(named_model.name, name, guidance, teleport=True))
            if file.is_file():
                variants[f"{name}@teleport-searched"] = (name, {"timesteps_path": str(file),
                                                                "timesteps_missing": "error"})
    teleported = ("@teleport", "@teleport-searched")
    teleport = load_teleport(named_model.name, teleport) if {"teleport", "teleport-searched"} & set(grids) else None
    names = list(dict.fromkeys(list(samplers) + list(BASELINES) + list(variants)))
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((num_images, *named_model.sample_shape), generator=gen, dtype=torch.float64)
    labels = torch.arange(num_images) % len(named_model.class_names) if guidance != 1.0 else None
    config = dict(named_model.scheduler_config)
    x_ref, sigma_start = reference_solution(named_model, x_T.to(device), labels, guidance, device)
    records = []
    jobs = [(n, k) for n in names for k in nfes]
    for label, nfe in tqdm(jobs, desc="bench", disable=not progress):
        name, extra = variants.get(label, (label, {}))
        plain = {**config, **sampler_overrides(named_model, name, guidance, searched=False)}
        sched = make_scheduler(name, {**plain, **extra})
        if label.endswith("@searched"):  # the step count of this NFE on the plain grid, if a grid was searched for it
            steps = steps_for_nfe(make_scheduler(name, plain), nfe)
            try:
                sched.set_timesteps(steps)
            except ValueError:
                continue
        elif label.endswith("@teleport-searched"):  # its grid has steps + 1 points: teleport_grid reads it
            steps = steps_for_nfe(make_scheduler(name, plain), nfe)
        else:
            steps = steps_for_nfe(sched, nfe)
        custom, x = {}, x_T.to(device=device, dtype=dtype)
        t0 = time.perf_counter()
        if label.endswith(teleported):
            try:
                sigmas = teleport_grid(sched, steps)
            except ValueError:
                continue  # singlestep samplers and warm-ups (not one evaluation a point), NFEs without a searched grid
            x, custom = teleport(x, sigmas[0], sigmas[1], labels, guidance), {"sigmas": sigmas[1:]}
        elif label.endswith("@ays"):
            custom = {"timesteps": ays_timesteps(steps)}
            try:
                sched.set_timesteps(**custom)
            except ValueError:
                continue  # singlestep samplers place their own points
            if len(sched.timesteps) != nfe:
                continue  # a warm-up (PNDM) makes more evaluations than grid points
        timer = _TimedStep(sched)
        sched.step = timer
        with torch.no_grad():
            x = sample(sched, lambda x_t, t: named_model.predict(x_t, t, labels, guidance), x,
                       None if custom else steps, **custom)
        seconds = time.perf_counter() - t0
        start = sigmas[0] if label.endswith(teleported) else float(sched.sigmas[0])
        if abs(start - sigma_start) > 1e-3 * sigma_start:
            raise ValueError(f"{name} starts at sigma {start:.4g}, not {sigma_start:.4g}.")
        mse = torch.mean((x.double() - x_ref.double()) ** 2, dim=tuple(range(1, x.ndim))).mean().item()
        records.append(BenchRecord(label, len(sched.timesteps), guidance, mse, seconds,
                                   1e6 * timer.seconds / max(timer.calls, 1)))
    return records


def report(records: list[BenchRecord], json_path: str | None = None, title: str | None = None) -> None:
    """Print ``title`` and :func:`format_table`, and write the records as JSON to ``json_path`` when given."""
    if title:
        print(title)
    print(format_table(records))
    if json_path:
        Path(json_path).write_text(json.dumps([r.to_dict() for r in records], indent=2))
        print(f"wrote {json_path}")


def format_table(records: list[BenchRecord]) -> str:
    """Plain-text table: one row per sampler, one MSE column per NFE."""
    nfes = sorted({r.nfe for r in records})
    names = list(dict.fromkeys(r.sampler for r in records))
    width = max(len(n) for n in names) + 2
    lines = [f"{'sampler':<{width}}" + "".join(f"{'NFE ' + str(k):>12}" for k in nfes) + f"{'step us':>10}"]
    for n in names:
        row = {r.nfe: r for r in records if r.sampler == n}
        cells = "".join(f"{row[k].mse:>12.3e}" if k in row else f"{'-':>12}" for k in nfes)
        overhead = sum(r.step_overhead_us for r in row.values()) / len(row)
        lines.append(f"{n:<{width}}" + cells + f"{overhead:>10.0f}")
    return "\n".join(lines)

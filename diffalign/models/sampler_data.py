"""Shipped per-model sampler data, looked up in one place: DPM-Solver-v3 statistics (``ems/<model>/``), DC-Solver
ratios and their regression (``dc_ratios/<model>/``), searched time steps (``schedules/<model>/``) and the Gaussian
teleport's statistics (``teleport/<model>.safetensors``), each made by this project's own commands (``diffalign ems
compute``, ``diffalign calibrate dc-solver`` / ``cpr``, ``diffalign calibrate timesteps``, ``diffalign calibrate
teleport``). Sampling, the pipelines and the benchmark all ask :func:`sampler_overrides`.

Model names are written with ``:`` as ``_`` (``builtin:fashion`` -> ``builtin_fashion``).
"""

from __future__ import annotations

import inspect
from pathlib import Path

HERE = Path(__file__).parent
DC_RATIOS = HERE / "dc_ratios"
EMS_DIR = HERE / "ems"
SCHEDULES = HERE / "schedules"
TELEPORT = HERE / "teleport"


def _slug(name: str) -> str:
    return name.replace(":", "_")


def schedule_file(model: str, sampler: str, guidance: float, teleport: bool = False) -> Path:
    """Where the searched time steps of (model, sampler, guidance) are shipped; ``teleport``: those searched with the
    Gaussian teleport over their first stretch (``<sampler>_g<guidance>_teleport.json``)."""
    suffix = "_teleport" if teleport else ""
    return SCHEDULES / _slug(model) / f"{sampler.replace(':', '_')}_g{float(guidance):g}{suffix}.json"


def teleport_file(model: str) -> Path:
    """Where the Gaussian teleport's statistics of ``model`` are shipped."""
    return TELEPORT / f"{_slug(model)}.safetensors"


def load_teleport(model: str, teleport=True):
    """The teleport a sampling call asked for: ``None``/``False`` (none), ``True`` (the statistics shipped for
    ``model``), a path to statistics, or a :class:`~diffalign.samplers.teleport.GaussianTeleport`."""
    from ..samplers.teleport import GaussianTeleport, load_cached

    if teleport is None or teleport is False or isinstance(teleport, GaussianTeleport):
        return teleport or None
    if teleport is True:
        path = teleport_file(model)
        if not path.is_file():
            raise FileNotFoundError(f"no teleport statistics are shipped for {model!r}; make them with `diffalign "
                                    f"calibrate teleport --model {model} --out FILE` and pass that file.")
        return load_cached(path)
    return load_cached(teleport)


def shipped_overrides(name: str) -> dict:
    """Per-sampler config entries pointing at the calibration files shipped for model ``name`` (not guidance
    dependent: DC-Solver ratios / CPR, the v3 statistics directory, which holds one set per guidance, and the data
    Gaussian of the Gaussian exponential integrator, the teleport's statistics)."""
    slug = _slug(name)
    overrides: dict = {}
    dc = {key: str(DC_RATIOS / slug / file) for key, file in (("dc_ratios_path", "ratios.json"),
                                                              ("cpr_path", "cpr.json"))
          if (DC_RATIOS / slug / file).is_file()}
    if dc:
        overrides["dc-solver"] = dc
    if (EMS_DIR / slug / "ems.safetensors").is_file() or any((EMS_DIR / slug).glob("*/ems.safetensors")):
        overrides["dpm-solver-v3"] = {"ems_path": str(EMS_DIR / slug)}
    if teleport_file(name).is_file():
        overrides["gaussian-ei"] = {"gaussian_path": str(teleport_file(name))}
    return overrides


def sampler_overrides(named_model, name: str, guidance: float, searched: bool = True, teleport: bool = False) -> dict:
    """Config entries for sampler ``name`` on this model at ``guidance``.

    * the model's calibration data (``NamedModel.sampler_overrides``; a ``dualfast:<base>`` sampler uses its base's);
    * ``guidance_scale`` for samplers whose calibration depends on it (a ``guidance_scale`` argument);
    * with ``searched``, the shipped searched time steps for (model, sampler, guidance), used for the step counts
      they were searched for (``timesteps_missing="default"``: other step counts keep the default grid). DC-Solver's
      ratios were calibrated on the default grid, so DC-Solver keeps it; a ``timesteps_path`` of the model's own
      data wins over the shipped one. ``teleport``: the time steps searched with the teleport instead (the grid a
      teleported run takes, ``steps + 1`` points for ``steps`` model evaluations).
    """
    table = getattr(named_model, "sampler_overrides", None) or {}
    return _overrides(table, getattr(named_model, "name", ""), name, guidance, searched, teleport)


def model_sampler_overrides(model: str, name: str, guidance: float, searched: bool = True,
                            teleport: bool = False) -> dict:
    """:func:`sampler_overrides` for a model known by its name only (a pipeline's ``model_name``)."""
    return _overrides(shipped_overrides(model), model, name, guidance, searched, teleport)


def _overrides(table: dict, model: str, name: str, guidance: float, searched: bool, teleport: bool) -> dict:
    from ..samplers import get_scheduler_class

    overrides = dict(table.get(name) or table.get(name.removeprefix("dualfast:")) or {})
    if name.startswith("diffusers:"):
        return overrides
    if "guidance_scale" in inspect.signature(get_scheduler_class(name).__init__).parameters:
        overrides["guidance_scale"] = float(guidance)
    path = schedule_file(model, name, guidance, teleport)
    if searched and path.is_file() and not {"dc_ratios_path", "cpr_path", "timesteps_path"} & set(overrides):
        overrides.update(timesteps_path=str(path), timesteps_missing="default")
    return overrides

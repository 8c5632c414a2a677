"""Gaussian teleport: solve the first, high-noise part of the sampling ODE in closed form and spend the model
evaluations on the rest. Does it buy a few-step sampler one step?

The teleport (:mod:`diffalign.samplers.teleport`, Wang & Vastola 2023's "analytical teleportation") follows the
probability-flow ODE of the Gaussian fitted to the model's training data (one per class; guided: RK4) from the first
sigma to a lower one; AMED's "analytical first step" (Zhou et al. 2024) is its crudest form, the denoiser taken as 0.

For each sampler and NFE the script compares, on the benchmark's noises (seed 0, as ``diffalign bench samplers``)
and its reference solution:

* ``default``: the sampler with ``nfe`` model evaluations on its default grid;
* ``teleport``: the Gaussian path from the first sigma to the second point of the sampler's ``nfe + 1``-step default
  grid, then the sampler on the remaining ``nfe`` points: the first model evaluation is replaced by the closed form;
* ``zero``: the same with the denoiser taken as 0 on the skipped interval (AMED's analytical first step: the noise
  only rescaled, x_1 = (sigma_1 / sigma_0) x_0 in VP units);
* ``--floor``: the teleport followed by a 100-step third-order solve, the error of the Gaussian path alone.

    python benchmarks/teleport.py --model builtin:fashion --samplers dc-solver,unipc,dpm-solver-v3 --nfe 5,6 \\
        --guidance 1 --num-images 64 --floor --reference-cache runs/teleport/reference_g1.safetensors \\
        --json benchmarks/results/teleport_fashion_g1.json

The Gaussian statistics are the shipped model's training data's (``builtin:`` models only). ``--reference-cache``
keeps the reference solution (safetensors) for a rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch


def search(error, grid: np.ndarray, alpha_cumprod_0: float, minutes: float) -> dict:
    """Powell over the points after the first of ``grid`` (the parametrisation and optimiser of ``diffalign
    calibrate timesteps``), from ``grid``, minimising ``error(sigmas)`` for ``minutes``."""
    from diffalign.samplers.timesteps import optimise_grid, params_of

    lambda_0, lambda_max = -math.log(grid[0]), -0.5 * math.log((1 - alpha_cumprod_0) / alpha_cumprod_0)
    best = optimise_grid(error, [params_of(-np.log(grid), lambda_0, lambda_max)], lambda_0, lambda_max,
                         deadline=time.perf_counter() + 60 * minutes)
    return {"searched_sigmas": best["sigmas"].tolist(), "search_mse_start": best["start_losses"][0],
            "search_mse": best["loss"], "search_evaluations": best["evaluations"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:fashion")
    parser.add_argument("--samplers", default="dc-solver,unipc,dpm-solver-v3")
    parser.add_argument("--nfe", default="5,6")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="noise seed (0: the sampler benchmark's)")
    parser.add_argument("--floor", action="store_true", help="also the Gaussian path's own error (100-step solve)")
    parser.add_argument("--reference-cache", help="safetensors file keeping the reference solution")
    parser.add_argument("--search-minutes", type=float, default=0.0,
                        help="also search the grid after the teleport (Powell), this long per row")
    parser.add_argument("--search-noises", type=int, default=128)
    parser.add_argument("--search-seed", type=int, default=1)
    parser.add_argument("--dc-calibrate", type=int, default=0, metavar="N",
                        help="also calibrate DC-Solver's ratios on each grid it runs (N noises of --search-seed)")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of the Gaussians' covariances (plus an isotropic rest); default: full rank")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    from diffalign.eval.sampler_bench import reference_solution, steps_for_nfe
    from diffalign.models.builtin import load_builtin_data
    from diffalign.models.registry import load_model
    from diffalign.models.sampler_data import sampler_overrides
    from diffalign.samplers import make_scheduler, sample
    from diffalign.samplers.teleport import GaussianTeleport, LowRankGaussian
    from diffalign.samplers.timesteps import cached_reference

    if not args.model.startswith("builtin:"):
        raise SystemExit("--model must be a builtin: model (the Gaussian statistics are its training data's).")
    named = load_model(args.model)
    g = args.guidance
    t0 = time.perf_counter()
    data, data_labels = load_builtin_data(args.model, "train")
    gaussian = GaussianTeleport.fit(data, data_labels, args.rank, len(named.class_names))
    u = gaussian.uncond  # D = 0: AMED's first step, the noise only rescaled
    zero = GaussianTeleport(LowRankGaussian(0 * u.mu, u.U, 0 * u.lam, 0 * u.rho), None, gaussian.shape)

    def noise_set(seed: int, size: int, cache: str | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(noises, labels, reference solutions) of ``size`` noises of ``seed``."""
        x_T = torch.randn((size, *named.sample_shape), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
        labels = torch.arange(size) % len(named.class_names) if g != 1.0 else None
        key = {"model": args.model, "guidance": g, "seed": seed, "num_images": size}
        return x_T, labels, cached_reference(cache, key, x_T, lambda: reference_solution(named, x_T, labels, g))[0]

    def calibrated(config: dict, grid, noises, teleported: bool = True) -> list[float]:
        """DC-Solver's ratios calibrated on ``grid`` (its first point teleported over if ``teleported``), against
        the states of a fine third-order solve through the grid's points from the noise."""
        from diffalign.samplers.calibrate import calibrate_dc_ratios
        from diffalign.samplers.loop import trajectory

        x_T, labels, x_ref = noises
        fine, marks = [float(grid[0])], []
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            fine += np.geomspace(a, b, 41)[1:].tolist()
            marks.append(len(fine) - 1)
        fine += np.geomspace(grid[-1], 1e-2, 41)[1:].tolist()
        model = lambda x, t: named.predict(x.float(), t, labels, g).double()  # noqa: E731
        solver = make_scheduler("dpm-solver++", {**named.scheduler_config, "solver_order": 3})
        with torch.no_grad():
            states = [x_T] + list(trajectory(solver, model, x_T, sigmas=fine))
        truth = [states[m] for m in marks] + [x_ref]  # the state at every point after the first, the end
        x = x_T
        if teleported:
            x = gaussian(x_T, float(grid[0]), float(grid[1]), labels, g)
            grid = grid[1:]
        else:
            truth = [x_T] + truth
        sched = make_scheduler("dc-solver", {**config, "dc_ratios_path": None, "cpr_path": None, "dc_ratios": None})
        fit = calibrate_dc_ratios(sched, model, x, len(grid), truth, sigmas=[float(s) for s in grid])
        return fit.ratios

    def error(name: str, config: dict, grid, noises, tp: GaussianTeleport | None = gaussian) -> float:
        """MSE of ``name`` on ``grid`` (its first point teleported over by ``tp``, unless it is None)."""
        x_T, labels, x_ref = noises
        x = x_T
        if tp is not None:
            x = tp(x_T, float(grid[0]), float(grid[1]), labels if tp is gaussian else None, g)
            grid = grid[1:]
        with torch.no_grad():
            out = sample(make_scheduler(name, config), lambda x_t, t: named.predict(x_t, t, labels, g), x.float(),
                         sigmas=grid)
        value = torch.mean((out.double() - x_ref) ** 2).item()
        return value if math.isfinite(value) else 1e6

    held_out = noise_set(args.seed, args.num_images, args.reference_cache)
    search_cache = None if args.reference_cache is None else str(Path(args.reference_cache).with_suffix("")) + (
        f"_search{args.search_seed}.safetensors")
    searching = noise_set(args.search_seed, args.search_noises, search_cache) if args.search_minutes else None
    if args.dc_calibrate and searching is not None and args.dc_calibrate <= args.search_noises:
        calibrating = tuple(None if v is None else v[:args.dc_calibrate] for v in searching)  # the same first noises
    elif args.dc_calibrate:
        calibrating = noise_set(args.search_seed, args.dc_calibrate, None)
    print(f"statistics and references: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    rows, floors = [], {}
    for name in args.samplers.split(","):
        config = {**named.scheduler_config, **sampler_overrides(named, name, g, searched=False)}
        for nfe in [int(k) for k in args.nfe.split(",")]:
            plain, longer = make_scheduler(name, config), make_scheduler(name, config)
            plain.set_timesteps(steps_for_nfe(plain, nfe))
            longer.set_timesteps(steps_for_nfe(longer, nfe + 1))
            grid = longer.sigmas.double().numpy()[:-1]
            if len(longer.timesteps) != len(grid) or len(plain.timesteps) != len(grid) - 1:
                raise SystemExit(f"{name}: the teleport needs a multistep grid, one model evaluation per point.")
            row = {"sampler": name, "nfe": nfe, "guidance": g, "num_images": args.num_images,
                   "mse_default": error(name, config, plain.sigmas.double().numpy()[:-1], held_out, None),
                   "mse_teleport": error(name, config, grid, held_out), "sigma_teleport": float(grid[1]),
                   "mse_zero": error(name, config, grid, held_out, zero)}
            if args.floor:  # the teleport, then a 100-step third-order solve (once per teleport target)
                if float(grid[1]) not in floors:
                    fine = np.concatenate([grid[:1], np.logspace(math.log10(grid[1]), -2, 100)])
                    floors[float(grid[1])] = error("dpm-solver++", {**named.scheduler_config, "solver_order": 3},
                                                   fine, held_out)
                row["mse_floor"] = floors[float(grid[1])]
            if args.search_minutes:
                row.update(search(lambda sigmas, n=name, c=config: error(n, c, sigmas, searching), grid,
                                  float(longer.alphas_cumprod[0]), args.search_minutes))
                row["mse_teleport_searched"] = error(name, config, np.asarray(row["searched_sigmas"]), held_out)
            if args.dc_calibrate and name == "dc-solver":  # the ratios calibrated on each grid
                default_grid = plain.sigmas.double().numpy()[:-1]
                row["ratios_default_calibrated"] = calibrated(config, default_grid, calibrating, teleported=False)
                row["mse_default_calibrated"] = error(name, {**config, "dc_ratios": row["ratios_default_calibrated"]},
                                                      default_grid, held_out, None)
                row["ratios_teleport_calibrated"] = calibrated(config, grid, calibrating)
                row["mse_teleport_calibrated"] = error(name, {**config, "dc_ratios": row["ratios_teleport_calibrated"]},
                                                       grid, held_out)
                if args.search_minutes:
                    searched = np.asarray(row["searched_sigmas"])
                    row["ratios_searched_calibrated"] = calibrated(config, searched, calibrating)
                    row["mse_teleport_searched_calibrated"] = error(
                        name, {**config, "dc_ratios": row["ratios_searched_calibrated"]}, searched, held_out)
            rows.append(row)
            print(f"{name:14s} NFE {nfe:2d}  " + "  ".join(f"{k.removeprefix('mse_')} {v:.3e}" for k, v in row.items()
                                                       if k.startswith("mse_")), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/teleport.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.json).write_text(json.dumps({"command": command, "model": args.model, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

"""The ``diffalign`` command line: argument parsing and progress bars only; the work is in library functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch


def _sample(args) -> None:
    from .models.registry import MODELS, load_model
    from .sampling import image_seeds, pipeline_images, sample_images, save_grid, save_images

    if args.prompt is None and args.guidance != 1.0:
        print(f"diffalign: warning: --guidance {args.guidance:g} has no effect without --prompt (unconditional "
              "samples); sampling without guidance.", file=sys.stderr)
        args.guidance = 1.0
    if args.model in MODELS:
        args.sampler, args.steps = args.sampler or "dpm-solver++", args.steps or 20
        named = load_model(args.model, device=args.device)
        label = named.prompt_to_label(args.prompt) if args.prompt is not None else None
        images = sample_images(named, args.sampler, args.steps, args.num_images, label, args.guidance, args.seed,
                               device=args.device, progress=not args.quiet, batch_size=args.batch_size,
                               searched=not args.default_grid, teleport=_teleport_arg(args.teleport))
    else:  # a local diffusers directory or a hub id
        if args.teleport:
            raise ValueError(f"--teleport samples {', '.join(MODELS)} (their sampling loop); a diffusers pipeline "
                             "runs its own loop. Drop --teleport.")
        from . import load_pipeline

        pipe = load_pipeline(args.model, device=args.device)
        # a few-step student is sampled as it was trained unless told otherwise
        args.sampler = args.sampler or getattr(pipe, "recommended_sampler", None) or "dpm-solver++"
        args.steps = args.steps or getattr(pipe, "recommended_steps", None) or 20
        images = pipeline_images(pipe, args.sampler, args.steps, args.num_images, args.prompt, args.guidance,
                                 args.seed, progress=not args.quiet, batch_size=args.batch_size)
    seeds = image_seeds(args.seed, len(images))
    save_grid(images, args.out, title=f"{args.model} | {args.sampler} {args.steps} steps | g={args.guidance}")
    meta = [{"index": i, "model": args.model, "seed": seeds[i], "sampler": args.sampler, "steps": args.steps,
             "guidance": args.guidance, "prompt": args.prompt} for i in range(len(images))]
    if args.out_dir:
        tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in (args.prompt or "uncond"))[:40]
        files = save_images(images, args.out_dir, [f"{i:04d}-{tag}-seed{seeds[i]}" for i in range(len(images))])
        for entry, path in zip(meta, files, strict=True):
            entry["file"] = str(path)
    if args.json:
        Path(args.json).write_text(json.dumps(meta, indent=2))
    print(f"wrote {args.out} ({len(images)} images)" + (f" and one PNG each in {args.out_dir}" if args.out_dir else ""))


def _teleport_arg(value: str | None):
    """``--teleport`` as :func:`~diffalign.sampling.sample_images` takes it: off, the shipped statistics, a file."""
    return None if value is None else True if value == "shipped" else value


def _bench(args) -> None:
    from .eval.sampler_bench import bench_samplers, report
    from .models.registry import load_model

    named = load_model(args.model, device=args.device, prompts=args.prompts)
    records = bench_samplers(named, [s for s in args.samplers.split(",") if s], [int(k) for k in args.nfe.split(",")],
                             guidance=args.guidance, num_images=args.num_images, seed=args.seed, device=args.device,
                             progress=not args.quiet, grids=tuple(g for g in args.grids.split(",") if g),
                             schedules=args.schedules, teleport=_teleport_arg(args.teleport) or True)
    report(records, args.json)


def _calibrate_timesteps(args) -> None:
    from .models.registry import load_model
    from .samplers.timesteps import schedule_fingerprint, search_schedule, write_entry

    named = load_model(args.model, device=args.device, prompts=args.prompts)
    state = Path(str(args.out) + ".search.json")  # the best grid so far: a rerun resumes from it
    # the reference solution, shared by the searches of other samplers and NFEs written to the same directory
    cache = Path(args.out).parent / f".reference_g{args.guidance:g}_n{args.num_noises}_s{args.seed}.safetensors"
    from .models.sampler_data import load_teleport

    teleport = load_teleport(args.model, _teleport_arg(args.teleport))
    entry = search_schedule(named, args.sampler, args.nfe, args.guidance, args.num_noises, args.seed, args.minutes,
                            args.method, device=args.device, progress=not args.quiet, state_path=state,
                            reference_steps=args.reference_steps, reference_cache=cache,
                            max_evaluations=args.max_evaluations, teleport=teleport)
    if entry["evaluations"] <= entry["starts"]:
        print(f"diffalign: warning: the {args.minutes:g}-minute budget was spent before the search began (on the "
              "reference solution and the starting grids); the result is the best starting grid. Give more "
              "--minutes (the reference is now cached beside --out) or fewer --num-noises.", file=sys.stderr)
    from .samplers import make_scheduler

    schedule = schedule_fingerprint(make_scheduler(args.sampler, named.scheduler_config).config)
    path = write_entry(args.out, args.model, args.sampler, float(args.guidance), schedule, entry)
    state.unlink(missing_ok=True)
    gain = entry["mse_default"] / entry["mse"] if entry["mse"] > 0 else float("inf")
    steps = f"{entry['steps']} grid points, teleported" if teleport else f"{entry['steps']} steps"
    print(f"{args.sampler} NFE {args.nfe} ({steps}): MSE {entry['mse_default']:.4e} (default grid), "
          f"{entry['mse_logsnr_uniform']:.4e} (logSNR-uniform), {entry['mse_ays']:.4e} (AYS) -> {entry['mse']:.4e} "
          f"searched ({gain:.2f}x lower than the default) in "
          f"{entry['seconds']:.0f} s; wrote {path}")


def _calibrate_teleport(args) -> None:
    from .models.registry import load_model
    from .samplers.teleport import fit_model_teleport

    named = load_model(args.model, device=args.device, prompts=args.prompts)
    teleport = fit_model_teleport(named, args.num_datapoints, args.datapoints, args.rank or None, args.seed,
                                  device=args.device, progress=not args.quiet)
    path = teleport.save(args.out, model=args.model, datapoints=args.datapoints, num_datapoints=args.num_datapoints,
                         seed=args.seed)
    print(f"Gaussian teleport statistics of {args.model}: {1 + len(teleport.classes)} Gaussians of shape "
          f"{list(teleport.shape)}, rank {teleport.rank}; wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def _calibrate_dc(args) -> None:
    from .models.registry import load_model
    from .samplers.calibrate import calibrate_dc_solver_model, write_ratio_entry

    overrides = {}
    for item in args.config or []:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    named = load_model(args.model, device=args.device, prompts=args.prompts)
    entry = calibrate_dc_solver_model(named, args.steps, args.guidance, args.num_datapoints, args.seed, args.iters,
                                      args.lr, args.bound, overrides, device=args.device, progress=not args.quiet)
    path = write_ratio_entry(args.out, entry, model=args.model)
    before, after = sum(entry["loss_initial"]), sum(entry["loss_final"])
    print("ratios: " + ", ".join(f"{r:.4f}" for r in entry["ratios"]))
    print(f"calibration loss (sum over steps) {before:.4e} -> {after:.4e} in {entry['seconds']:.1f} s; wrote {path}")


def _calibrate_cpr(args) -> None:
    from .samplers.calibrate import fit_cpr_files

    cpr = fit_cpr_files([p for p in args.inputs.split(",") if p], args.out)
    print(f"CPR fit to {cpr['num_points']} ratios of {len(cpr['configs'])} configurations (rank {cpr['rank']}/36, "
          f"max |residual| {cpr['max_abs_residual']:.2e}); wrote {args.out}")


def _ems_compute(args) -> None:
    from .models.registry import load_model
    from .samplers.ems import compute_model_ems

    named = load_model(args.model, device=args.device, prompts=args.prompts)
    ems = compute_model_ems(named, args.num_datapoints, args.grid, guidance=args.guidance, datapoints=args.datapoints,
                            out=args.out, seed=args.seed, device=args.device, num_probes=args.num_probes,
                            batch_size=args.batch_size, progress=not args.quiet, network=args.network,
                            derivatives=args.derivatives)
    solve = ems.meta.get("trajectory_seconds")
    extra = f" after {solve:.1f} s solving the trajectories" if solve is not None else ""
    print(f"EMS for {args.model} (shape {list(ems.sample_shape)}, N={ems.num_points}, K={args.num_datapoints}, "
          f"lambda {ems.lambda_T:.3f}..{ems.lambda_0:.3f}) in {ems.meta['seconds']:.1f} s{extra}; wrote {args.out}")


def _scheduler_config(source: str) -> dict:
    """A scheduler config from a model name, a scheduler_config.json, or a diffusers pipeline directory / hub id."""
    from .models.registry import MODELS, load_model

    if source in MODELS or source.split(":")[0] in ("builtin", "reference"):
        return dict(load_model(source).scheduler_config)
    from diffusers import DDPMScheduler

    path = Path(source)
    if path.is_file():
        return dict(json.loads(path.read_text()))
    subfolder = "scheduler" if not (path / "scheduler_config.json").is_file() else None
    try:
        return dict(DDPMScheduler.load_config(source, subfolder=subfolder))
    except OSError as err:
        raise ValueError(f"cannot read a scheduler config from {source!r} (a diffalign model name, a "
                         f"scheduler_config.json, or a diffusers pipeline directory / cached hub id): {err}") from err


def _ems_import(args) -> None:
    from .samplers.ems import load_official_ems

    ems = load_official_ems(args.official, _scheduler_config(args.scheduler), guidance=args.guidance,
                            model=args.model_id)
    file = ems.save(args.out)
    print(f"EMS (shape {list(ems.sample_shape)}, N={ems.num_points}, guidance {args.guidance:g}, lambda "
          f"{ems.lambda_T:.3f}..{ems.lambda_0:.3f}) from {args.official}; wrote {file}")


def _ems_export(args) -> None:
    from .samplers.ems import load_ems, save_official_ems, select_ems_file

    ems = load_ems(select_ems_file(args.ems, args.guidance))
    dtype = "float64" if args.float64 else "float32"
    out = save_official_ems(ems, args.out, dtype)
    print(f"wrote {out}/l.npz and {out}/sb.npz ({dtype}, N={ems.num_points}, guidance {ems.meta.get('guidance')})")


def _eval_fid(args) -> None:
    from .align.evaluate import base_model_name
    from .eval.fid import FID, fid_of_model, get_features, load_image_folder
    from .models.registry import load_model

    base = base_model_name(args.model) if args.model else None  # a `diffalign train` output: its base model
    features_name = args.features or (f"classifier:{base}" if base and base.startswith("builtin:") else None)
    if features_name is None:
        raise ValueError("pass --features (e.g. classifier:builtin:fashion or inception).")
    features = get_features(features_name)
    stats = args.stats
    if stats is None and features_name.startswith("classifier:builtin:"):
        from .models.builtin import weights_dir

        stats = weights_dir(features_name.split(":", 1)[1]) / "fid_stats.safetensors"
    if stats is None:
        raise ValueError("pass --stats (reference statistics from `diffalign eval fid-stats`).")
    on_eval_set = not args.images and (base != args.model or args.eval_set)  # sampled as a trained model is
    if args.teleport and (args.images or on_eval_set):
        raise ValueError("--teleport samples a registry model (builtin:..., reference:digits); drop it for an image "
                         "folder, a `diffalign train` output or --eval-set.")
    if args.default_grid and on_eval_set:
        raise ValueError("a `diffalign train` output (and --eval-set) is sampled with the pipeline's own grid; drop "
                         "--default-grid.")
    if args.images:
        fid = FID(features, device=args.device)
        fid.load_reference(stats)
        fid.add(load_image_folder(args.images, args.num_images))
        result = {"fid": fid.compute(), "images": args.images}
    elif on_eval_set:  # an aligned model (or --eval-set), sampled on evaluate's fixed set
        from .align.evaluate import eval_images

        fid = FID(features, device=args.device)
        fid.load_reference(stats)
        images, _ = eval_images(args.model, args.num_images, args.seed, args.guidance, args.sampler, args.steps,
                                device=args.device, batch_size=args.batch_size)
        fid.add(images)
        result = {"fid": fid.compute(), "model": args.model, "sampler": args.sampler, "steps": args.steps,
                  "num_images": args.num_images, "guidance": args.guidance, "seed": args.seed, "eval_set": True}
    else:
        named = load_model(args.model, device=args.device)
        result = fid_of_model(named, args.sampler, args.steps, args.num_images, features, stats, args.guidance,
                              args.seed, batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                              searched=not args.default_grid, teleport=_teleport_arg(args.teleport))
        result["teleport"] = args.teleport
        result["model"] = args.model
    result.update(features=features_name, reference=str(stats))
    print(f"FID {result['fid']:.4f} ({features_name} features, reference {stats})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _eval_fid_stats(args) -> None:
    from .eval.fid import feature_stats, get_features, load_image_folder, save_stats

    images = load_image_folder(args.images, args.num_images)
    stats = feature_stats(get_features(args.features), images.split(256))
    save_stats(stats, args.out)
    print(f"wrote {args.out} ({int(stats['num_samples'])} images, {stats['mean'].numel()} features)")


def _models(args) -> None:
    from .models.registry import MODELS, load_model

    for name, description in MODELS.items():
        prompts = getattr(load_model(name), "class_names", None)
        print(f"{name:<20} {description}" + (f"\n{'':<20} prompts: {', '.join(prompts)}" if prompts else ""))


def _samplers(args) -> None:
    from .samplers import SAMPLERS

    for name, cls in SAMPLERS.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:<24} {cls.__name__:<28} {doc[0] if doc else ''}")


def _train(args) -> None:
    from .align import config_for, train
    from .align.config import METHOD_CONFIGS, config_yaml

    overrides = list(args.set or [])
    keys = {f.name for f in dataclasses.fields(METHOD_CONFIGS[args.method])}
    for key in ("model", "reward", "max_steps", "max_minutes", "seed", "lr", "guidance", "data"):
        value = getattr(args, key, None)
        if value is None:
            continue
        if key not in keys and not (key == "data" and args.method == "d3po"):
            why = ", which trains on-policy (it samples its own images)" if key == "data" else "; its settings are " \
                f"listed by `diffalign train {args.method} --show-config`"
            raise ValueError(f"--{key.replace('_', '-')} does not apply to {args.method}{why}.")
        if args.method == "d3po" and args.data is not None and key in ("reward", "guidance"):
            raise ValueError(f"--{key} does not apply to D3PO on exported pairs: the labels replace the reward and "
                             "the stored trajectories fix guidance, steps and eta; drop it.")
        if key != "data":
            overrides.append(f"{key}={json.dumps(value)}")
    if args.data is not None and args.method == "d3po":  # an export-pairs directory with its labels.jsonl
        overrides = [f"pairs={json.dumps(args.data)}", f"labels={json.dumps(str(Path(args.data) / 'labels.jsonl'))}",
                     "reward=null", *overrides]
    elif args.data is not None:
        overrides = [f"data={json.dumps(args.data)}", *overrides]
    if args.device is not None:
        overrides.append(f"device={json.dumps(args.device)}")
    cfg = config_for(args.method, args.config, overrides)
    if args.show_config:
        print(config_yaml(cfg, args.method), end="")
        try:
            cfg.check()
        except ValueError as err:  # the keys are still worth seeing; say what training would refuse
            print(f"# training would refuse this config: {err}")
        return
    if args.out is None:
        raise ValueError("diffalign train needs --out, the output directory of the run.")
    out = train(args.method, cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                progress=not args.quiet).out_dir
    print(f"wrote {out} (load it with diffalign.load_pipeline({str(out)!r}))")


def _eval_reward(args) -> None:
    from .align.evaluate import evaluate_reward

    result = evaluate_reward(args.model, args.reward, args.num_images, args.seed, args.guidance, args.sampler,
                             args.steps, prompts=args.prompt, device=args.device or "cpu")
    mean = result["mean"] if isinstance(result["mean"], list) else [result["mean"]]
    std = result["std"] if isinstance(result["std"], list) else [result["std"]]
    print(f"{args.reward} on {args.model}: " + ", ".join(f"{m:.5g} +- {s:.3g}" for m, s in zip(mean, std, strict=True))
          + f" (n={result['n']}, guidance {args.guidance:g})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _data_synth(args) -> None:
    from .align.rewarding import reward_names
    from .align.synth import synthesize

    rewards = reward_names(args.rewards)
    out = synthesize(args.out, args.model or ["builtin:digits"], rewards, args.prompt, args.num_prompts, args.k,
                     args.sampler or ["dpm-solver++"], args.steps, args.guidance, args.seed,
                     device=args.device or "cpu", progress=not args.quiet)
    print(f"wrote {out}/rankings.jsonl; train on it with `diffalign train rankdpo --data {out} --model ...`")


def _export_pairs(args) -> None:
    from .align.methods.d3po import export_pairs

    out = export_pairs(args.model, args.out, args.prompt, args.num_pairs, args.steps, args.eta, args.guidance,
                       args.seed, device=args.device or "cpu", progress=not args.quiet)
    print(f"wrote {args.num_pairs} pairs to {out}; label them in {out}/labels.jsonl, one line per pair: "
          '{"pair": 0, "preferred": 0} (0 or 1, null for a tie), then train with '
          f"`diffalign train d3po --model {args.model} --data {out}`")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffalign", description="Fast diffusion samplers and alignment tools.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample a PNG grid from a model")
    s.add_argument("--model", default="reference:digits")
    s.add_argument("--sampler", default=None, help="default: dpm-solver++ (a distilled student: its own sampler)")
    s.add_argument("--steps", type=int, default=None, help="default: 20 (a distilled student: its own step count)")
    s.add_argument("--guidance", type=float, default=1.0)
    s.add_argument("--prompt", default=None, help="class name or index; omit for unconditional samples")
    s.add_argument("--num-images", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=None, help="images per batch (memory); default: all at once")
    s.add_argument("--default-grid", action="store_true",
                   help="use the model's default time steps even where searched ones are shipped")
    s.add_argument("--teleport", nargs="?", const="shipped", default=None, metavar="FILE",
                   help="replace the first model evaluation by the Gaussian teleport (the model's shipped "
                        "statistics, or this file from `diffalign calibrate teleport`); the sampler then takes --steps "
                        "evaluations on the last points of its default steps + 1-point grid, or of the grid searched "
                        "with the teleport where one is shipped")
    s.add_argument("--out", default="grid.png", help="the grid of all images (PNG, JPEG or WebP)")
    s.add_argument("--out-dir", default=None, help="also write one PNG per image here (names carry prompt and seed)")
    s.add_argument("--json", default=None, help="write per-image metadata (seed, model, file) here")
    s.set_defaults(func=_sample)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="what", required=True)
    bs = bsub.add_parser("samplers", help="sampler error (MSE vs a reference solution) at several NFE")
    _model_arguments(bs, "reference:digits")
    bs.add_argument("--samplers", default="ddim,dpm-solver,dpm-solver++,pndm")
    bs.add_argument("--nfe", default="5,10,20")
    bs.add_argument("--guidance", type=float, default=1.0)
    bs.add_argument("--num-images", type=int, default=16)
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--grids", default="default",
                    help="comma-separated: default (the model's grid), logsnr (uniform in logSNR), ays (Align Your "
                         "Steps' Stable Diffusion timesteps), searched (searched time steps, from --schedules or the "
                         "shipped ones), teleport (the Gaussian teleport, then the default grid's other points), "
                         "teleport-searched (the teleport on a grid searched with it: calibrate timesteps --teleport)")
    bs.add_argument("--teleport", default=None, metavar="FILE",
                    help="teleport statistics for --grids teleport (default: the model's shipped ones)")
    bs.add_argument("--schedules", default=None,
                    help="directory of schedule files <sampler>_g<guidance>.json (_teleport.json with the teleport)")
    bs.add_argument("--json", default=None)
    bs.set_defaults(func=_bench)

    c = sub.add_parser("calibrate", help="offline sampler calibration (DC-Solver ratios, CPR)")
    csub = c.add_subparsers(dest="what", required=True)
    cd = csub.add_parser("dc-solver", help="search DC-Solver's compensation ratios against a ground truth")
    _model_arguments(cd, "reference:digits")
    cd.add_argument("--steps", type=int, required=True, help="number of steps (NFE) to calibrate for")
    cd.add_argument("--guidance", type=float, default=1.0)
    cd.add_argument("--num-datapoints", type=int, default=10)
    cd.add_argument("--out", required=True, help="ratio JSON file (entries for other NFE/guidance are kept)")
    cd.add_argument("--iters", type=int, default=40)
    cd.add_argument("--lr", type=float, default=0.1)
    cd.add_argument("--bound", choices=["none", "tanh"], default="none")
    cd.add_argument("--seed", type=int, default=1, help="noise seed (keep it apart from the benchmark's)")
    cd.add_argument("--config", action="append", metavar="KEY=VALUE", help="scheduler config override (repeatable)")
    cd.set_defaults(func=_calibrate_dc)
    ct = csub.add_parser("timesteps", help="search a sampler's time steps for one model, NFE and guidance")
    _model_arguments(ct, "builtin:fashion")
    ct.add_argument("--sampler", default="dpm-solver++")
    ct.add_argument("--nfe", type=int, required=True, help="model evaluations per sample")
    ct.add_argument("--guidance", type=float, default=1.0)
    ct.add_argument("--out", required=True, help="schedule JSON file (entries for other NFE are kept)")
    ct.add_argument("--minutes", type=float, default=10.0, help="search budget")
    ct.add_argument("--max-evaluations", type=int, default=None,
                    help="also stop after this many grids (a budget independent of the machine's speed)")
    ct.add_argument("--method", choices=["powell", "evolution"], default="powell",
                    help="Powell's local search or differential evolution")
    ct.add_argument("--num-noises", type=int, default=32, help="noises the error is measured on")
    ct.add_argument("--seed", type=int, default=1, help="noise seed (keep it apart from the benchmark's)")
    ct.add_argument("--reference-steps", type=int, default=500,
                    help="steps of the DPM-Solver++(3M) reference solution (fewer for an expensive model)")
    ct.add_argument("--teleport", nargs="?", const="shipped", default=None, metavar="FILE",
                    help="search the grid of a teleported run (NFE + 1 points, the Gaussian teleport over the first "
                         "stretch; the model's shipped statistics, or this file); write it to "
                         "<sampler>_g<guidance>_teleport.json, which `sample --teleport` and `bench samplers --grids "
                         "teleport-searched` read")
    ct.set_defaults(func=_calibrate_timesteps)
    cg = csub.add_parser("teleport", help="fit the Gaussian teleport's statistics (first model evaluation for free)")
    _model_arguments(cg, "builtin:fashion")
    cg.add_argument("--rank", type=int, default=64,
                    help="rank of each covariance, plus an isotropic rest (0: full rank)")
    cg.add_argument("--datapoints", choices=["data", "samples"], default="data",
                    help="the model's data set, or its own samples (50-step DPM-Solver++, no guidance)")
    cg.add_argument("--num-datapoints", type=int, default=60000, help="at most this many (all of a smaller data set)")
    cg.add_argument("--seed", type=int, default=0)
    cg.add_argument("--out", required=True, help="statistics file (safetensors)")
    cg.set_defaults(func=_calibrate_teleport)
    cc = csub.add_parser("cpr", help="fit the cascade polynomial regression to calibrated ratio files")
    cc.add_argument("--inputs", required=True, help="comma-separated ratio JSON files")
    cc.add_argument("--out", required=True)
    cc.set_defaults(func=_calibrate_cpr)

    e = sub.add_parser("ems", help="empirical model statistics (EMS) for dpm-solver-v3")
    esub = e.add_subparsers(dest="what", required=True)
    ec = esub.add_parser("compute", help="estimate the EMS of a model (resumable; writes ems.safetensors + ems.json)")
    _model_arguments(ec, "reference:digits")
    ec.add_argument("--guidance", type=float, default=1.0, help="guided EMS (labels from the datapoints) when != 1")
    ec.add_argument("--num-datapoints", type=int, default=1024, help="K: datapoints per grid point")
    ec.add_argument("--grid", type=int, default=1000, help="N: N + 1 points uniform in lambda")
    ec.add_argument("--datapoints", choices=["data", "samples", "trajectories"], default="data",
                    help="the model's data set or samples of the model at --guidance (50-step DPM-Solver++), "
                         "forward-noised; or the states of the model's ODE at --guidance at each grid point")
    ec.add_argument("--network", choices=["guided", "unconditional"], default="guided",
                    help="guided EMS: differentiate the guided eps, or the unconditional eps at the guided "
                         "datapoints (the paper's Stable Diffusion recipe; half the cost)")
    ec.add_argument("--derivatives", choices=["jvp", "fd", "grid"], default="jvp",
                    help="directional derivatives by forward-mode AD, by central differences (about 2x faster), or "
                         "by central differences over one grid cell in time (for discrete-time UNets)")
    ec.add_argument("--num-probes", type=int, default=1, help="Rademacher probes per datapoint for l")
    ec.add_argument("--batch-size", type=int, default=256, help="datapoints per JVP (memory bound)")
    ec.add_argument("--out", required=True, help="output directory (partial results there are resumed)")
    ec.add_argument("--seed", type=int, default=0)
    ec.set_defaults(func=_ems_compute)
    ei = esub.add_parser("import", help="convert the official code's l.npz / sb.npz into a diffalign EMS directory")
    ei.add_argument("official", help="directory with l.npz and sb.npz (e.g. sd-v1-4/7.5_250_1024)")
    ei.add_argument("--scheduler", required=True,
                    help="the model's schedule: a diffalign model name, a scheduler_config.json, or a diffusers "
                         "pipeline directory / cached hub id")
    ei.add_argument("--guidance", type=float, default=1.0, help="the guidance scale the statistics were made for")
    ei.add_argument("--model-id", default=None, help="model name recorded in the header")
    ei.add_argument("--out", required=True)
    ei.set_defaults(func=_ems_import)
    ex = esub.add_parser("export", help="write an EMS in the official code's l.npz / sb.npz layout")
    ex.add_argument("ems", help="EMS directory or file (a model directory with per-guidance sets: see --guidance)")
    ex.add_argument("--guidance", type=float, default=None, help="pick the set for this guidance scale")
    ex.add_argument("--out", required=True)
    ex.add_argument("--float64", action="store_true",
                    help="write float64 (default float32, which the official sampler requires)")
    ex.set_defaults(func=_ems_export)

    ev = sub.add_parser("eval", help="evaluation (FID)")
    evsub = ev.add_subparsers(dest="what", required=True)
    ef = evsub.add_parser("fid", help="FID of a model+sampler (or an image folder) against reference statistics")
    ef.add_argument("--model", default=None, help="e.g. builtin:fashion")
    ef.add_argument("--sampler", default="dpm-solver++")
    ef.add_argument("--steps", type=int, default=20)
    ef.add_argument("--guidance", type=float, default=1.0)
    ef.add_argument("--num-images", type=int, default=1000)
    ef.add_argument("--seed", type=int, default=0)
    ef.add_argument("--images", default=None, help="a folder of images instead of --model")
    ef.add_argument("--features", default=None, help="classifier:builtin:<model> (default for built-ins) or inception")
    ef.add_argument("--stats", default=None, help="reference statistics (default: the built-in model's)")
    ef.add_argument("--batch-size", type=int, default=250, help="images sampled per batch (memory)")
    ef.add_argument("--default-grid", action="store_true",
                    help="use the model's default time steps even where searched ones are shipped")
    ef.add_argument("--teleport", nargs="?", const="shipped", default=None, metavar="FILE",
                    help="sample with the Gaussian teleport (as `diffalign sample --teleport`)")
    ef.add_argument("--eval-set", action="store_true",
                    help="sample a base model as a `diffalign train` output is sampled (the fixed (prompt, seed) set "
                         "of `eval reward`, the pipeline's own grid): FID before and after training, comparable")
    ef.add_argument("--json", default=None)
    ef.set_defaults(func=_eval_fid)
    er = evsub.add_parser("reward", help="mean reward of a model on a fixed (prompt, seed) set")
    er.add_argument("--model", required=True, help="a built-in, a diffusers directory, or a training output dir")
    er.add_argument("--reward", required=True)
    er.add_argument("--guidance", type=float, default=1.0)
    er.add_argument("--num-images", type=int, default=64)
    er.add_argument("--seed", type=int, default=0)
    er.add_argument("--sampler", default="dpm-solver++")
    er.add_argument("--steps", type=int, default=20)
    er.add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default: every class)")
    er.add_argument("--json", default=None)
    er.set_defaults(func=_eval_reward)
    es = evsub.add_parser("fid-stats", help="reference statistics of a folder of images")
    es.add_argument("--images", required=True)
    es.add_argument("--features", required=True)
    es.add_argument("--num-images", type=int, default=None)
    es.add_argument("--out", required=True)
    es.set_defaults(func=_eval_fid_stats)

    t = sub.add_parser("train", help="preference alignment (writes LoRA weights, config.yaml, metrics.jsonl)")
    t.add_argument("method", choices=["d3po", "ddpo", "diffusion-dpo", "rankdpo", "smpo", "distill-dpo"])
    t.add_argument("--model", default=None, help="the model to fine-tune")
    t.add_argument("--reward", default=None, help="a registered reward (d3po: several joined by ',' are "
                   "Pareto-compared); with --data, the stored scores that rank the images (default: the stored labels)")
    t.add_argument("--data", default=None, help="d3po: an export-pairs directory with labels.jsonl; diffusion-dpo, "
                   "rankdpo, smpo: a preference dataset (pairs.jsonl / rankings.jsonl + images)")
    t.add_argument("--out", default=None, help="output directory (required unless --show-config)")
    t.add_argument("--config", default=None, help="YAML file of config values")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. lora.rank=8")
    t.add_argument("--max-steps", dest="max_steps", type=int, default=None)
    t.add_argument("--max-minutes", dest="max_minutes", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--guidance", type=float, default=None)
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue the run in --out (latest checkpoint, or the checkpoint directory given)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--show-config", action="store_true",
                   help="print the resolved config (every key --set and --config accept) and what training would "
                   "refuse in it, and exit without training")
    t.set_defaults(func=_train)

    al = sub.add_parser("align", help="alignment utilities")
    alsub = al.add_subparsers(dest="what", required=True)
    ap = alsub.add_parser("export-pairs", help="sample D3PO pairs (images + trajectories) for human labelling")
    ap.add_argument("--model", default="builtin:digits")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default: every class)")
    ap.add_argument("--num-pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.set_defaults(func=_export_pairs)

    da = sub.add_parser("data", help="preference datasets")
    dasub = da.add_subparsers(dest="what", required=True)
    ds = dasub.add_parser("synth", help="k images per prompt scored by n rewards: a ranked dataset (resumable)")
    ds.add_argument("--model", action="append", default=None, help="model (repeatable; default builtin:digits)")
    ds.add_argument("--sampler", action="append", default=None, help="sampler (repeatable; default dpm-solver++)")
    ds.add_argument("--rewards", required=True, help="rewards joined by ',' (the ensemble that ranks the images)")
    ds.add_argument("--out", required=True)
    ds.add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default: every class)")
    ds.add_argument("--num-prompts", type=int, default=None, help="rows (prompts cycled; default one per prompt)")
    ds.add_argument("--k", type=int, default=4, help="images per prompt")
    ds.add_argument("--steps", type=int, default=20)
    ds.add_argument("--guidance", type=float, default=1.0)
    ds.add_argument("--seed", type=int, default=0)
    ds.set_defaults(func=_data_synth)

    m = sub.add_parser("models", help="list the available models (and their prompts)")
    m.add_argument("action", choices=["list"])
    m.set_defaults(func=_models)
    sl = sub.add_parser("samplers", help="list the samplers (names for --sampler)")
    sl.add_argument("action", choices=["list"])
    sl.set_defaults(func=_samplers)

    for sp in (s, bs, cd, ct, cg, cc, ec, ef, es, m):
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
    for sp in (t, er, ap, ds):
        sp.add_argument("--device", default=None, help="default: cpu (train: accelerate's choice)")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
    _document(p)
    return p



def _model_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """``--model`` (a registry name, a diffusers pipeline directory or a hub id) and ``--prompt``."""
    parser.add_argument("--model", default=default)
    parser.add_argument("--prompt", action="append", default=None, dest="prompts",
                        help="a text-to-image model's prompt (repeatable; labels cycle through them)")

def _document(parser: argparse.ArgumentParser) -> None:
    """Every option's help shows its default; ``--sampler`` and ``--model`` list the valid names."""
    from .models.registry import MODELS
    from .samplers import SAMPLERS

    samplers = ", ".join(SAMPLERS) + ", or diffusers:<SchedulerClass>"
    models = ", ".join(MODELS) + ", a diffusers directory, a cached hub id, or a training output directory"
    parser.epilog = f"samplers: {samplers}. models: {models}."
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _document(sub)
            continue
        if action.option_strings and action.dest in ("sampler", "model"):
            names = samplers if action.dest == "sampler" else models
            action.help = f"{action.help}; one of: {names}" if action.help else f"one of: {names}"
        documented = action.help and "default" in action.help
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not unset and not documented:
            action.help = f"{action.help or ''} (default: %(default)s)".strip()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _validate(args) -> None:
    """Refuse bad option values before any work starts (one clear error, nothing written)."""
    import math

    guidance = getattr(args, "guidance", None)
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"--guidance must be a finite number >= 0 (1 = no guidance), got {guidance}.")
    for name in ("num_images", "steps", "max_steps", "num_prompts", "num_pairs", "batch_size", "num_datapoints",
                 "grid", "iters", "k"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if getattr(args, "rank", None) is not None and args.rank < 0:
        raise ValueError(f"--rank must be >= 0 (0: full rank), got {args.rank}.")
    nfe = getattr(args, "nfe", None)
    if nfe is not None:
        try:
            values = [int(k) for k in str(nfe).split(",") if k.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise ValueError(f"--nfe must be comma-separated integers >= 1 (e.g. 5,10,20), got {nfe!r}.")
    sampler = getattr(args, "sampler", None)  # one name, or a list (data synth)
    names = (sampler if isinstance(sampler, list) else [sampler]) + (getattr(args, "samplers", None) or "").split(",")
    from .samplers import get_scheduler_class

    for name in filter(None, names):
        get_scheduler_class(name)  # raises naming the valid samplers
    device = getattr(args, "device", None)
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available to this torch build; use --device cpu.")
    files = [("--json", getattr(args, "json", None))]
    if args.command == "sample":
        files.append(("--out", args.out))
        if Path(args.out).suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"--out {args.out}: the grid is an image; use one of {', '.join(IMAGE_SUFFIXES)}.")
    out_dir = getattr(args, "out_dir", None)
    if out_dir and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file; give a directory.")
    for flag, path in files:
        if path and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{flag} {path}: the directory {Path(path).parent} does not exist; create it first.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _validate(args)
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError, FloatingPointError,
            ImportError) as err:
        print(f"diffalign: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    raise SystemExit(main())

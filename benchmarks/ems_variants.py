"""DPM-Solver-v3 with alternative statistics: sampler error of ``dpm-solver-v3`` for several EMS sets.

Each ``--ems label=path`` adds rows for v3 with that EMS (with and without the corrector), each
``--config label=JSON`` a row for v3 with the shipped statistics and those options, beside v3 with the shipped
statistics, its degenerated form and diffusers' DPM-Solver++ / UniPC, from the same noise as
``diffalign bench samplers``. Used to decide what to ship (e.g. EMS of the guided vs the unconditional network,
or of another N / K):

    diffalign ems compute --model reference:digits --guidance 7.5 --datapoints samples --network unconditional \\
        --num-datapoints 512 --grid 200 --out out/ems/ref_uncond_g7.5
    python benchmarks/ems_variants.py --model reference:digits --guidance 7.5 --nfe 5,6,8,10,20 \\
        --ems "uncond-net=out/ems/ref_uncond_g7.5" --json out.json
"""

from __future__ import annotations

import argparse
import json

from diffalign.eval.sampler_bench import bench_samplers, report
from diffalign.models.registry import load_model


def variants(sets: dict[str, str]) -> dict[str, tuple[str, dict]]:
    """``label -> (sampler, config)``: each EMS set with the corrector on and off, plus degenerated statistics."""
    out = {"dpm-solver-v3 degenerated": ("dpm-solver-v3", {"degenerated": True})}
    for label, path in sets.items():
        out[f"dpm-solver-v3 {label}"] = ("dpm-solver-v3", {"ems_path": path, "use_corrector": True})
        out[f"dpm-solver-v3 {label} no corrector"] = ("dpm-solver-v3", {"ems_path": path, "use_corrector": False})
    return out


def config_variants(configs: dict[str, str]) -> dict[str, tuple[str, dict]]:
    """``label -> (sampler, config)`` for v3 with the shipped statistics and JSON-given options."""
    return {f"dpm-solver-v3 {label}": ("dpm-solver-v3", json.loads(text)) for label, text in configs.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reference:digits")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--nfe", default="5,6,8,10,20")
    p.add_argument("--ems", action="append", default=[], help="label=path of an EMS directory or file (repeatable)")
    p.add_argument("--config", action="append", default=[],
                   help='label=JSON options for v3 with the shipped statistics, e.g. \'order-2={"solver_order": 2}\'')
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sets = dict(item.rsplit("=", 1) for item in args.ems)
    configs = dict(item.split("=", 1) for item in args.config)
    records = bench_samplers(load_model(args.model), ["dpm-solver-v3"], [int(k) for k in args.nfe.split(",")],
                             guidance=args.guidance, num_images=args.num_images,
                             variants={**variants(sets), **config_variants(configs)})
    report(records, args.json, title=f"{args.model}, guidance {args.guidance:g}")


if __name__ == "__main__":
    main()

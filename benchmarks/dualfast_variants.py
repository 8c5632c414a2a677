"""DualFast sensitivity: sampler error of ``dualfast:<base>`` for several schedules and readings of the method.

The paper's exact reference prediction and coefficient schedule could not be checked (see
:mod:`diffalign.samplers.dualfast`), so this measures the candidates side by side, from the same noise as
``diffalign bench samplers``: the coefficient schedule (``first-order``, diffalign's default: the paper's ramp on
first-order bases, none on higher-order ones; ``linear``, the paper's reading c_i = scale * i / (N - 1);
``step-scaled``, the ramp times (h_i / H)^(p - 1)), its final value ``scale``, the reference prediction
(``previous`` evaluation or the ``first`` one, at x_T) and the space the predictions are mixed in (``eps`` or
``x0``). The defaults compare the schedules at c = 0.15 (docs/verification.md, DualFast); the earlier sweep of the
paper's reading is

    python benchmarks/dualfast_variants.py --model builtin:digits --schedules linear --scales 0.15,0.5,1 \\
        --references previous,first --spaces eps,x0
"""

from __future__ import annotations

import argparse

from diffalign.eval.sampler_bench import bench_samplers, report
from diffalign.models.registry import load_model


def variants(bases: list[str], scales: list[float], references: list[str], spaces: list[str],
             schedules: tuple[str, ...] = ("linear",)) -> dict[str, tuple[str, dict]]:
    """``label -> (sampler, config)`` for every base x schedule x space x reference x scale."""
    return {f"dualfast:{b} {sc} {sp} {ref} c={c:g}": (f"dualfast:{b}", {
        "dualfast_schedule": sc, "dualfast_scale": c, "dualfast_reference": ref, "dualfast_space": sp})
            for b in bases for sc in schedules for sp in spaces for ref in references for c in scales}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reference:digits")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--nfe", default="5,6,8,10")
    p.add_argument("--bases", default="ddim,dpm-solver++,unipc")
    p.add_argument("--schedules", default="first-order,linear,step-scaled")
    p.add_argument("--scales", default="0.15")
    p.add_argument("--references", default="previous")
    p.add_argument("--spaces", default="eps")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bases = args.bases.split(",")
    table = variants(bases, [float(c) for c in args.scales.split(",")], args.references.split(","),
                     args.spaces.split(","), tuple(args.schedules.split(",")))
    records = bench_samplers(load_model(args.model), bases, [int(k) for k in args.nfe.split(",")],
                             guidance=args.guidance, num_images=args.num_images, seed=args.seed, variants=table)
    report(records, args.json, title=f"{args.model}, guidance {args.guidance:g}, seed {args.seed}")


if __name__ == "__main__":
    main()

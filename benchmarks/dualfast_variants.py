"""DualFast sensitivity: sampler error of ``dualfast:<base>`` for several readings of the method.

The paper's exact reference prediction and coefficient schedule could not be checked (see
:mod:`diffalign.samplers.dualfast`), so this measures the candidates side by side, from the same noise as
``diffalign bench samplers``: the reference prediction (``previous`` evaluation or the ``first`` one, at x_T) and
the final coefficient of the linear ramp c_i = scale * i / (N - 1), and the space the predictions are mixed in
(``eps`` or ``x0``).

    python benchmarks/dualfast_variants.py --model reference:digits --guidance 1 --nfe 5,10 --json out.json
"""

from __future__ import annotations

import argparse

from diffalign.eval.sampler_bench import bench_samplers, report
from diffalign.models.registry import load_model


def variants(bases: list[str], scales: list[float], references: list[str],
             spaces: list[str]) -> dict[str, tuple[str, dict]]:
    """``label -> (sampler, config)`` for every base x space x reference x scale."""
    return {f"dualfast:{b} {sp} {ref} c={c:g}": (f"dualfast:{b}", {"dualfast_scale": c, "dualfast_reference": ref,
                                                                   "dualfast_space": sp})
            for b in bases for sp in spaces for ref in references for c in scales}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reference:digits")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--nfe", default="5,10")
    p.add_argument("--bases", default="ddim,dpm-solver++,unipc")
    p.add_argument("--scales", default="0.15,0.5,1")
    p.add_argument("--references", default="previous,first")
    p.add_argument("--spaces", default="eps,x0")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bases = args.bases.split(",")
    table = variants(bases, [float(c) for c in args.scales.split(",")], args.references.split(","),
                     args.spaces.split(","))
    records = bench_samplers(load_model(args.model), bases, [int(k) for k in args.nfe.split(",")],
                             guidance=args.guidance, num_images=args.num_images, variants=table)
    report(records, args.json, title=f"{args.model}, guidance {args.guidance:g}")


if __name__ == "__main__":
    main()

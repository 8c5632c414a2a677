"""DDIM inversion with and without ReNoise averaging: invert model samples to t = 999 and sample back with the same
grid; the reconstruction MSE (of the clean latents) at several step counts.

    python benchmarks/inversion.py --model builtin:fashion --json benchmarks/results/inversion_fashion.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:fashion")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--steps", default="5,10,20")
    p.add_argument("--renoise", default="0,1,2", help="ReNoise iterations per step (0: plain DDIM inversion)")
    p.add_argument("--t", type=int, default=999, help="the timestep inverted to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import diffalign
    from diffalign.align import Policy
    from diffalign.align.inversion import ddim_denoise, invert

    policy = Policy(diffalign.load_pipeline(args.model))
    names = policy.training_prompts(None)
    cond = policy.encode([names[i % len(names)] for i in range(args.num_images)])
    z = torch.randn((args.num_images, *policy.latent_shape), generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for n in [int(s) for s in args.steps.split(",")]:
        x0 = ddim_denoise(policy, z, cond, args.t, n)  # a sample of the model on the same grid
        for r in [int(s) for s in args.renoise.split(",")]:
            t0 = time.perf_counter()
            back = ddim_denoise(policy, invert(policy, x0, cond, args.t, n, renoise=r), cond, args.t, n)
            rows.append({"steps": n, "renoise": r, "mse": float(((back - x0) ** 2).mean()),
                         "model_calls": n * (r + 1), "seconds": time.perf_counter() - t0})
    print(f"{'steps':>6}{'renoise':>9}{'calls':>7}{'recon MSE':>12}")
    for row in rows:
        print(f"{row['steps']:>6}{row['renoise']:>9}{row['model_calls']:>7}{row['mse']:>12.4g}")
    record = {"model": args.model, "num_images": args.num_images, "t": args.t, "seed": args.seed, "rows": rows,
              "command": "python benchmarks/inversion.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()

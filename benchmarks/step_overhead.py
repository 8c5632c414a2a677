"""Per-step scheduler overhead (time inside ``scheduler.step``) on an SD-sized latent, vs diffusers.

    python benchmarks/step_overhead.py --batch 1 --steps 20 --repeats 20 --json benchmarks/results/step_overhead.json

The model is replaced by a fixed random tensor, so only the scheduler's own work is timed. Reports the median
over repeats of the mean step time of a full trajectory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffalign.samplers import make_scheduler

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
DEFAULT = "ddim,dpm-solver,dpm-solver++,pndm,diffusers:DPMSolverMultistepScheduler,diffusers:UniPCMultistepScheduler"


def time_steps(name: str, shape: tuple[int, ...], steps: int, repeats: int) -> float:
    """Median over repeats of the mean time per ``step()`` call, in microseconds."""
    sched = make_scheduler(name, SD_CONFIG)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=gen)
    out = torch.randn(shape, generator=gen) * 0.1
    means = []
    for _ in range(repeats + 1):
        sched.set_timesteps(steps)
        x, elapsed = x_T, 0.0
        for t in sched.timesteps:
            t0 = time.perf_counter()
            x = sched.step(out, t, x).prev_sample
            elapsed += time.perf_counter() - t0
        means.append(1e6 * elapsed / len(sched.timesteps))
    return statistics.median(means[1:])  # the first run warms up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samplers", default=DEFAULT)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.batch, 4, 64, 64)
    rows = {name: time_steps(name, shape, args.steps, args.repeats) for name in args.samplers.split(",")}
    ref = rows.get("diffusers:DPMSolverMultistepScheduler")
    print(f"step() overhead, latent {shape}, {args.steps} steps, torch threads {args.threads}")
    print(f"{'sampler':<42}{'us/step':>10}{'vs diffusers DPM++':>20}")
    for name, us in rows.items():
        print(f"{name:<42}{us:>10.1f}{(us / ref if ref else float('nan')):>20.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"shape": shape, "steps": args.steps, "us_per_step": rows}, indent=2))
    if args.plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh(list(rows), list(rows.values()))
        ax.set_xlabel("microseconds per step()")
        fig.tight_layout()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()

"""Where along the sampling trajectory does an aligned model gain its reward, and its FID?

Samples the fixed evaluation set with the aligned model (a checkpoint or output directory) for only part of the
sampler's steps and the base model for the rest: ``early:N`` uses the aligned model for the first N steps,
``late:N`` for the last N. For each split it prints (and writes with ``--json``) the reward gain in base-model
standard deviations on ``--eval-images`` images and FID / base FID on ``--fid-images`` images, with the alignment
benchmark's evaluation set (seed, prompts, DPM-Solver++).

    python benchmarks/align_gate.py --checkpoint runs/dpo_jpeg_kl100_extremes/checkpoints/step-000440 \\
        --reward jpeg_compressibility --splits late:14,late:10,late:6,early:6,early:10,early:14
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


class Gated:
    """The base policy, except that its noise prediction comes from ``aligned`` at the ``timesteps`` given."""

    def __init__(self, base, aligned, timesteps: set[int]):
        self.base, self.aligned, self.timesteps = base, aligned, timesteps

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        return (self.aligned if int(t) in self.timesteps else self.base).predict(x, t, cond, guidance)


@torch.no_grad()
def sample(base, aligned, split: str, n: int, seed: int, sampler: str, steps: int, guidance: float) -> tuple:
    """Images of the evaluation set with ``aligned`` on the steps ``split`` names and ``base`` on the others."""
    from diffalign.align.evaluate import eval_set
    from diffalign.align.trajectory import generate
    from diffalign.samplers import make_scheduler

    side, k = split.split(":")
    sched = make_scheduler(sampler, base.pipe.scheduler.config)
    sched.set_timesteps(steps)
    timesteps = [int(t) for t in sched.timesteps]
    on = set(timesteps[:int(k)] if side == "early" else timesteps[steps - int(k):])
    chosen, x_T, gen = eval_set(base, n, seed)
    return generate(Gated(base, aligned, on), chosen, x_T, sampler, steps, guidance, generator=gen), chosen


def main(argv: list[str] | None = None) -> list[dict]:
    from diffalign.align.evaluate import base_model_name, shipped_fid
    from diffalign.align.policy import Policy
    from diffalign.align.rewarding import build_reward, score
    from diffalign.pipelines.class_conditional import load_pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a training checkpoint or output directory")
    p.add_argument("--reward", default="jpeg_compressibility")
    p.add_argument("--splits", default="late:14,late:10,late:6,early:6,early:10,early:14",
                   help="comma-separated early:N / late:N (N of --steps); full:0 for the aligned model alone")
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--fid-images", type=int, default=1000)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--sampler", default="dpm-solver++")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    splits = [s.replace("full:0", f"early:{args.steps}") for s in args.splits.split(",")]
    for s in splits:
        side, _, k = s.partition(":")
        if side not in ("early", "late") or not k.isdigit() or int(k) > args.steps:
            p.error(f"--splits: {s!r} is not early:N, late:N (N <= --steps {args.steps}) or full:0.")

    model = base_model_name(args.checkpoint)
    base, aligned = Policy(load_pipeline(model)), Policy(load_pipeline(args.checkpoint))
    reward = build_reward(args.reward, model)
    ev = (args.eval_seed, args.sampler, args.steps, args.guidance)

    def measure(policy, split):
        images, chosen = sample(base, policy, split, args.eval_images, *ev)
        values = score(reward, images, chosen)[:, 0]
        fid = shipped_fid(model)
        fid.add(sample(base, policy, split, args.fid_images, *ev)[0])
        return values, fid.compute()

    base_values, base_fid = measure(base, "early:0")
    rows = []
    for split in splits:
        values, fid = measure(aligned, split)
        rows.append({"split": split, "gain_sd": float((values.mean() - base_values.mean()) / base_values.std()),
                     "fid": fid, "fid_ratio": fid / base_fid})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{'split':>10} | gain (base sd) | FID / base")
    for r in rows:
        print(f"{r['split']:>10} | {r['gain_sd']:+14.2f} | {r['fid_ratio']:9.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": args.checkpoint, "reward": args.reward, "base_fid": base_fid,
                                         "command": " ".join(["python", *sys.argv]), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

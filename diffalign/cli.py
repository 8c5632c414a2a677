"""The ``diffalign`` command line: argument parsing and progress bars only; the work is in library functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _sample(args) -> None:
    from .models.registry import load_model
    from .sampling import sample_images, save_grid

    named = load_model(args.model, device=args.device)
    label = named.prompt_to_label(args.prompt) if args.prompt is not None else None
    images = sample_images(named, args.sampler, args.steps, args.num_images, label, args.guidance, args.seed,
                           device=args.device, progress=not args.quiet)
    save_grid(images, args.out, title=f"{args.model} | {args.sampler} {args.steps} steps | g={args.guidance}")
    meta = [{"index": i, "seed": args.seed, "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
             "prompt": args.prompt} for i in range(len(images))]
    if args.json:
        Path(args.json).write_text(json.dumps(meta, indent=2))
    print(f"wrote {args.out} ({len(images)} images)")


def _bench(args) -> None:
    from .eval.sampler_bench import bench_samplers, format_table
    from .models.registry import load_model

    named = load_model(args.model, device=args.device)
    records = bench_samplers(named, [s for s in args.samplers.split(",") if s], [int(k) for k in args.nfe.split(",")],
                             guidance=args.guidance, num_images=args.num_images, seed=args.seed, device=args.device,
                             progress=not args.quiet)
    print(format_table(records))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in records], indent=2))
        print(f"wrote {args.json}")


def _models(args) -> None:
    from .models.registry import MODELS

    for name, description in MODELS.items():
        print(f"{name:<20} {description}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffalign", description="Fast diffusion samplers and alignment tools.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample a PNG grid from a model")
    s.add_argument("--model", default="reference:digits")
    s.add_argument("--sampler", default="dpm-solver++")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=1.0)
    s.add_argument("--prompt", default=None, help="class name or index; omit for unconditional samples")
    s.add_argument("--num-images", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="grid.png")
    s.add_argument("--json", default=None, help="write per-image metadata here")
    s.set_defaults(func=_sample)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="what", required=True)
    bs = bsub.add_parser("samplers", help="sampler error (MSE vs a reference solution) at several NFE")
    bs.add_argument("--model", default="reference:digits")
    bs.add_argument("--samplers", default="ddim,dpm-solver,dpm-solver++,pndm")
    bs.add_argument("--nfe", default="5,10,20")
    bs.add_argument("--guidance", type=float, default=1.0)
    bs.add_argument("--num-images", type=int, default=16)
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--json", default=None)
    bs.set_defaults(func=_bench)

    m = sub.add_parser("models", help="list the available models")
    m.add_argument("action", choices=["list"])
    m.set_defaults(func=_models)

    for sp in (s, bs, m):
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"diffalign: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    raise SystemExit(main())

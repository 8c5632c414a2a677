"""Alignment benchmark: train a method for a fixed wall-clock budget, then measure the eval reward of every
checkpoint (against wall time and images seen) and FID before / after on the shipped classifier's features.

    python benchmarks/align.py --model builtin:fashion --reward jpeg_compressibility --minutes 15 --lr 1e-4 \\
        --out runs/fashion_jpeg --json benchmarks/results/align_fashion_jpeg.json

Writes the JSON record, a PNG of the reward curves (``--json`` with .png) and before / after image grids. With
``--skip-train`` it evaluates an existing run directory.
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
    p.add_argument("--method", default="d3po")
    p.add_argument("--model", default="builtin:fashion")
    p.add_argument("--reward", default="jpeg_compressibility")
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--guidance", type=float, default=1.0, help="training and evaluation guidance")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--checkpoint-every", type=int, default=15)
    p.add_argument("--checkpoint-minutes", type=float, default=None, help="checkpoint by wall time instead")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--skip-train", action="store_true", help="evaluate the run already in --out")
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--eval-seed", type=int, default=1234, help="held-out (prompt, seed) set")
    p.add_argument("--eval-sampler", default="dpm-solver++")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--fid-images", type=int, default=1000)
    p.add_argument("--fid-every", type=int, default=0, help="also FID at every k-th checkpoint (0: base and final)")
    p.add_argument("--kl-images", type=int, default=16, help="trajectories for each checkpoint's KL to the base")
    p.add_argument("--quality-reward", default="prompt_following", help="also tracked, as a quality check")
    p.add_argument("--base-fid", type=float, default=None, help="the base model's FID (same settings), if known")
    p.add_argument("--fid-bound", type=float, default=2.0,
                   help="report the best checkpoint whose FID is within this factor of the base model's")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    from diffalign.align import config_for, list_checkpoints, read_metrics, train
    from diffalign.align.evaluate import eval_images, evaluate_fid, evaluate_kl, evaluate_rewards
    from diffalign.sampling import save_grid

    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out)
    overrides = [f"model={json.dumps(args.model)}", f"reward={json.dumps(args.reward)}", f"lr={args.lr}",
                 f"guidance={args.guidance}", f"max_minutes={args.minutes}", "max_steps=1000000",
                 f"checkpoint_every={0 if args.checkpoint_minutes else args.checkpoint_every}",
                 f"checkpoint_minutes={json.dumps(args.checkpoint_minutes)}", "keep_checkpoints=100000", *args.set]
    cfg = config_for(args.method, overrides=overrides)
    if not args.skip_train:
        train(args.method, cfg, out, overwrite=True)
    metrics = read_metrics(out / "metrics.jsonl")
    by_step = {m["step"]: m for m in metrics}
    ev = {"num_images": args.eval_images, "seed": args.eval_seed, "guidance": args.guidance,
          "sampler": args.eval_sampler, "steps": args.eval_steps}
    t0 = time.perf_counter()

    def rewards(model: str) -> dict:
        res = evaluate_rewards(model, list(dict.fromkeys([args.reward, args.quality_reward])), **ev)
        r, q = res[args.reward], res[args.quality_reward]
        return {"reward_mean": r["mean"], "reward_std": r["std"], "quality_mean": q["mean"]}

    base = {**rewards(args.model), "step": 0, "wall_s": 0.0, "images_seen": 0}
    curve = [base]
    def fid(model: str) -> float:
        return evaluate_fid(model, args.fid_images, args.eval_seed, args.guidance, args.eval_sampler,
                            args.eval_steps)

    checkpoints = list_checkpoints(out)
    for k, (step, ckpt) in enumerate(checkpoints, 1):
        curve.append({**rewards(str(ckpt)), "step": step, "wall_s": by_step[step]["wall_s"],
                      "images_seen": by_step[step]["images_seen"],
                      "kl": evaluate_kl(str(ckpt), args.kl_images, args.eval_seed, args.guidance)})
        if args.fid_every and k % args.fid_every == 0 and k != len(checkpoints):
            curve[-1]["fid"] = fid(str(ckpt))
        print(f"step {step}: reward {curve[-1]['reward_mean']:.4f}, {args.quality_reward} "
              f"{curve[-1]['quality_mean']:.3f}, KL {curve[-1]['kl']:.2e}"
              + (f", FID {curve[-1]['fid']:.3f}" if "fid" in curve[-1] else ""),
              flush=True)
    fid_base = args.base_fid if args.base_fid is not None else fid(args.model)
    fid_final = fid(str(out))
    curve[0]["fid"], curve[-1]["fid"] = fid_base, fid_final
    final = curve[-1]
    def gain(point: dict) -> float:  # the reward's change in standard deviations of the base model's reward
        return (point["reward_mean"] - base["reward_mean"]) / base["reward_std"]

    bounded = [c for c in curve if c.get("fid") is not None and c["fid"] <= args.fid_bound * fid_base]
    best = max(bounded, key=gain)
    record = {
        "method": args.method, "model": args.model, "reward": args.reward, "minutes": args.minutes,
        "config": {k: v for k, v in json.loads(json.dumps(cfg.__dict__, default=lambda o: o.__dict__)).items()},
        "eval": ev, "quality_reward": args.quality_reward, "curve": curve,
        "base": {**base, "fid": fid_base}, "final": {**final, "fid": fid_final},
        "reward_gain_in_base_sd": gain(final),
        "fid_ratio": fid_final / fid_base, "optimizer_steps": metrics[-1]["step"],
        "fid_bound": args.fid_bound,
        "best_within_fid_bound": {"step": best["step"], "wall_s": best["wall_s"], "fid_ratio": best["fid"] / fid_base,
                                  "reward_gain_in_base_sd": gain(best)},
        "train_wall_s": metrics[-1]["wall_s"], "eval_seconds": time.perf_counter() - t0,
        "command": "python benchmarks/align.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    plot(record, Path(args.json).with_suffix(".png"))
    for tag, model in (("before", args.model), ("after", str(out))):
        images, _ = eval_images(model, 20, args.eval_seed, args.guidance, args.eval_sampler, args.eval_steps)
        save_grid(images, str(Path(args.json).with_name(Path(args.json).stem + f"_{tag}.png")),
                  title=f"{tag}: {args.reward} {base['reward_mean'] if tag == 'before' else final['reward_mean']:.3f}")
    print(f"{args.reward}: {base['reward_mean']:.4f} -> {final['reward_mean']:.4f} "
          f"({record['reward_gain_in_base_sd']:+.2f} base sd) in {record['train_wall_s'] / 60:.1f} min; "
          f"FID {fid_base:.3f} -> {fid_final:.3f} ({record['fid_ratio']:.2f}x); {args.quality_reward} "
          f"{base['quality_mean']:.3f} -> {final['quality_mean']:.3f}")
    b = record["best_within_fid_bound"]
    print(f"best checkpoint with FID within {args.fid_bound:g}x: step {b['step']} ({b['wall_s'] / 60:.1f} min), "
          f"{b['reward_gain_in_base_sd']:+.2f} base sd, FID {b['fid_ratio']:.2f}x")
    return record


def plot(record: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, base = record["curve"], record["base"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, label in ((axes[0], "wall_s", "training wall time (min)"), (axes[1], "images_seen", "images seen")):
        xs = [c[key] / (60 if key == "wall_s" else 1) for c in curve]
        ax.plot(xs, [c["reward_mean"] for c in curve], marker=".")
        ax.axhspan(base["reward_mean"] - base["reward_std"], base["reward_mean"] + base["reward_std"], alpha=0.15,
                   label="base mean +- 1 sd")
        ax.set_xlabel(label)
        ax.set_ylabel(f"eval {record['reward']}")
        ax.legend(fontsize=7)
    axes[2].plot([c["wall_s"] / 60 for c in curve], [c["quality_mean"] for c in curve], marker=".", color="C2")
    axes[2].set_xlabel("training wall time (min)")
    axes[2].set_ylabel(record["quality_reward"], color="C2")
    fids = [(c["wall_s"] / 60, c["fid"] / base["fid"]) for c in curve if c.get("fid") is not None]
    twin = axes[2].twinx()
    twin.plot([f[0] for f in fids], [f[1] for f in fids], marker="s", color="C3")
    twin.axhline(2.0, color="C3", lw=0.8, ls="--")
    twin.set_ylabel("FID / base FID", color="C3")
    fig.suptitle(f"{record['method']} on {record['model']}: FID {record['base']['fid']:.2f} -> "
                 f"{record['final']['fid']:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""The DPO family side by side: Diffusion-DPO, RankDPO and SmPO trained on one synthetic ranked dataset (the same
prompts, images and reward calls) for the same wall time, once per target reward; each run is evaluated by
``benchmarks/align.py`` (eval reward of every checkpoint, FID before / after).

    python benchmarks/align_dpo.py --model builtin:fashion --data runs/synth_fashion --minutes 8 \\
        --rewards prompt_following,jpeg_compressibility --out runs/dpo --json benchmarks/results/align_dpo_fashion.json

The dataset comes from ``diffalign data synth --model builtin:fashion --rewards prompt_following,jpeg_compressibility
--num-prompts 600 --k 4 --out runs/synth_fashion``; each run ranks it by its target reward's scores alone. Prints
the comparison table and writes the JSON summary and a PNG of the reward curves (per-run records beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import align  # noqa: E402  (benchmarks/align.py)


def first_time(curve: list[dict], base: dict, sd: float) -> float | None:
    """Training minutes until the eval reward first reaches base + sd base standard deviations."""
    for c in curve[1:]:
        if (c["reward_mean"] - base["reward_mean"]) / base["reward_std"] >= sd:
            return c["wall_s"] / 60
    return None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:fashion")
    p.add_argument("--data", required=True, help="a ranked dataset (diffalign data synth) scored by every reward")
    p.add_argument("--rewards", default="prompt_following,jpeg_compressibility")
    p.add_argument("--methods", default="diffusion-dpo,rankdpo,smpo")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a config override for one method (or for all without 'METHOD:')")
    p.add_argument("--checkpoint-minutes", type=float, default=1.0)
    p.add_argument("--fid-images", type=int, default=1000)
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--kl-images", type=int, default=16, help="trajectories for each checkpoint's KL to the base")
    p.add_argument("--out", required=True)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    from diffalign.align.evaluate import evaluate_fid

    base_fid = evaluate_fid(args.model, args.fid_images, 1234, 1.0, "dpm-solver++", 20)
    results = {}
    for reward in args.rewards.split(","):
        for method in args.methods.split(","):
            sets = [s.split(":", 1)[-1] for s in args.set if ":" not in s.split("=")[0] or s.startswith(method + ":")]
            record_path = Path(args.json).with_name(f"{Path(args.json).stem}_{method}_{reward}.json")
            run_args = ["--method", method, "--model", args.model, "--reward", reward, "--minutes", str(args.minutes),
                        "--lr", str(args.lr), "--guidance", "1", "--set", f"data={json.dumps(args.data)}",
                        "--checkpoint-minutes", str(args.checkpoint_minutes), "--out", f"{args.out}/{method}_{reward}",
                        "--fid-images", str(args.fid_images), "--eval-images", str(args.eval_images),
                        "--kl-images", str(args.kl_images),
                        "--base-fid", str(base_fid), "--json", str(record_path)]
            for s in sets:
                run_args += ["--set", s]
            if method == "smpo":  # the authors' PickScore normalisation does not fit these rewards: the data's range
                run_args += ["--set", "score_low=null", "--set", "score_high=null"]
            print(f"== {method} / {reward}", flush=True)
            results[f"{method}/{reward}"] = align.main(run_args)

    rows = []
    for key, rec in results.items():
        method, reward = key.split("/")
        rows.append({"method": method, "reward": reward, "gain_sd": rec["reward_gain_in_base_sd"],
                     "fid_ratio": rec["fid_ratio"], "steps": rec["optimizer_steps"],
                     "minutes": rec["train_wall_s"] / 60, "min_to_0.5sd": first_time(rec["curve"], rec["base"], 0.5),
                     "min_to_1sd": first_time(rec["curve"], rec["base"], 1.0),
                     "images_seen": rec["curve"][-1]["images_seen"]})
    print(f"\n{'reward':<22}{'method':<15}{'gain (sd)':>10}{'FID x':>8}{'steps':>7}{'images':>8}{'min->0.5sd':>11}"
          f"{'min->1sd':>9}")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{r['reward']:<22}{r['method']:<15}{r['gain_sd']:>+10.2f}{r['fid_ratio']:>8.2f}{r['steps']:>7}"
              f"{r['images_seen']:>8}{fmt(r['min_to_0.5sd']):>11}{fmt(r['min_to_1sd']):>9}")
    summary = {"model": args.model, "data": args.data, "minutes": args.minutes, "lr": args.lr, "base_fid": base_fid,
               "rows": rows, "command": "python benchmarks/align_dpo.py " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv)}
    Path(args.json).write_text(json.dumps(summary, indent=1))
    plot(results, Path(args.json).with_suffix(".png"))
    return summary


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = list(dict.fromkeys(k.split("/")[1] for k in results))
    fig, axes = plt.subplots(1, len(rewards), figsize=(5 * len(rewards), 3.4), squeeze=False)
    for ax, reward in zip(axes[0], rewards, strict=True):
        for key, rec in results.items():
            method, r = key.split("/")
            if r != reward:
                continue
            base = rec["base"]
            ax.plot([c["wall_s"] / 60 for c in rec["curve"]],
                    [(c["reward_mean"] - base["reward_mean"]) / base["reward_std"] for c in rec["curve"]],
                    marker=".", label=f"{method} (FID x{rec['fid_ratio']:.2f})")
        ax.axhline(1.0, color="k", lw=0.7, ls="--")
        ax.set(xlabel="training wall time (min)", ylabel="eval reward gain (base sd)", title=reward)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

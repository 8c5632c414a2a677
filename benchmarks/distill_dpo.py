"""Distillation-DPO on a shipped model: the few-step student against the teacher.

    python benchmarks/distill_dpo.py --model builtin:fashion --reward jpeg_compressibility --minutes 40 \\
        --out runs/distill --json benchmarks/results/distill_dpo_fashion.json

Measures, on one held-out (prompt, seed) set at guidance 1 (FID: shipped classifier features, ``--fid-images``):

* the teacher at the student's step count with every diffalign sampler (the best is the baseline), and the teacher's
  FID against steps with the best sampler (the curve that gives the speed-up at equal FID; 20 steps is the ceiling);
* the student (deterministic DDIM on its trailing grid) at every checkpoint: FID and the target reward;
* before / after image grids, the JSON record and a PNG of the curves.
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
    p.add_argument("--reward", default="jpeg_compressibility")
    p.add_argument("--minutes", type=float, default=40.0)
    p.add_argument("--student-steps", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--samplers", default="ddim,dpm-solver++,unipc,dpm-solver-v3,dc-solver")
    p.add_argument("--teacher-steps", default="4,6,8,10,12,16,20")
    p.add_argument("--fid-images", type=int, default=1000)
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--out", required=True)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    from diffalign.align import config_for, list_checkpoints, read_metrics, train
    from diffalign.align.evaluate import eval_images, evaluate_fid, evaluate_reward
    from diffalign.sampling import save_grid

    k = args.student_steps
    out = Path(args.out)
    cfg = config_for("distill-dpo", overrides=[
        f"model={json.dumps(args.model)}", f"reward={json.dumps(args.reward)}", f"student_steps={k}",
        f"max_minutes={args.minutes}", "max_steps=10000000", "checkpoint_every=0",
        f"checkpoint_minutes={args.checkpoint_minutes}", "keep_checkpoints=100000", *args.set])
    if not args.skip_train:
        train("distill-dpo", cfg, out, overwrite=True)
    metrics = read_metrics(out / "metrics.jsonl")
    by_step = {m["step"]: m for m in metrics}
    t0 = time.perf_counter()

    def measure(model: str, sampler: str, steps: int) -> dict:
        fid = evaluate_fid(model, args.fid_images, args.eval_seed, 1.0, sampler, steps)
        r = evaluate_reward(model, args.reward, args.eval_images, args.eval_seed, 1.0, sampler, steps)
        row = {"sampler": sampler, "steps": steps, "fid": fid, "reward": r["mean"], "reward_std": r["std"]}
        print(f"{model} {sampler} {steps} steps: FID {fid:.3f}, {args.reward} {r['mean']:.4f}", flush=True)
        return row

    teacher_at_k = []
    for sampler in args.samplers.split(","):
        try:
            teacher_at_k.append(measure(args.model, sampler, k))
        except (ValueError, FileNotFoundError) as err:  # a sampler that cannot run at k steps on this model
            teacher_at_k.append({"sampler": sampler, "steps": k, "error": str(err)})
            print(f"{sampler}: {err}", flush=True)
    best = min((r for r in teacher_at_k if "fid" in r), key=lambda r: r["fid"])
    curve = [measure(args.model, best["sampler"], n) for n in map(int, args.teacher_steps.split(",")) if n != k]
    teacher_curve = sorted(curve + [best], key=lambda r: r["steps"])
    student = []
    for step, ckpt in list_checkpoints(out):
        student.append({**measure(str(ckpt), "ddim", k), "step": step, "wall_s": by_step[step]["wall_s"]})
    final = {**measure(str(out), "ddim", k), "step": metrics[-1]["step"], "wall_s": metrics[-1]["wall_s"]}
    # the teacher steps that reach the student's FID (linear interpolation on the teacher's curve)
    equal = None
    for a, b in zip(teacher_curve, teacher_curve[1:], strict=False):
        if a["fid"] >= final["fid"] >= b["fid"]:
            frac = (a["fid"] - final["fid"]) / max(a["fid"] - b["fid"], 1e-12)
            equal = a["steps"] + frac * (b["steps"] - a["steps"])
            break
    record = {
        "model": args.model, "reward": args.reward, "student_steps": k, "minutes": args.minutes,
        "config": json.loads(json.dumps(cfg.__dict__, default=lambda o: o.__dict__)),
        "fid_images": args.fid_images, "eval_images": args.eval_images, "eval_seed": args.eval_seed,
        "teacher_at_student_steps": teacher_at_k, "best_sampler": best["sampler"], "teacher_curve": teacher_curve,
        "student_curve": student, "student": final,
        "teacher_20": next((r for r in teacher_curve if r["steps"] == 20), None),
        "teacher_steps_at_student_fid": equal, "speedup_at_equal_fid": None if equal is None else equal / k,
        "fid_below_best_teacher": final["fid"] < best["fid"], "reward_above_teacher": final["reward"] > best["reward"],
        "train_wall_s": metrics[-1]["wall_s"], "optimizer_steps": metrics[-1]["step"],
        "eval_seconds": time.perf_counter() - t0,
        "command": "python benchmarks/distill_dpo.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    plot(record, Path(args.json).with_suffix(".png"))
    for tag, model, sampler in (("teacher", args.model, best["sampler"]), ("student", str(out), "ddim")):
        images, _ = eval_images(model, 20, args.eval_seed, 1.0, sampler, k)
        save_grid(images, str(Path(args.json).with_name(Path(args.json).stem + f"_{tag}.png")),
                  title=f"{tag}, {k} steps ({sampler})")
    print(f"student ({k} steps): FID {final['fid']:.3f} vs teacher {best['sampler']} {k} steps {best['fid']:.3f}; "
          f"{args.reward} {final['reward']:.4f} vs {best['reward']:.4f}; teacher steps at equal FID: {equal}")
    return record


def plot(record: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    tc = record["teacher_curve"]
    axes[0].plot([r["steps"] for r in tc], [r["fid"] for r in tc], marker="o",
                 label=f"teacher ({record['best_sampler']})")
    axes[0].scatter([record["student_steps"]], [record["student"]["fid"]], color="C3", zorder=3, label="student")
    axes[0].set(xlabel="steps (NFE)", ylabel="FID", title="quality against speed")
    axes[0].legend(fontsize=7)
    sc = record["student_curve"]
    axes[1].plot([r["wall_s"] / 60 for r in sc], [r["fid"] for r in sc], marker=".", color="C3", label="student FID")
    axes[1].axhline(min(r["fid"] for r in record["teacher_at_student_steps"] if "fid" in r), color="C0", ls="--",
                    label=f"teacher, {record['student_steps']} steps (best sampler)")
    axes[1].set(xlabel="training wall time (min)", ylabel="FID")
    twin = axes[1].twinx()
    twin.plot([r["wall_s"] / 60 for r in sc], [r["reward"] for r in sc], marker=".", color="C2")
    twin.set_ylabel(record["reward"], color="C2")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()

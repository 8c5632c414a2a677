"""A ranked preference dataset of real images: k training images of each prompt's class per row, scored by the
rewards, in the format ``diffalign data synth`` writes (``rankings.jsonl`` + PNGs, every reward's scores kept,
phi from :func:`~diffalign.align.data.phi_from_scores`). Training on it pulls a model towards the reward-tilted
data rather than towards its own reward-tilted samples (``benchmarks/align_frontier.py --real-tilt`` bounds what
that can gain).

    python benchmarks/real_rankings.py --model builtin:fashion --rewards prompt_following,contrast \\
        --num-prompts 600 --k 4 --out runs/real_fashion

Row i takes its k images at random (``--seed``) from the training images of class i mod C, without repeats
within a row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from align_frontier import batched  # noqa: E402  (benchmarks/align_frontier.py)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:fashion", help="a built-in model (its training images)")
    p.add_argument("--rewards", required=True, help="rewards joined by ','")
    p.add_argument("--num-prompts", type=int, default=600)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from diffalign.align.data import RANKINGS_FILE, phi_from_scores, ranking_line
    from diffalign.align.rewarding import build_reward, score
    from diffalign.images import save_image
    from diffalign.models.builtin import builtin_spec, load_builtin_data

    if args.k < 2 or args.num_prompts < 1:
        raise SystemExit(f"--k must be >= 2 and --num-prompts >= 1, got {args.k} and {args.num_prompts}.")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; choose another --out.")
    x, y = load_builtin_data(args.model, "train")
    classes = builtin_spec(args.model).class_names
    members = [torch.nonzero(y == c).flatten() for c in range(len(classes))]
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for i in range(args.num_prompts):
        c = i % len(classes)
        rows.append((classes[c], members[c][torch.randperm(len(members[c]), generator=gen)[:args.k]]))
    images = (x[torch.stack([idx for _, idx in rows])] + 1) / 2  # [N, k, C, H, W] in [0, 1]
    flat, flat_prompts = images.flatten(0, 1), [c for c, _ in rows for _ in range(args.k)]
    names = [r.strip() for r in args.rewards.split(",") if r.strip()]
    scores = {}
    for n in names:
        fn = build_reward(n, args.model)
        scores[n] = batched(lambda im, q, fn=fn: score(fn, im, q)[:, 0], flat, flat_prompts).reshape(len(rows), args.k)
    phi = phi_from_scores(scores)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prompt, idx) in enumerate(rows):
        files = [f"{i:06d}_{j}.png" for j in range(args.k)]
        for j, f in enumerate(files):
            save_image(images[i, j], out / f)
        lines.append(ranking_line(prompt, files, phi[i], {n: s[i] for n, s in scores.items()},
                                  [{"real": args.model, "index": int(t)} for t in idx]))
    (out / RANKINGS_FILE).write_text("".join(line + "\n" for line in lines))
    print(f"wrote {out / RANKINGS_FILE}: {len(rows)} rows of {args.k} real images", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()

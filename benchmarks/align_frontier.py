"""How much reward can any fine-tune gain while FID stays within a bound? The reward-FID frontier of the
reweighted base model.

The distribution with the highest mean reward at a given KL to the base model is the base tilted by the reward,
p_beta(x | c) ~ p(x | c) exp(r(x) / beta) (the optimum of the KL-regularised objective every method here
approximates). This script draws a large pool of base samples (class-balanced, the evaluation sampler), tilts it
by self-normalised importance weights within each prompt, and reports for each beta:

* the mean reward gain in standard deviations of the base model's reward (over all images, as the alignment
  benchmark's 64-image evaluation set measures it), and in within-prompt standard deviations;
* the KL of the tilt to the base, and the smallest per-prompt effective sample size of the weights;
* FID on the shipped classifier's features, two ways: ``fid_inf``, the Frechet distance of the weighted feature
  statistics (the large-sample limit), and ``fid_resampled``, the mean over resamples of ``--fid-images`` images
  (1,000, class-balanced) drawn from the tilted pool, the sample size the alignment benchmark's FID uses.

    python benchmarks/align_frontier.py --model builtin:fashion \\
        --rewards jpeg_compressibility,prompt_following --pool 8000 --pool-dir runs/frontier_fashion \\
        --json benchmarks/results/align_frontier_fashion.json

``--feature-tilt`` adds a reweighting that also sees the FID features: p(x | c) exp(theta . h(x)), h the reward,
the features and their squares, with theta fitted to trade gain against FID on half of each prompt's images and
measured on the other half. It bounds what a model that knew the FID features could gain by reweighting the base.

``--real-tilt`` tilts the real training images instead of the base's samples, in the base model's units (gain in
the base model's reward sd, FID as a multiple of the base model's): what a model that had learned the data
distribution exactly, and then reweighted it by the reward, would gain within the bound.

The pool is cached in ``--pool-dir`` (one safetensors file per ``--chunk`` images), so an interrupted run resumes.
``--records`` overlays the checkpoints of alignment benchmark records on the plot (``--json`` with .png).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch


def pool_images(model: str, size: int, chunk: int, pool_dir: Path, seed: int, guidance: float, sampler: str,
                steps: int) -> tuple[torch.Tensor, list[str]]:
    """``size`` class-balanced base samples, in chunks of ``chunk`` (seeds seed, seed + 1, ...) cached in
    ``pool_dir``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from diffalign.align.evaluate import eval_images

    if size < chunk or size % chunk:
        raise ValueError(f"--pool must be a multiple of --chunk ({chunk}), got {size}.")
    pool_dir.mkdir(parents=True, exist_ok=True)
    images, prompts = [], []
    for k in range(size // chunk):
        path = pool_dir / f"chunk_{seed + k}.safetensors"
        meta = {"model": model, "guidance": repr(guidance), "sampler": sampler, "steps": str(steps), "size": str(chunk)}
        if not path.is_file():
            t0 = time.perf_counter()
            x, chosen = eval_images(model, chunk, seed + k, guidance, sampler, steps)
            tmp = path.with_suffix(".tmp")
            save_file({"images": x.contiguous()}, str(tmp), metadata={**meta, "prompts": "\n".join(chosen)})
            tmp.replace(path)
            print(f"pool chunk {k + 1}/{size // chunk}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata()
            if any(stored.get(key, value) != value for key, value in meta.items()):
                raise ValueError(f"{path} was sampled with other settings ({stored}); use another --pool-dir.")
            images.append(f.get_tensor("images"))
            prompts += stored["prompts"].split("\n")
    return torch.cat(images), prompts


def batched(fn, images: torch.Tensor, prompts: list[str] | None = None, size: int = 500) -> torch.Tensor:
    """``fn`` over ``images`` (and their ``prompts``) in batches of ``size``, concatenated, float64, without grad."""
    with torch.no_grad():
        return torch.cat([fn(images[i:i + size]) if prompts is None else fn(images[i:i + size], prompts[i:i + size])
                          for i in range(0, len(images), size)]).double()


def weighted_stats(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of features under normalised weights (float64)."""
    mean = weights @ features
    centred = features - mean
    return mean, (centred * weights[:, None]).T @ centred


def resampled_fids(features: torch.Tensor, weights: torch.Tensor, members: list[torch.Tensor], ref: dict,
                   resamples: int, per_group: int, gen: torch.Generator) -> list[float]:
    """FIDs of ``resamples`` sets of ``per_group`` images per group drawn (with replacement) by ``weights``."""
    from torchmetrics.image.fid import _compute_fid

    fids = []
    for _ in range(resamples):
        picks = torch.cat([m[torch.multinomial(weights[m], per_group, replacement=True, generator=gen)]
                           for m in members])
        f = features[picks]
        fids.append(float(_compute_fid(f.mean(0), torch.cov(f.T), ref["mean"].double(), ref["cov"].double())))
    return fids


def frontier(rewards: torch.Tensor, groups: torch.Tensor, features: torch.Tensor, ref: dict, betas: list[float],
             resamples: int, per_group: int, seed: int) -> list[dict]:
    """One row per beta of the tilted pool: gain, KL, ESS and both FIDs, with FID ratios to the first row, whose
    beta must be ``inf`` (the base itself)."""
    from torchmetrics.image.fid import _compute_fid

    if not math.isinf(betas[0]):
        raise ValueError("the first beta must be inf (the base model, which the FID ratios refer to).")

    ref_mean, ref_cov = ref["mean"].double(), ref["cov"].double()
    num_groups = int(groups.max()) + 1
    members = [torch.nonzero(groups == g).flatten() for g in range(num_groups)]
    base_mean, base_sd = float(rewards.mean()), float(rewards.std())
    within_sd = float(torch.cat([rewards[m] - rewards[m].mean() for m in members]).std())
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for beta in betas:
        weights, kl, ess = torch.zeros_like(rewards), 0.0, math.inf
        for m in members:
            logits = torch.zeros(len(m), dtype=torch.float64) if math.isinf(beta) else rewards[m] / beta
            w = torch.softmax(logits, 0)
            weights[m] = w / num_groups
            kl += float(torch.xlogy(w, w * len(m)).sum()) / num_groups
            ess = min(ess, float(1.0 / (w**2).sum()))
        mean_reward = float(weights @ rewards)
        fid_inf = float(_compute_fid(*weighted_stats(features, weights), ref_mean, ref_cov))
        fids = resampled_fids(features, weights, members, ref, resamples, per_group, gen)
        rows.append({"beta": beta, "reward_mean": mean_reward, "gain_base_sd": (mean_reward - base_mean) / base_sd,
                     "gain_within_sd": (mean_reward - base_mean) / within_sd, "kl": kl, "min_ess": ess,
                     "fid_inf": fid_inf, "fid_resampled": float(np.mean(fids)),
                     "fid_resampled_sd": float(np.std(fids))})
    for row in rows:
        row["fid_inf_ratio"] = row["fid_inf"] / rows[0]["fid_inf"]
        row["fid_resampled_ratio"] = row["fid_resampled"] / rows[0]["fid_resampled"]
    return rows


def real_tilt(rewards: torch.Tensor, groups: torch.Tensor, features: torch.Tensor, ref: dict, betas: list[float],
              resamples: int, per_group: int, seed: int, base_row: dict) -> list[dict]:
    """:func:`frontier` of a pool of real images, with gains and FID ratios in the base model's units: gain in
    ``base_row``'s reward sd from its mean, FIDs as multiples of its FIDs (``base_row``: the base frontier's first
    row, with the base model's reward sd added as ``base_sd``). The first beta must be ``inf``, the real data
    untilted."""
    rows = frontier(rewards, groups, features, ref, betas, resamples, per_group, seed)
    for row in rows:
        row["gain_real_sd"] = row["gain_base_sd"]
        row["gain_base_sd"] = (row["reward_mean"] - base_row["reward_mean"]) / base_row["base_sd"]
        row["fid_inf_ratio"] = row["fid_inf"] / base_row["fid_inf"]
        row["fid_resampled_ratio"] = row["fid_resampled"] / base_row["fid_resampled"]
    return rows


def frechet(weights: torch.Tensor, features: torch.Tensor, ref_mean: torch.Tensor, ref_sqrt: torch.Tensor,
            ref_trace: float) -> torch.Tensor:
    """The Frechet distance of the weighted feature statistics to the reference, differentiable in ``weights``
    (``ref_sqrt``: the symmetric square root of the reference covariance)."""
    mean, cov = weighted_stats(features, weights)
    eig = torch.linalg.eigvalsh(ref_sqrt @ cov @ ref_sqrt).clamp(min=1e-12)
    return ((mean - ref_mean) ** 2).sum() + torch.trace(cov) + ref_trace - 2.0 * eig.sqrt().sum()


def feature_tilt(rewards: torch.Tensor, groups: torch.Tensor, features: torch.Tensor, ref: dict, mus: list[float],
                 resamples: int, per_group: int, seed: int, iters: int = 300,
                 tilt_features: torch.Tensor | None = None, tilt_ref: dict | None = None) -> list[dict]:
    """A reweighting that sees the FID features: p(x | c) exp(theta . h(x)) with h = (reward, features, squared
    features), standardised. For each ``mu``, theta maximises gain - mu x FID / base FID on one half of each group's
    images; the row reports the other half under the same theta (gain in base sd, both FID ratios), so a theta that
    only picked images whose sample statistics happen to fit the reference gains nothing. The first row is the
    base (theta = 0) on the held-out half.

    ``tilt_features`` (with their real-image statistics ``tilt_ref``) replace the FID features in h and in the
    fitted Frechet distance: a reweighting that sees another network's features, still measured by FID."""
    gen = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(groups == g).flatten() for g in range(int(groups.max()) + 1)]
    fit, held = [], []
    for m in members:
        m = m[torch.randperm(len(m), generator=gen)]
        fit.append(m[: len(m) // 2])
        held.append(m[len(m) // 2:])
    if min(len(m) for m in fit) < 2:
        raise ValueError("the feature tilt needs at least 4 pool images per prompt (2 to fit, 2 to hold out).")
    seen, seen_ref = (features, ref) if tilt_features is None else (tilt_features, tilt_ref)
    z = (seen - seen.mean(0)) / seen.std(0).clamp(min=1e-6)
    base_mean, base_sd = float(rewards.mean()), float(rewards.std())
    h = torch.cat([((rewards - base_mean) / base_sd)[:, None], z, z**2 - 1.0], 1)

    def reference(stats: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Mean, symmetric covariance square root and covariance trace of real-image statistics."""
        cov = stats["cov"].double()
        vals, vecs = torch.linalg.eigh(cov)
        return stats["mean"].double(), vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T, float(torch.trace(cov))

    ref_mean, ref_sqrt, ref_trace = reference(ref)
    seen_mean, seen_sqrt, seen_trace = reference(seen_ref)

    def weights(theta: torch.Tensor, half: list[torch.Tensor]) -> torch.Tensor:
        """Normalised weights of the images ``torch.cat(half)``, in that order."""
        return torch.cat([torch.softmax(h[m] @ theta, 0) / len(half) for m in half])

    def measure(theta: torch.Tensor) -> dict:
        idx, w = torch.cat(held), weights(theta, held)
        full = torch.zeros_like(rewards).index_put((idx,), w)
        mean_reward = float(w @ rewards[idx])
        fids = resampled_fids(features, full, held, ref, resamples, per_group, gen)
        return {"reward_mean": mean_reward, "gain_base_sd": (mean_reward - base_mean) / base_sd,
                "fid_inf": float(frechet(w, features[idx], ref_mean, ref_sqrt, ref_trace)),
                "fid_resampled": float(np.mean(fids)), "fid_resampled_sd": float(np.std(fids))}

    theta0 = torch.zeros(h.shape[1], dtype=torch.float64)
    fit_idx = torch.cat(fit)
    fit_rewards, fit_features = rewards[fit_idx], seen[fit_idx]
    fit_fid0 = float(frechet(weights(theta0, fit), fit_features, seen_mean, seen_sqrt, seen_trace))
    rows = [{"mu": math.inf, "gain_fit_base_sd": 0.0, **measure(theta0)}]
    for mu in sorted(mus, reverse=True):
        theta = theta0.clone().requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=0.02)
        for _ in range(iters):
            w = weights(theta, fit)
            gain = (w @ fit_rewards - base_mean) / base_sd
            loss = mu * frechet(w, fit_features, seen_mean, seen_sqrt, seen_trace) / fit_fid0 - gain
            opt.zero_grad()
            loss.backward()
            opt.step()
        theta = theta.detach()
        gain_fit = float((weights(theta, fit) @ fit_rewards - base_mean) / base_sd)
        rows.append({"mu": mu, "gain_fit_base_sd": gain_fit, **measure(theta)})
    for row in rows:
        row["fid_inf_ratio"] = row["fid_inf"] / rows[0]["fid_inf"]
        row["fid_resampled_ratio"] = row["fid_resampled"] / rows[0]["fid_resampled"]
    return rows


def gain_at_bound(rows: list[dict], key: str, bound: float) -> float | None:
    """The largest gain (base sd) of a tilt whose FID ratio (``key``) is within ``bound``, interpolated between
    the last tilt inside and the first outside (betas decrease along ``rows``)."""
    best = None
    for a, b in zip(rows, rows[1:], strict=False):
        if a[key] > bound:
            break
        if b[key] > bound:
            frac = (bound - a[key]) / (b[key] - a[key])
            return a["gain_base_sd"] + frac * (b["gain_base_sd"] - a["gain_base_sd"])
        best = b["gain_base_sd"]
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:fashion")
    p.add_argument("--rewards", default="jpeg_compressibility,prompt_following")
    p.add_argument("--pool", type=int, default=8000, help="base samples (a multiple of --chunk)")
    p.add_argument("--chunk", type=int, default=1000, help="images per cached pool file")
    p.add_argument("--pool-dir", required=True, help="cache of the pool's images")
    p.add_argument("--pool-seed", type=int, default=101, help="seed of the first chunk (kept apart from eval seeds)")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--sampler", default="dpm-solver++")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--betas", default=None, help="comma-separated tilts in base-sd units (default: a geometric grid)")
    p.add_argument("--fid-images", type=int, default=1000, help="images per resampled FID (as the benchmark's)")
    p.add_argument("--resamples", type=int, default=10, help="resampled FIDs per tilt")
    p.add_argument("--fid-bound", type=float, default=2.0)
    p.add_argument("--feature-tilt", action="store_true",
                   help="also the reweighting that sees the FID features (fitted on half the pool, measured on the "
                        "other half)")
    p.add_argument("--realism-tilt", action="store_true",
                   help="also the feature tilt that sees the `realism` reward's network instead of the FID features "
                        "(its Frechet distance to the real held-out images fitted, FID measured)")
    p.add_argument("--real-tilt", action="store_true",
                   help="also tilt the real training images (in the base model's units: its reward sd, its FID)")
    p.add_argument("--real-pool", type=int, default=8000, help="real training images for --real-tilt (class-balanced)")
    p.add_argument("--records", nargs="*", default=[], help="alignment benchmark records to overlay on the plot")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    from diffalign.align.rewarding import build_reward, score
    from diffalign.eval.fid import get_features, load_stats
    from diffalign.models.builtin import weights_dir

    if not args.model.startswith("builtin:"):
        raise SystemExit(f"the frontier needs a built-in model's shipped FID features, got {args.model!r}.")
    images, prompts = pool_images(args.model, args.pool, args.chunk, Path(args.pool_dir), args.pool_seed, args.guidance,
                                  args.sampler, args.steps)
    features_fn = get_features(f"classifier:{args.model}")
    features = batched(features_fn, images)
    ref = load_stats(weights_dir(args.model.split(":", 1)[1]) / "fid_stats.safetensors")
    if args.realism_tilt:
        from diffalign.models.builtin import classifier_input, load_builtin_data
        from diffalign.rewards.realism import load_realism

        net = load_realism(args.model)[0]
        size = net.config["image_size"]
        seen = batched(lambda x: net.features(classifier_input(x, size) * 2 - 1), images)
        with torch.no_grad():
            real = net.features(load_builtin_data(args.model, "test")[0]).double()
        seen_ref = {"mean": real.mean(0), "cov": torch.cov(real.T)}
    if args.real_tilt:
        from diffalign.models.builtin import builtin_spec, load_builtin_data

        real_x, real_y = load_builtin_data(args.model, "train")
        classes = builtin_spec(args.model).class_names
        per_class = args.real_pool // len(classes)
        gen = torch.Generator().manual_seed(args.pool_seed)
        picks = torch.cat([torch.nonzero(real_y == c).flatten()[torch.randperm(int((real_y == c).sum()),
                                                                                generator=gen)[:per_class]]
                           for c in range(len(classes))])
        real_images, real_prompts = (real_x[picks] + 1) / 2, [classes[int(c)] for c in real_y[picks]]
        real_features = batched(features_fn, real_images)
    names = sorted(set(prompts))
    groups = torch.tensor([names.index(q) for q in prompts])
    per_group = max(args.fid_images // len(names), 2)
    record = {"model": args.model, "pool": args.pool, "guidance": args.guidance, "sampler": args.sampler,
              "steps": args.steps, "fid_bound": args.fid_bound, "rewards": {},
              "command": "python benchmarks/align_frontier.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    scales = ([float(b) for b in args.betas.split(",")] if args.betas else
              [8.0, 4.0, 2.0, 1.4, 1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08])  # tilts, in each reward's sd
    for name in [r.strip() for r in args.rewards.split(",") if r.strip()]:
        fn = build_reward(name, args.model)
        r = batched(lambda x, q, fn=fn: score(fn, x, q)[:, 0], images, prompts)
        sd = float(r.std())
        rows = frontier(r, groups, features, ref, [math.inf, *[s * sd for s in scales]], args.resamples, per_group,
                        args.pool_seed)
        record["rewards"][name] = {
            "base_mean": float(r.mean()), "base_sd": sd, "min": float(r.min()), "max": float(r.max()),
            "gain_to_pool_max_base_sd": (float(np.mean([float(r[groups == g].max()) for g in range(len(names))]))
                                         - float(r.mean())) / sd,
            "gain_at_fid_bound": {"fid_inf": gain_at_bound(rows, "fid_inf_ratio", args.fid_bound),
                                  "fid_resampled": gain_at_bound(rows, "fid_resampled_ratio", args.fid_bound)},
            "rows": rows}
        print(f"\n{name}: base mean {float(r.mean()):.4f}, sd {sd:.4f} (pool of {args.pool})")
        print(f"{'beta/sd':>8} {'gain sd':>8} {'within sd':>9} {'KL':>8} {'min ESS':>8} {'FID inf':>8} {'ratio':>6} "
              f"{'FID resamp':>10} {'ratio':>6}")
        for row in rows:
            print(f"{row['beta'] / sd:8.3g} {row['gain_base_sd']:+8.2f} {row['gain_within_sd']:+9.2f} "
                  f"{row['kl']:8.3f} {row['min_ess']:8.0f} {row['fid_inf']:8.3f} {row['fid_inf_ratio']:6.2f} "
                  f"{row['fid_resampled']:10.3f} {row['fid_resampled_ratio']:6.2f}")
        print_gains(record["rewards"][name]["gain_at_fid_bound"], args.fid_bound)
        if args.real_tilt:
            rr = batched(lambda x, q, fn=fn: score(fn, x, q)[:, 0], real_images, real_prompts)
            real_groups = torch.tensor([names.index(q) for q in real_prompts])
            rows = real_tilt(rr, real_groups, real_features, ref, [math.inf, *[s * sd for s in scales]],
                             args.resamples, per_group, args.pool_seed, {**rows[0], "base_sd": sd})
            record["rewards"][name]["real_tilt"] = {
                "real_images": len(rr), "gain_at_fid_bound": {k: gain_at_bound(rows, f"{k}_ratio", args.fid_bound)
                                                              for k in ("fid_inf", "fid_resampled")}, "rows": rows}
            print(f"real training images ({len(rr)}) tilted, in the base model's units:")
            print(f"{'beta/sd':>8} {'gain sd':>8} {'min ESS':>8} {'FID inf':>8} {'ratio':>6} {'FID resamp':>10} "
                  f"{'ratio':>6}")
            for row in rows:
                print(f"{row['beta'] / sd:8.3g} {row['gain_base_sd']:+8.2f} {row['min_ess']:8.0f} "
                      f"{row['fid_inf']:8.3f} {row['fid_inf_ratio']:6.2f} {row['fid_resampled']:10.3f} "
                      f"{row['fid_resampled_ratio']:6.2f}")
            print_gains(record["rewards"][name]["real_tilt"]["gain_at_fid_bound"], args.fid_bound)
        tilts = [("feature_tilt", "feature tilt (fitted on half the pool, measured on the other half)", {})
                 ] if args.feature_tilt else []
        if args.realism_tilt:
            tilts.append(("realism_tilt", "realism-feature tilt (the realism network's features; fitted on half, "
                          "FID on the other half)", {"tilt_features": seen, "tilt_ref": seen_ref}))
        for key, title, seen_by in tilts:
            mus = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625] + ([0.03125] if seen_by else [])
            rows = feature_tilt(r, groups, features, ref, mus, args.resamples, per_group, args.pool_seed, **seen_by)
            record["rewards"][name][key] = {
                "gain_at_fid_bound": {k: gain_at_bound(rows, f"{k}_ratio", args.fid_bound)
                                      for k in ("fid_inf", "fid_resampled")}, "rows": rows}
            print(title + ":")
            print_tilt(rows)
            print_gains(record["rewards"][name][key]["gain_at_fid_bound"], args.fid_bound)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    plot(record, [json.loads(Path(r).read_text()) for r in args.records], out.with_suffix(".png"))
    return record


def print_tilt(rows: list[dict]) -> None:
    print(f"{'mu':>8} {'gain fit':>8} {'gain held':>9} {'FID inf':>8} {'ratio':>6} {'FID resamp':>10} {'ratio':>6}")
    for row in rows:
        print(f"{row['mu']:8.3g} {row['gain_fit_base_sd']:+8.2f} {row['gain_base_sd']:+9.2f} {row['fid_inf']:8.3f} "
              f"{row['fid_inf_ratio']:6.2f} {row['fid_resampled']:10.3f} {row['fid_resampled_ratio']:6.2f}")


def print_gains(at: dict, bound: float) -> None:
    gains = ", ".join(f"{k} {'-' if v is None else f'{v:+.2f}'} sd" for k, v in at.items())
    print(f"largest gain with FID within {bound:g}x: {gains}")


def plot(record: dict, runs: list[dict], png: Path) -> None:
    """Gain against FID ratio: the tilted pool's frontier per reward, and the overlaid runs' checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["rewards"])
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        rows = record["rewards"][name]["rows"]
        for key, style in (("fid_resampled_ratio", "o-"), ("fid_inf_ratio", "s--")):
            ax.plot([r[key] for r in rows], [r["gain_base_sd"] for r in rows], style,
                    label=f"tilted base (FID {key[4:-6]})")
        for key, style, label in (("feature_tilt", "d-", "feature tilt, held out"),
                                  ("realism_tilt", "v-", "realism-feature tilt, held out"),
                                  ("real_tilt", "^-", "tilted real data")):
            if key in record["rewards"][name]:
                rows = record["rewards"][name][key]["rows"]
                ax.plot([r["fid_resampled_ratio"] for r in rows], [r["gain_base_sd"] for r in rows], style,
                        label=f"{label} (FID resampled)")
        for run in runs:
            if run.get("reward") != name:
                continue
            base = run["base"]
            pts = [(c["fid"] / base["fid"], (c["reward_mean"] - base["reward_mean"]) / base["reward_std"])
                   for c in run["curve"] if c.get("fid") is not None]
            label = f"{run['method']} lr {run['config']['lr']:g}" + (f" kl {run['config']['kl_coef']:g}"
                                                                    if "kl_coef" in run["config"] else "")
            ax.plot(*zip(*pts, strict=True), "x:", label=label)
        ax.axvline(record["fid_bound"], color="grey", lw=0.8)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("FID / base FID")
        ax.set_ylabel("reward gain (base sd)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()

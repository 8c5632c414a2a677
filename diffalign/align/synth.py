"""Synthetic ranked preferences, the RankDPO / Syn-Pic recipe in miniature (Karthik et al., ICCV 2025, Sec. 3.2).

For each prompt, k images from one or several sources (model x sampler, each image its own seed), scored by an
ensemble of n rewards; the soft label of an image is its fraction of pairwise wins averaged over the rewards
(:func:`~diffalign.align.data.phi_from_scores`). Every reward's scores are kept, so a method can also rank by one
reward alone. The output is a ``rankings.jsonl`` dataset directory; an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .data import RANKINGS_FILE, SYNTH_FILE, phi_from_scores, ranking_line


def _write_atomic(file: Path, text: str) -> None:
    """Write ``text`` to a temporary file and rename it over ``file``: an interruption leaves the old or the new."""
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


def _resume_point(file: Path, batch: int) -> int:
    """Rows of ``file`` kept on resuming: the complete batches (a partial line or batch, from an interruption, is
    cut off, so every batch is made as in an uninterrupted run)."""
    if not file.is_file():
        return 0
    lines = [line for line in file.read_text().split("\n")[:-1]]  # the text after the last newline is partial
    keep = len(lines) // batch * batch
    _write_atomic(file, "".join(line + "\n" for line in lines[:keep]))
    return keep


def synthesize(out: str | Path, models: Sequence[str], rewards: Sequence[str], prompts: Sequence[str] | None = None,
               num_prompts: int | None = None, k: int = 4, samplers: Sequence[str] = ("dpm-solver++",),
               steps: int = 20, guidance: float = 1.0, seed: int = 0, batch_prompts: int = 16, device: str = "cpu",
               progress: bool = True) -> Path:
    """Write a ranked dataset to ``out``: ``num_prompts`` rows (prompts cycled; default one row per prompt) of k
    images. Image j of row i comes from source j mod S of the S = models x samplers sources, from noise seeded by
    (seed, i, j), so a resumed run writes what an uninterrupted one would."""
    from tqdm.auto import tqdm

    from ..images import save_image
    from ..pipelines.class_conditional import load_pipeline
    from .policy import Policy
    from .rewarding import build_reward, score
    from .trajectory import generate

    models, samplers, rewards = list(models), list(samplers), list(rewards)
    if not 2 <= k <= 1000:
        raise ValueError(f"k must be >= 2 images per prompt (a ranking compares images) and <= 1000, got {k}.")
    if not models or not rewards or not samplers:
        raise ValueError("synth needs at least one model, one sampler and one reward.")
    policies = {m: Policy(load_pipeline(m, device=device)) for m in dict.fromkeys(models)}
    first = policies[models[0]]
    prompts = first.training_prompts(prompts)
    for policy in policies.values():
        policy.check_prompts(prompts)
        if policy.latent_shape != first.latent_shape:
            raise ValueError(f"the models make latents of different shapes ({policy.latent_shape} vs "
                             f"{first.latent_shape}); synth needs models of one resolution.")
    fns = {name: build_reward(name, models[0]) for name in rewards}
    num_prompts = len(prompts) if num_prompts is None else num_prompts
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}.")
    sources = [{"model": m, "sampler": s} for m, s in itertools.product(models, samplers)]
    settings = {"models": models, "samplers": samplers, "rewards": rewards, "prompts": list(prompts),
                "num_prompts": num_prompts, "k": k, "steps": steps, "guidance": guidance, "seed": seed,
                "batch_prompts": batch_prompts}

    out = Path(out)
    meta_file, rows_file = out / SYNTH_FILE, out / RANKINGS_FILE
    if meta_file.is_file():
        if json.loads(meta_file.read_text()) != settings:
            raise FileExistsError(f"{out} holds a synth run with other settings; choose another --out (or delete it).")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    if not meta_file.is_file():
        _write_atomic(meta_file, json.dumps(settings, indent=1))
    done = _resume_point(rows_file, batch_prompts)

    bar = tqdm(total=num_prompts, initial=done, desc="synth", unit="prompt", disable=not progress)
    for start in range(done, num_prompts, batch_prompts):
        rows = range(start, min(start + batch_prompts, num_prompts))
        row_prompts = [prompts[i % len(prompts)] for i in rows]
        images = torch.empty(len(rows), k, *first.image_shape)
        for s, src in enumerate(sources):
            jobs = [(r, j) for r in range(len(rows)) for j in range(k) if j % len(sources) == s]
            if not jobs:
                continue
            x_T = torch.stack([torch.randn(first.latent_shape, generator=torch.Generator().manual_seed(
                (seed * 1_000_003 + rows[r]) * 1_009 + j)) for r, j in jobs])
            made = generate(policies[src["model"]], [row_prompts[r] for r, _ in jobs], x_T, src["sampler"], steps,
                            guidance, generator=torch.Generator().manual_seed(  # a stochastic sampler's noise
                                (seed * 1_000_003 + rows[0]) * 1_009 + 1_008 - s))
            for (r, j), image in zip(jobs, made, strict=True):
                images[r, j] = image
        flat = images.flatten(0, 1)
        flat_prompts = [p for p in row_prompts for _ in range(k)]
        scores = {name: score(fn, flat, flat_prompts).reshape(len(rows), k, -1)[..., 0] for name, fn in fns.items()}
        phi = phi_from_scores(scores)
        lines = []
        for r, i in enumerate(rows):
            files = [f"{i:06d}_{j}.png" for j in range(k)]
            for j, f in enumerate(files):
                save_image(images[r, j], out / f)
            lines.append(ranking_line(row_prompts[r], files, phi[r], {n: s[r] for n, s in scores.items()},
                                      [{**sources[j % len(sources)], "seed": [seed, i, j]} for j in range(k)]))
        with rows_file.open("a") as f:
            f.write("".join(line + "\n" for line in lines))
        bar.update(len(rows))
    bar.close()
    return out


"""Evaluation of (aligned) models: mean reward, FID and KL to the base model on a fixed set of (prompt, seed) pairs.

The set depends only on ``seed`` and ``num_images`` (prompts cycle through the class names, or through the given
prompts; the initial noise comes from one generator seeded with ``seed``), so two models are compared on the
same noise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .policy import ALIGNMENT_FILE, Policy
from .rewarding import build_reward, score
from .trajectory import (
    ddim_scheduler,
    generate,
    sample_trajectories,
    step_kl,
    step_transitions,
    stochastic_steps,
)


def base_model_name(model: str) -> str:
    """The model a training output directory (or checkpoint) was trained from (the name itself otherwise)."""
    out, state = Path(model) / ALIGNMENT_FILE, Path(model) / "trainer_state.json"
    if out.is_file():
        return json.loads(out.read_text())["base_model"]
    return json.loads(state.read_text())["model"] if state.is_file() else model


def eval_set(policy: Policy, num_images: int, seed: int, prompts: Sequence[str] | None = None
             ) -> tuple[list[str], torch.Tensor, torch.Generator]:
    """The fixed evaluation set: prompts cycling through ``prompts`` (default: the class names), the initial noise
    [N, ...], and the generator (seeded with ``seed``, after drawing the noise) for the sampling noise."""
    names = policy.training_prompts(prompts)
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((num_images, *policy.latent_shape), generator=gen)
    return [names[i % len(names)] for i in range(num_images)], x_T, gen


def eval_images(model: str, num_images: int = 64, seed: int = 0, guidance: float = 1.0, sampler: str = "dpm-solver++",
                steps: int = 20, prompts: Sequence[str] | None = None, device: str = "cpu",
                batch_size: int = 256) -> tuple[torch.Tensor, list[str]]:
    """Images [N, C, H, W] in [0, 1] of ``model`` on the fixed evaluation set, and their prompts."""
    from ..pipelines.class_conditional import load_pipeline

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    policy = Policy(load_pipeline(model, device=device))
    chosen, x_T, gen = eval_set(policy, num_images, seed, prompts)
    images = generate(policy, chosen, x_T, sampler, steps, guidance, generator=gen, batch_size=batch_size)
    return images, chosen


def evaluate_rewards(model: str, rewards: Sequence[str], num_images: int = 64, seed: int = 0,
                     guidance: float = 1.0, sampler: str = "dpm-solver++", steps: int = 20,
                     prompts: Sequence[str] | None = None, device: str = "cpu") -> dict[str, dict]:
    """:func:`evaluate_reward` of several rewards on one set of images (sampled once)."""
    fns = {name: build_reward(name, base_model_name(model)) for name in rewards}
    images, chosen = eval_images(model, num_images, seed, guidance, sampler, steps, prompts, device)
    results = {}
    for name, fn in fns.items():
        values = score(fn, images, chosen)
        mean, std = values.mean(0), values.std(0) if len(values) > 1 else torch.zeros(values.shape[1])
        scalar = values.shape[1] == 1
        results[name] = {"model": model, "reward": name, "mean": float(mean) if scalar else mean.tolist(),
                         "std": float(std) if scalar else std.tolist(), "n": num_images, "guidance": guidance,
                         "seed": seed, "sampler": sampler, "steps": steps}
    return results


def evaluate_reward(model: str, reward: str, num_images: int = 64, seed: int = 0, guidance: float = 1.0,
                    sampler: str = "dpm-solver++", steps: int = 20, prompts: Sequence[str] | None = None,
                    device: str = "cpu") -> dict:
    """Mean and standard deviation of ``reward`` over the fixed (prompt, seed) set of ``model`` (a built-in, a
    diffusers directory or hub id, or a training output directory): ``{"model", "reward", "mean", "std", "n",
    "guidance", "seed", "sampler", "steps"}`` (lists per objective for a vector reward ``"a,b"``)."""
    return evaluate_rewards(model, [reward], num_images, seed, guidance, sampler, steps, prompts, device)[reward]


def shipped_fid(model: str, device: str = "cpu"):
    """An empty :class:`~diffalign.eval.fid.FID` on the shipped classifier's features, with the reference
    statistics of ``model``'s built-in base model loaded."""
    from ..eval.fid import FID, get_features
    from ..models.builtin import weights_dir

    base = base_model_name(model)
    if not base.startswith("builtin:"):
        raise ValueError(f"FID with shipped features needs a built-in model (or one trained from it), got {base!r}.")
    fid = FID(get_features(f"classifier:{base}"), device=device)
    fid.load_reference(weights_dir(base.split(":", 1)[1]) / "fid_stats.safetensors")
    return fid


def evaluate_fid(model: str, num_images: int = 1000, seed: int = 0, guidance: float = 1.0,
                 sampler: str = "dpm-solver++", steps: int = 20, device: str = "cpu") -> float:
    """FID of a shipped model (or one trained from it) on its shipped classifier's features and reference
    statistics, with class-balanced prompts."""
    fid = shipped_fid(model, device)
    images, _ = eval_images(model, num_images, seed, guidance, sampler, steps, device=device)
    fid.add(images)
    return fid.compute()


@torch.no_grad()
def evaluate_kl(model: str, num_images: int = 16, seed: int = 0, guidance: float = 1.0, num_steps: int = 20,
                eta: float = 1.0, device: str = "cpu") -> float:
    """How far a trained model has moved from its base: the mean, over the stochastic steps of ``num_images``
    DDIM trajectories (``num_steps`` steps, ``eta``) sampled with ``model``, of each step's KL(model || base)
    (:func:`~diffalign.align.trajectory.step_kl`, per-pixel mean; what ``kl_coef`` penalises and D3PO logs as
    ``kl``)."""
    from ..pipelines.class_conditional import load_pipeline

    base = base_model_name(model)
    if base == model:
        raise ValueError(f"{model!r} is not a training output directory or checkpoint; its KL to itself is 0.")
    policy, reference = Policy(load_pipeline(model, device=device)), Policy(load_pipeline(base, device=device))
    sched = ddim_scheduler(policy, num_steps, eta)
    chosen, x_T, gen = eval_set(policy, num_images, seed)
    cond = policy.encode(chosen)
    traj = sample_trajectories(policy, sched, cond, x_T, guidance, gen)
    steps = stochastic_steps(sched)
    mean_p, stds = step_transitions(policy, sched, traj.latents, steps, cond, guidance)
    mean_ref, _ = step_transitions(reference, sched, traj.latents, steps, cond, guidance)
    return float(step_kl(mean_p, mean_ref, stds).mean())

"""D3PO (Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model", CVPR 2024).

Sampling with K-step DDIM (eta = 1) is an MDP whose policy is the Gaussian DDIM transition. Two images of a pair
share the prompt and the initial noise x_T and diverge only through the step noise; the preference between the
final images (a reward compared by Pareto dominance, or a human label) is copied to every step, and each step gets
the DPO loss on clamped policy / reference ratios (:func:`~diffalign.align.losses.d3po_loss`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...rewards import pareto_compare
from ..config import D3POConfig
from ..losses import d3po_loss, implicit_accuracy
from ..policy import Policy
from ..rewarding import build_reward, score
from ..trajectory import (
    ddim_scheduler,
    pick_steps,
    sample_trajectories,
    step_groups,
    step_kl,
    step_transitions,
    stochastic_steps,
    transition_log_probs,
)

PAIRS_META = "pairs.json"
PAIRS_TENSORS = "pairs.safetensors"


@torch.no_grad()
def sample_pairs(policy: Policy, sched, prompts: list[str], guidance: float, generator: torch.Generator) -> dict:
    """Pairs sharing prompt and initial noise: latents [P, 2, T + 1, ...], conditioning, decoded images [2P, ...]."""
    p = len(prompts)
    cond = policy.encode(prompts)
    x_T = torch.randn((p, *policy.latent_shape), generator=generator)
    traj = sample_trajectories(policy, sched, torch.cat([cond, cond]), torch.cat([x_T, x_T]), guidance, generator)
    latents = torch.stack([traj.latents[:p], traj.latents[p:]], 1)
    return {"latents": latents, "cond": cond, "images": policy.decode(traj.final)}


class D3PO:
    """D3PO on the alignment engine: on-policy pairs ranked by a reward, or stored pairs with human labels."""

    name = "d3po"
    config_class = D3POConfig

    def __init__(self, cfg: D3POConfig, policy: Policy):
        cfg.check()
        if not 0 < cfg.clip < 1:
            raise ValueError(f"clip must be in (0, 1), got {cfg.clip}.")
        if cfg.pairs_per_step < 1:
            raise ValueError(f"pairs_per_step must be >= 1, got {cfg.pairs_per_step}.")
        self.cfg, self.policy = cfg, policy
        self.labelled = None
        if cfg.labels is not None or cfg.pairs is not None:
            if cfg.labels is None or cfg.pairs is None:
                raise ValueError("training on human labels needs both `pairs` (the export-pairs directory) and "
                                 "`labels` (its labels file).")
            self.labelled = load_labelled_pairs(cfg.pairs, cfg.labels, cfg.model)
            meta = self.labelled["meta"]
            self.num_steps, self.eta, self.guidance = meta["num_steps"], meta["eta"], meta["guidance"]
            # the stored trajectories fix these, and the labels replace the reward: the saved config says so
            cfg.num_steps, cfg.eta, cfg.guidance, cfg.reward = self.num_steps, self.eta, self.guidance, None
            self.reward = None
        else:
            if cfg.reward is None:
                raise ValueError("set a `reward` or train on human labels (`pairs` + `labels`).")
            self.reward = build_reward(cfg.reward, cfg.model, cfg.reward_kwargs)
            self.num_steps, self.eta, self.guidance = cfg.num_steps, cfg.eta, cfg.guidance
            self.prompts = policy.training_prompts(cfg.prompts)
        self.sched = ddim_scheduler(policy, self.num_steps, self.eta)
        self.stochastic_steps = stochastic_steps(self.sched)
        self.images_per_batch = 2 * cfg.pairs_per_step

    # ------------------------------------------------------------------ data
    def collect(self, generator: torch.Generator) -> dict:
        p = self.cfg.pairs_per_step
        if self.labelled is not None:
            data = self.labelled
            pick = torch.randint(len(data["preference"]), (p,), generator=generator)
            prompts = [data["prompts"][i] for i in pick]
            batch = {"latents": data["latents"][pick].to(self.policy.device), "cond": self.policy.encode(prompts),
                     "preference": data["preference"][pick].to(self.policy.device), "stats": {}}
        else:
            prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (p,), generator=generator)]
            pairs = sample_pairs(self.policy, self.sched, prompts, self.guidance, generator)
            rewards = score(self.reward, pairs["images"], prompts * 2)
            preference = pareto_compare(rewards[:p], rewards[p:])
            batch = {"latents": pairs["latents"], "cond": pairs["cond"], "preference": preference,
                     "stats": {"reward_mean": float(rewards.mean()),
                               "ties": float((preference == 0).float().mean())}}
        batch["steps"] = pick_steps(self.stochastic_steps, self.cfg.timestep_fraction, generator)
        return batch

    def chunks(self, batch: dict) -> list[list[int]]:
        return step_groups(batch["steps"], self.cfg.steps_per_backward)

    # ------------------------------------------------------------------ loss
    def loss(self, batch: dict, steps: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        p = batch["latents"].shape[0]
        latents = torch.cat([batch["latents"][:, 0], batch["latents"][:, 1]])
        cond = torch.cat([batch["cond"], batch["cond"]])
        mean_p, stds = step_transitions(self.policy, self.sched, latents, steps, cond, self.guidance)
        mean_ref, _ = step_transitions(self.policy, self.sched, latents, steps, cond, self.guidance, reference=True)
        ratio = transition_log_probs(latents, steps, mean_p, stds) - transition_log_probs(latents, steps, mean_ref,
                                                                                           stds)
        h = batch["preference"][:, None].expand(p, len(steps))
        loss = d3po_loss(ratio[:p], ratio[p:], h, self.cfg.beta, self.cfg.clip).mean()
        kl = step_kl(mean_p, mean_ref, stds).mean()
        if self.cfg.kl_coef:
            loss = loss + self.cfg.kl_coef * kl
        acc = implicit_accuracy(ratio[:p].detach(), ratio[p:].detach(), h)
        return loss, {"implicit_acc": float(acc), "log_ratio_abs": float(ratio.detach().abs().mean()),
                      "kl": float(kl.detach())}


# ---------------------------------------------------------------------- human labels
def export_pairs(model: str, out: str | Path, prompts: Sequence[str] | None = None, num_pairs: int = 16,
                 num_steps: int = 20, eta: float = 1.0, guidance: float = 5.0, seed: int = 0,
                 device: str = "cpu", progress: bool = True) -> Path:
    """Sample pairs for human labelling: ``pairs.json`` (prompts, image files), ``pairs.safetensors`` (the
    trajectories D3PO trains on) and PNGs ``pair_XXXX_0.png`` / ``pair_XXXX_1.png``. Label them in
    ``labels.jsonl``, one line per pair: ``{"pair": 3, "preferred": 0}`` (0 or 1, or null for a tie)."""
    from tqdm.auto import tqdm

    from ...images import save_image
    from ...pipelines.class_conditional import load_pipeline

    out = Path(out)
    if (out / PAIRS_META).exists():
        raise FileExistsError(f"{out} already holds exported pairs; choose another directory.")
    policy = Policy(load_pipeline(model, device=device))
    prompts = policy.training_prompts(prompts)
    sched = ddim_scheduler(policy, num_steps, eta)
    gen = torch.Generator().manual_seed(seed)
    chosen = [prompts[i] for i in torch.randint(len(prompts), (num_pairs,), generator=gen)]
    latents, records = [], []
    out.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, num_pairs, 8), desc="pairs", disable=not progress):
        batch = chosen[start:start + 8]
        pairs = sample_pairs(policy, sched, batch, guidance, gen)
        latents.append(pairs["latents"].cpu())
        for j, prompt in enumerate(batch):
            i = start + j
            files = [f"pair_{i:04d}_{k}.png" for k in (0, 1)]
            for k in (0, 1):
                save_image(pairs["images"][j + k * len(batch)], out / files[k])
            records.append({"pair": i, "prompt": prompt, "images": files})
    save_file({"latents": torch.cat(latents).contiguous()}, str(out / PAIRS_TENSORS))
    meta = {"model": model, "num_steps": num_steps, "eta": eta, "guidance": guidance, "seed": seed,
            "pairs": records}
    (out / PAIRS_META).write_text(json.dumps(meta, indent=2))
    return out


def read_labels(path: str | Path, num_pairs: int) -> dict[int, int]:
    """``{pair: +1 (image 0 preferred) | -1 (image 1) | 0 (tie)}`` from a labels.jsonl file, validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} not found.")
    labels = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            pair, preferred = entry["pair"], entry["preferred"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{lineno}: expected a JSON object like {{\"pair\": 0, \"preferred\": 1}}, got "
                             f"{line.strip()[:80]!r}.") from None
        if not isinstance(pair, int) or not 0 <= pair < num_pairs:
            raise ValueError(f"{path}:{lineno}: pair {pair!r} is not one of the {num_pairs} exported pairs.")
        if preferred not in (0, 1, None):
            raise ValueError(f"{path}:{lineno}: preferred must be 0, 1 or null (a tie), got {preferred!r}.")
        labels[pair] = {0: 1, 1: -1, None: 0}[preferred]
    if not labels:
        raise ValueError(f"{path} holds no labels.")
    return labels


def load_labelled_pairs(pairs_dir: str | Path, labels_path: str | Path, model: str) -> dict:
    """The decided (non-tied) labelled pairs of an export directory: latents, prompts, preferences, metadata."""
    pairs_dir = Path(pairs_dir)
    if not (pairs_dir / PAIRS_META).is_file() or not (pairs_dir / PAIRS_TENSORS).is_file():
        raise FileNotFoundError(f"{pairs_dir} is not a `diffalign align export-pairs` directory (no {PAIRS_META} / "
                                f"{PAIRS_TENSORS}).")
    meta = json.loads((pairs_dir / PAIRS_META).read_text())
    if meta["model"] != model:
        raise ValueError(f"the pairs in {pairs_dir} were sampled from {meta['model']!r}, not {model!r}; train that "
                         "model or export pairs from this one.")
    latents = load_file(str(pairs_dir / PAIRS_TENSORS))["latents"]
    labels = read_labels(labels_path, len(meta["pairs"]))
    decided = [i for i, h in sorted(labels.items()) if h != 0]
    if not decided:
        raise ValueError(f"{labels_path}: every labelled pair is a tie; D3PO learns nothing from ties.")
    return {"latents": latents[decided], "prompts": [meta["pairs"][i]["prompt"] for i in decided],
            "preference": torch.tensor([labels[i] for i in decided]), "meta": meta}

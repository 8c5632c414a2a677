"""DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning", ICLR 2024), the baseline of the
D3PO paper: images sampled with stochastic DDIM, rewards turned into advantages (normalised over the images of
each prompt in the batch, clipped), and PPO's clipped surrogate on every step's log-probability ratio to the
sampling policy. One optimizer step per sampled batch (the ratio starts at 1), on the same trajectory code as D3PO.
"""

from __future__ import annotations

import torch

from ..config import DDPOConfig
from ..losses import ddpo_loss
from ..policy import Policy
from ..rewarding import build_reward, reward_names, score
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


def prompt_advantages(rewards: torch.Tensor, prompts: list[str], clip: float) -> torch.Tensor:
    """(r - mean) / std over the images of the same prompt (over the whole batch where a prompt has one image)."""
    adv = torch.empty_like(rewards)
    for prompt in set(prompts):
        idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        group = rewards[idx] if len(idx) > 1 else rewards
        adv[idx] = (rewards[idx] - group.mean()) / (group.std() + 1e-6)
    return adv.clamp(-clip, clip)


class DDPO:
    """DDPO on the alignment engine."""

    name = "ddpo"
    config_class = DDPOConfig

    def __init__(self, cfg: DDPOConfig, policy: Policy):
        cfg.check()
        if cfg.images_per_step < 2 or cfg.reward is None:
            raise ValueError(f"DDPO needs a reward and images_per_step >= 2 (got {cfg.reward!r}, "
                             f"{cfg.images_per_step}).")
        if len(reward_names(cfg.reward)) > 1:
            raise ValueError(f"DDPO needs a scalar reward, and {cfg.reward!r} is a vector of several; name one "
                             "(D3PO compares vector rewards by Pareto dominance).")
        self.cfg, self.policy = cfg, policy
        self.reward = build_reward(cfg.reward, cfg.model, cfg.reward_kwargs)
        self.prompts = policy.training_prompts(cfg.prompts)
        self.sched = ddim_scheduler(policy, cfg.num_steps, cfg.eta)
        self.stochastic_steps = stochastic_steps(self.sched)
        self.images_per_batch = cfg.images_per_step

    def collect(self, generator: torch.Generator) -> dict:
        n = self.cfg.images_per_step
        prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (n,), generator=generator)]
        cond = self.policy.encode(prompts)
        x_T = torch.randn((n, *self.policy.latent_shape), generator=generator)
        traj = sample_trajectories(self.policy, self.sched, cond, x_T, self.cfg.guidance, generator)
        rewards = score(self.reward, self.policy.decode(traj.final), prompts)
        if rewards.shape[1] != 1:
            raise ValueError(f"DDPO needs a scalar reward; {self.cfg.reward!r} gave {rewards.shape[1]} values per "
                             "image.")
        return {"latents": traj.latents, "log_probs": traj.log_probs, "cond": cond,
                "steps": pick_steps(self.stochastic_steps, self.cfg.timestep_fraction, generator),
                "advantages": prompt_advantages(rewards[:, 0], prompts, self.cfg.adv_clip_max).to(cond.device),
                "stats": {"reward_mean": float(rewards.mean())}}

    def chunks(self, batch: dict) -> list[list[int]]:
        return step_groups(batch["steps"], self.cfg.steps_per_backward)

    def loss(self, batch: dict, steps: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        latents, cond = batch["latents"], batch["cond"]
        mean_p, stds = step_transitions(self.policy, self.sched, latents, steps, cond, self.cfg.guidance)
        log_p = transition_log_probs(latents, steps, mean_p, stds)
        log_ratio = log_p - batch["log_probs"][:, steps].to(log_p.dtype)
        adv = batch["advantages"][:, None].expand_as(log_ratio)
        loss = ddpo_loss(log_ratio, adv, self.cfg.clip_range).mean()
        clipped = (log_ratio.detach().exp() - 1).abs() > self.cfg.clip_range
        stats = {"clip_fraction": float(clipped.float().mean()),
                 "log_ratio_abs": float(log_ratio.detach().abs().mean())}
        if self.cfg.kl_coef:  # the reference pass costs one more model call per step, so only when it is used
            mean_ref, _ = step_transitions(self.policy, self.sched, latents, steps, cond, self.cfg.guidance,
                                           reference=True)
            kl = step_kl(mean_p, mean_ref, stds).mean()
            loss = loss + self.cfg.kl_coef * kl
            stats["kl"] = float(kl.detach())
        return loss, stats

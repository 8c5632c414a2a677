"""Sampling with the policy through diffalign's DDIM scheduler, recording every latent and the log-probability of
each stochastic step, and recomputing those log-probabilities under the policy or the reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from inspect import signature

import torch

from ..samplers import make_scheduler
from ..samplers.ddim import DDIMScheduler
from .losses import gaussian_kl, gaussian_log_prob
from .policy import Policy


def ddim_scheduler(policy: Policy, num_steps: int, eta: float) -> DDIMScheduler:
    """diffalign's DDIM on the pipeline's own noise schedule, with ``num_steps`` steps and stochasticity ``eta``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    sched = DDIMScheduler.from_config(policy.pipe.scheduler.config, eta=eta)
    sched.set_timesteps(num_steps, device=policy.device)
    return sched


def stochastic_steps(sched: DDIMScheduler) -> list[int]:
    """Indices of the steps with a log-probability (std > 0; the last step to sigma = 0 is deterministic)."""
    return [i for i in range(len(sched.timesteps)) if sched.coefficients(i)[2] > 0]


def pick_steps(steps: list[int], fraction: float, generator: torch.Generator) -> list[int]:
    """A random subset (in order) of ``fraction`` of the steps, at least one."""
    keep = max(1, round(fraction * len(steps)))
    return [steps[i] for i in torch.randperm(len(steps), generator=generator)[:keep].sort().values]


def step_groups(steps: list[int], size: int) -> list[list[int]]:
    """``steps`` in groups of ``size`` (0: one group), back-propagated one after another."""
    size = size or len(steps)
    return [steps[i:i + size] for i in range(0, len(steps), size)]


@dataclass
class Trajectories:
    """Sampled trajectories of N images: ``latents`` [N, T + 1, ...] (x_T first) and ``log_probs`` [N, T] of each
    step under the sampling policy (0 where the step is deterministic)."""

    latents: torch.Tensor
    log_probs: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def sample_trajectories(policy: Policy, sched: DDIMScheduler, cond: torch.Tensor, x_T: torch.Tensor,
                        guidance: float = 1.0, generator: torch.Generator | None = None) -> Trajectories:
    """Sample with the policy (classifier-free guided with ``guidance``) from noise ``x_T`` (unit variance)."""
    x = x_T.to(device=policy.device, dtype=policy.dtype) * sched.init_noise_sigma
    latents, log_probs = [x], []
    for i, t in enumerate(sched.timesteps):
        out = policy.predict(sched.scale_model_input(x, t), t, cond, guidance)
        mean, std = sched.transition(out, x, i)
        if std > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = mean + std * noise
            log_probs.append(gaussian_log_prob(x, mean, std))
        else:
            x = mean
            log_probs.append(torch.zeros(x.shape[0], device=x.device))
        latents.append(x)
    return Trajectories(torch.stack(latents, 1), torch.stack(log_probs, 1))


def step_transitions(policy: Policy, sched: DDIMScheduler, latents: torch.Tensor, steps: Sequence[int],
                     cond: torch.Tensor, guidance: float = 1.0, reference: bool = False
                     ) -> tuple[torch.Tensor, list[float]]:
    """Means [N, K, ...] and standard deviations (K floats) of the Gaussian DDIM transitions out of the stored
    states ``latents[:, i]`` for the K stochastic step indices ``steps``, under the policy (differentiable) or the
    reference, in one batched model call."""
    n, k = latents.shape[0], len(steps)
    idx = torch.as_tensor(list(steps), device=latents.device)
    x = latents[:, idx].flatten(0, 1)
    t = sched.timesteps[idx.to(sched.timesteps.device)].to(latents.device).repeat(n)
    out = policy.predict(x, t, cond.repeat_interleave(k, 0), guidance, reference=reference)
    out, x = out.unflatten(0, (n, k)), x.unflatten(0, (n, k))
    means, stds = [], []
    for j, i in enumerate(steps):
        mean, std = sched.transition(out[:, j], x[:, j], int(i))
        if std <= 0:
            raise ValueError(f"step {i} is deterministic (std 0); it has no log-probability.")
        means.append(mean)
        stds.append(float(std))
    return torch.stack(means, 1), stds


def transition_log_probs(latents: torch.Tensor, steps: Sequence[int], means: torch.Tensor, stds: Sequence[float]
                         ) -> torch.Tensor:
    """log-probabilities [N, K] of the stored transitions ``latents[:, i] -> latents[:, i + 1]`` under the
    Gaussians of :func:`step_transitions`."""
    return torch.stack([gaussian_log_prob(latents[:, int(i) + 1], means[:, j], stds[j])
                        for j, i in enumerate(steps)], 1)


def step_log_probs(policy: Policy, sched: DDIMScheduler, latents: torch.Tensor, steps: Sequence[int],
                   cond: torch.Tensor, guidance: float = 1.0, reference: bool = False) -> torch.Tensor:
    """log-probabilities [N, K] of the stored transitions ``latents[:, i] -> latents[:, i + 1]`` for the K step
    indices ``steps`` (each a stochastic step), under the policy (differentiable) or the reference, in one batched
    model call."""
    means, stds = step_transitions(policy, sched, latents, steps, cond, guidance, reference)
    return transition_log_probs(latents, steps, means, stds)


def step_kl(policy_means: torch.Tensor, reference_means: torch.Tensor, stds: Sequence[float]) -> torch.Tensor:
    """KL(policy || reference) [N, K] of each step's Gaussian transition (:func:`~diffalign.align.losses.gaussian_kl`),
    the per-step terms whose sum bounds the KL of the final images (DPOK, Fan et al., NeurIPS 2023)."""
    return torch.stack([gaussian_kl(policy_means[:, j], reference_means[:, j], std)
                        for j, std in enumerate(stds)], 1)


@torch.no_grad()
def generate(policy: Policy, prompts: Sequence[str], x_T: torch.Tensor, sampler: str = "dpm-solver++",
             steps: int = 20, guidance: float = 1.0, generator: torch.Generator | None = None,
             batch_size: int = 256) -> torch.Tensor:
    """Images in [0, 1] of the policy with any registered sampler (evaluation), in batches."""
    cond = policy.encode(list(prompts))
    images = []
    for start in range(0, len(prompts), batch_size):
        sched = make_scheduler(sampler, policy.pipe.scheduler.config)
        sched.set_timesteps(steps, device=policy.device)
        x = x_T[start:start + batch_size].to(device=policy.device, dtype=policy.dtype) * sched.init_noise_sigma
        c = cond[start:start + batch_size]
        # stochastic samplers (DDIM with eta > 0, diffusers' ancestral ones) draw their noise from ``generator``
        takes_generator = "generator" in signature(sched.step).parameters
        kwargs = {"generator": generator} if generator is not None and takes_generator else {}
        for t in sched.timesteps:
            out = policy.predict(sched.scale_model_input(x, t), t, c, guidance)
            x = sched.step(out, t, x, **kwargs).prev_sample
        images.append(policy.decode(x))
    return torch.cat(images)

"""DDIM inversion with ReNoise averaging (Garibi et al., "ReNoise: Real Image Inversion Through Iterative
Noising", ECCV 2024), as SmPO-Diffusion uses it to noise its training images.

DDIM inversion runs the deterministic DDIM update (Song et al. 2021, Eq. 13) backwards, from the clean latent
(alphabar = 1) up to a timestep t on an even grid tau_1 < ... < tau_n = t:

    x0_hat = (z_prev - sqrt(1 - a_prev) eps) / sqrt(a_prev),   z = sqrt(a) x0_hat + sqrt(1 - a) eps.

The noise prediction eps should be taken at the *new* point z, which is unknown; plain inversion uses
eps(z_prev, tau). ReNoise iterates: eps_r = eps(z^(r), tau), z^(r + 1) = the update from z_prev with the mean of
eps_0 .. eps_r. SmPO's code does one such iteration (two model calls per step) with the conditional prompt and no
guidance, which are the defaults here.
"""

from __future__ import annotations

import torch

from .policy import Policy


def _move(z: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM update from alphabar ``a_from`` to ``a_to`` with noise prediction ``eps``."""
    x0 = (z - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def inversion_grid(t_end: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Timesteps [N, num_steps]: tau_j = round(t_end j / num_steps), j = 1 .. num_steps (so tau_n = t_end)."""
    if num_steps < 1:
        raise ValueError(f"inversion needs num_steps >= 1, got {num_steps}.")
    j = torch.arange(1, num_steps + 1, device=t_end.device, dtype=torch.float64)
    return torch.round(t_end.double()[:, None] * j / num_steps).long()


def _shape(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (like.dim() - 1))).to(torch.float32)


@torch.no_grad()
def invert(policy: Policy, x0: torch.Tensor, cond: torch.Tensor, t_end: torch.Tensor | int, num_steps: int = 5,
           renoise: int = 1, guidance: float = 1.0) -> torch.Tensor:
    """Latents at timestep ``t_end`` (one per sample, or one for all) reached by inverting clean latents ``x0``
    in ``num_steps`` DDIM steps with ``renoise`` ReNoise iterations per step (0: plain DDIM inversion), under the
    policy (the adapter enabled: SmPO inverts with the current model)."""
    if renoise < 0:
        raise ValueError(f"renoise must be >= 0, got {renoise}.")
    n = x0.shape[0]
    t_end = torch.as_tensor(t_end, device=x0.device).reshape(-1).expand(n)
    grid = inversion_grid(t_end, num_steps)
    ac = policy.alphas_cumprod.to(x0.device)
    z = x0.float()
    a_prev = torch.ones(n, dtype=torch.float64, device=x0.device)
    for j in range(num_steps):
        tau = grid[:, j]
        a_prev_b, a_b = _shape(a_prev, z), _shape(ac[tau], z)
        preds = []
        new = z
        for _ in range(renoise + 1):
            out = policy.predict(new.to(policy.dtype), tau, cond, guidance).float()
            preds.append(policy.split_prediction(out, new, tau)[1])
            new = _move(z, torch.stack(preds).mean(0), a_prev_b, a_b)
        z, a_prev = new, ac[tau]
    return z.to(x0.dtype)


@torch.no_grad()
def ddim_denoise(policy: Policy, z: torch.Tensor, cond: torch.Tensor, t_start: torch.Tensor | int,
                 num_steps: int = 5, guidance: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM from timestep ``t_start`` down to the clean latent on the grid :func:`invert` uses (the
    sampler an inversion is checked against)."""
    n = z.shape[0]
    t_start = torch.as_tensor(t_start, device=z.device).reshape(-1).expand(n)
    grid = inversion_grid(t_start, num_steps)
    ac = policy.alphas_cumprod.to(z.device)
    x = z.float()
    for j in reversed(range(num_steps)):
        tau = grid[:, j]
        a_b = _shape(ac[tau], x)
        a_next = _shape(ac[grid[:, j - 1]], x) if j > 0 else torch.ones_like(a_b)
        out = policy.predict(x.to(policy.dtype), tau, cond, guidance).float()
        x = _move(x, policy.split_prediction(out, x, tau)[1], a_b, a_next)
    return x.to(z.dtype)

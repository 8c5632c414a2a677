"""The alignment losses as pure tensor functions (no models, no sampling)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) averaged over all but the batch dimension (the per-pixel mean of the D3PO / DDPO
    reference code, ``ddim_step_with_logprob``): [N]."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    log_density = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


def d3po_loss(log_ratio_0: torch.Tensor, log_ratio_1: torch.Tensor, preference: torch.Tensor, beta: float = 0.1,
              clip: float = 0.1) -> torch.Tensor:
    """D3PO's per-step DPO loss (Yang et al. 2024, Eq. 11 with the code's ratio clamp), elementwise.

    ``log_ratio_i = log pi_theta(a_i | s_i) - log pi_ref(a_i | s_i)`` for the two images of a pair at one step;
    ``preference`` is +1 where image 0 is preferred, -1 where image 1 is, 0 for a tie. The code clamps the ratio
    r = exp(log_ratio) to [1 - clip, 1 + clip] (a trust region: no gradient outside) and minimises
    ``-log sigmoid(beta (h_0 log r_0 + h_1 log r_1))`` with (h_0, h_1) = (h, -h). Clamping the log ratio to
    [log(1 - clip), log(1 + clip)] is the same function without overflow in exp. A tie gives log 2, no gradient.
    """
    lo, hi = math.log(1.0 - clip), math.log(1.0 + clip)
    r0, r1 = log_ratio_0.clamp(lo, hi), log_ratio_1.clamp(lo, hi)
    h = preference.to(r0.dtype)
    return -F.logsigmoid(beta * h * (r0 - r1))


def implicit_accuracy(log_ratio_0: torch.Tensor, log_ratio_1: torch.Tensor, preference: torch.Tensor
                      ) -> torch.Tensor:
    """Fraction of non-tied pairs whose preferred image has the larger (unclipped) policy/reference log ratio
    (NaN when every pair is a tie)."""
    decided = preference != 0
    right = (preference * (log_ratio_0 - log_ratio_1) > 0) & decided
    return right.sum() / decided.sum() if decided.any() else torch.tensor(float("nan"))


def ddpo_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float = 1e-4) -> torch.Tensor:
    """DDPO's clipped surrogate (Black et al. 2024, PPO-clip per denoising step), elementwise:
    ``max(-A r, -A clamp(r, 1 - clip_range, 1 + clip_range))`` with r = pi_theta / pi_old = exp(log_ratio)."""
    ratio = torch.exp(log_ratio)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))

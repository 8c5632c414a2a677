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


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) per pixel, averaged over all but the batch dimension (the
    convention of :func:`gaussian_log_prob`): ``mean((mean_p - mean_q)^2) / (2 std^2)``, [N]. ``mean_q`` (the
    reference) is held constant."""
    std = torch.as_tensor(std, dtype=mean_p.dtype, device=mean_p.device)
    return (((mean_p - mean_q.detach()) ** 2) / (2 * std**2)).flatten(1).mean(1)


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


# ---------------------------------------------------------------------- the DPO family (Diffusion-DPO, RankDPO, SmPO)
def noise_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over all but the batch dimension (the per-element mean of the Diffusion-DPO code): [N]."""
    return ((prediction.float() - target.float()) ** 2).flatten(1).mean(1)


def dpo_logits(s_w: torch.Tensor, s_l: torch.Tensor, beta: float) -> torch.Tensor:
    """-(beta / 2) (s_w - s_l): the preference logit of Diffusion-DPO (Wallace et al. 2024, Supp. Eq. 46; the
    ``scale_term = -0.5 * beta_dpo`` of the authors' code), where ``s = error(policy) - error(reference)`` per image
    (:func:`noise_error`, a per-element mean). The 1/2 keeps the published beta = 2000-5000 meaningful: the paper's
    Eq. 14 folds it (and T omega(lambda_t)) into beta; diffusers' SD1.5 port drops it and halves beta instead."""
    return -0.5 * beta * (s_w - s_l)


def diffusion_dpo_loss(s_w: torch.Tensor, s_l: torch.Tensor, beta: float = 5000.0) -> torch.Tensor:
    """Diffusion-DPO, elementwise: ``-log sigmoid(-beta/2 (s_w - s_l))``; the winner's and the loser's errors are
    taken at the same t and noise."""
    return -F.logsigmoid(dpo_logits(s_w, s_l, beta))


def soft_dpo_loss(s_w: torch.Tensor, s_l: torch.Tensor, p: torch.Tensor, beta: float = 5000.0) -> torch.Tensor:
    """Diffusion-DPO on a soft label, elementwise: ``-p log sigmoid(h) - (1 - p) log sigmoid(-h)`` with the logit
    h = -beta/2 (s_w - s_l) (:func:`dpo_logits`) and p the probability that the first image is preferred.

    The Bradley-Terry cross-entropy on soft labels (conservative DPO, Mitchell 2023; reward distillation, Fisch et al.
    2024). p = 1 is :func:`diffusion_dpo_loss`. For p < 1 the loss is smallest at the finite margin h = logit(p),
    where its gradient vanishes; with hard labels it keeps falling as |h| grows."""
    h = dpo_logits(s_w, s_l, beta)
    return -(p * F.logsigmoid(h) + (1.0 - p) * F.logsigmoid(-h))


def dpo_implicit_accuracy(s_w: torch.Tensor, s_l: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose winner improved more on the reference than the loser (exact ties count 1/2, as the
    diffusers port)."""
    return ((s_w < s_l).float() + 0.5 * (s_w == s_l).float()).mean()


def rank_gains(phi: torch.Tensor) -> torch.Tensor:
    """RankDPO's gain G = 2^phi - 1 (Eq. 6)."""
    return torch.pow(2.0, phi) - 1.0


def rank_dpo_weights(phi: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)| with D(tau) = ln(1 + tau) (RankDPO Eq. 6, the DCG /
    LambdaLoss weight), for the images of each prompt: phi [P, k] and 1-based ranks tau [P, k] -> [P, k, k]."""
    g = rank_gains(phi)
    inv_d = 1.0 / torch.log1p(ranks.to(phi.dtype))
    return (g[:, :, None] - g[:, None, :]).abs() * (inv_d[:, :, None] - inv_d[:, None, :]).abs()


def ranks_of(values: torch.Tensor, descending: bool, share_ties: bool = False) -> torch.Tensor:
    """1-based ranks along the last dimension (1 = first in the given order). Ties are broken by position, or with
    ``share_ties`` share their mean rank (equal labels, equal weights)."""
    if share_ties:
        v, other = values[..., :, None], values[..., None, :]
        before = ((other > v) if descending else (other < v)).sum(-1)
        return before.to(torch.float64) + ((other == v).sum(-1).to(torch.float64) + 1) / 2
    order = torch.sort(values, dim=-1, descending=descending, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(1, values.shape[-1] + 1, device=values.device).expand_as(order))
    return ranks


def rank_dpo_loss(s: torch.Tensor, phi: torch.Tensor, beta: float = 5000.0, ranking: str = "predicted",
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """RankDPO (Karthik et al., ICCV 2025, Eq. 7) per prompt: ``sum over pairs with phi_i > phi_j of
    Delta_ij * -log sigmoid(-beta/2 (s_i - s_j))`` for scores s [P, k] (:func:`noise_error` differences, one t and
    one noise per prompt) and soft labels phi [P, k] (pairwise win fractions) -> [P].

    The discount's ranks tau come from ``ranking``:

    * ``"predicted"`` (default): the current model's ranking, s ascending (the lowest error relative to the
      reference ranks first), as the paper's Figure 2 and the LambdaLoss / LiPO-lambda objectives it builds on
      describe; the weights then carry no gradient;
    * ``"label"``: the ranking by phi (Eq. 6 and Algorithm 2 as written; with k = 2 this is the paper's "DPO + gain
      weights" ablation).

    ``weights`` [P, k, k] replaces Delta (all ones: Diffusion-DPO summed over every decided pair). The 1/2 in the
    logit is Diffusion-DPO's convention, so the same beta means the same pair term.
    """
    if s.shape != phi.shape or s.dim() != 2 or s.shape[1] < 2:
        raise ValueError(f"rank_dpo_loss needs scores and labels of shape [prompts, k >= 2], got {tuple(s.shape)} "
                         f"and {tuple(phi.shape)}.")
    if weights is None:
        if ranking not in ("predicted", "label"):
            raise ValueError(f"ranking must be 'predicted' or 'label', got {ranking!r}.")
        # predicted ranks break ties by position: at initialisation every s is 0, and shared ranks would give every
        # pair weight 0 for good; tied labels share their rank
        ranks = (ranks_of(s.detach(), descending=False) if ranking == "predicted"
                 else ranks_of(phi, descending=True, share_ties=True))
        weights = rank_dpo_weights(phi.to(s.dtype), ranks)
    better = (phi[:, :, None] > phi[:, None, :]).to(s.dtype)  # i preferred over j
    pair = -F.logsigmoid(dpo_logits(s[:, :, None], s[:, None, :], beta))
    return (weights.detach() * better * pair).sum((1, 2))


def smpo_preference(score_w: torch.Tensor, score_l: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """SmPO's smoothed preference p = sigmoid(s~_w - s~_l) of two reward scores normalised as
    s~ = (s - low) / (high - low) (the authors' code: PickScore cosines with low / high = 0.1154 / 0.2820)."""
    scale = high - low
    if not scale > 0:
        raise ValueError(f"SmPO's score normalisation needs high > low, got low={low}, high={high}.")
    return torch.sigmoid((score_w - score_l) / scale)


def smpo_loss(s_w: torch.Tensor, s_l: torch.Tensor, p: torch.Tensor, beta: float = 2000.0,
              gamma: float = 10.0) -> torch.Tensor:
    """SmPO-Diffusion (Lu et al., ICML 2025), elementwise: ``-log sigmoid(gamma (2p - 1) * -beta/2 (s_w - s_l))``.

    The winner's likelihood is replaced by the mixture p(x^w)^alpha p(x^l)^(gamma - alpha) with alpha / gamma = p,
    which scales the Diffusion-DPO logit by 2 alpha - gamma = gamma (2p - 1) (the authors' code:
    ``scale = -0.5 * beta * (2p - 1) * 10``). As p -> 1/2 (equal scores) the loss tends to log 2 with no gradient;
    p = 1 with gamma = 1 is Diffusion-DPO.
    """
    return -F.logsigmoid(gamma * (2.0 * p - 1.0) * dpo_logits(s_w, s_l, beta))


# ---------------------------------------------------------------------- Distillation-DPO
def dmd_gradient(x0: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The distribution-matching gradient of a generator sample x0 (DMD, Yin et al. 2024, Eq. 7-8, in x0 form):
    ``(x0_fake - x0_teacher) / mean|x0 - x0_teacher|`` per sample, where x0_teacher / x0_fake are the teacher's and
    the fake-score network's denoised predictions of the re-noised sample. Descending it moves x0 toward the
    teacher's prediction (x0_teacher - x0_fake is proportional to eps_fake - eps_teacher). No gradient."""
    norm = (x0 - x0_teacher).abs().flatten(1).mean(1).clamp(min=1e-6)
    return ((x0_fake - x0_teacher) / norm.reshape(-1, *([1] * (x0.dim() - 1)))).detach()


def distill_dpo_generator_loss(x0_w: torch.Tensor, g_w: torch.Tensor, x0_l: torch.Tensor, g_l: torch.Tensor,
                               loser_weight: float = 0.5, loser_clip: float = 1.0) -> torch.Tensor:
    """Distillation-DPO's generator loss per pair, in the stop-gradient form that lets gradients reach the student:
    ``0.5 mse(x0_w, sg(x0_w - g_w)) - lambda 0.5 mse(x0_l, sg(x0_l - clip(g_l)))``, whose gradient in x0_w is g_w
    (winners move toward the teacher) and in x0_l is -lambda clip(g_l) (losers move away), both divided by the
    number of elements. The released code multiplies the score difference by x_t - x0, which does not depend on
    x0, so no gradient reaches the student there; the bounded loser term keeps the negative KL finite."""
    g_l = g_l.clamp(-loser_clip, loser_clip)
    win = 0.5 * ((x0_w - (x0_w - g_w).detach()) ** 2).flatten(1).mean(1)
    lose = 0.5 * ((x0_l - (x0_l - g_l).detach()) ** 2).flatten(1).mean(1)
    return win - loser_weight * lose

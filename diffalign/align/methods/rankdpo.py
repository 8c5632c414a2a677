"""RankDPO (Karthik et al., "Scalable Ranked Preference Optimization for Text-to-Image Generation", ICCV 2025).

No code is public; this reads Sec. 3.3 as follows. The k images of a prompt share one t and one noise (the paper
does not say); each image's score s_i is Diffusion-DPO's per-image error difference (per-element mean); every pair
with phi_i > phi_j contributes ``Delta_ij * -log sigmoid(-beta/2 (s_i - s_j))`` (Diffusion-DPO's pair term with its
1/2), summed over the pairs of a prompt and averaged over prompts. Delta_ij = |2^phi_i - 2^phi_j| *
|1/ln(1 + tau_i) - 1/ln(1 + tau_j)| with tau the ranks *predicted by the current model* (s ascending), as the
paper's Figure 2 and the LambdaLoss objective it cites describe (``ranking="label"``: the ranks of phi, Eq. 6 as
written, the "DPO + gain weights" ablation at k = 2). ``weighting="none"`` gives every decided pair weight 1
(Diffusion-DPO over all pairs of the ranking). See :func:`~diffalign.align.losses.rank_dpo_loss`.
"""

from __future__ import annotations

import torch

from ..config import RankDPOConfig
from ..losses import rank_dpo_loss
from .preference import PreferenceMethod


class RankDPO(PreferenceMethod):
    name = "rankdpo"
    config_class = RankDPOConfig
    group_size = None  # all k images of a row

    def select(self, phi, scores, generator):
        return torch.arange(phi.shape[1]).expand(phi.shape[0], -1)

    def objective(self, s, batch, rows):
        phi = batch["phi"][rows].to(s.dtype)
        weights = torch.ones(*phi.shape, phi.shape[1], dtype=s.dtype, device=s.device) \
            if self.cfg.weighting == "none" else None
        loss = rank_dpo_loss(s, phi, self.cfg.beta, self.cfg.ranking, weights).mean()
        better = phi[:, :, None] > phi[:, None, :]
        right = (s.detach()[:, :, None] < s.detach()[:, None, :]) & better
        acc = right.sum() / better.sum() if better.any() else torch.tensor(float("nan"))
        return loss, {"implicit_acc": float(acc)}

"""Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024).

The winner and the loser of a pair are noised at the same t with the same noise; the loss
``-log sigmoid(-beta/2 [(e_w - e_w^ref) - (e_l - e_l^ref)])`` (:func:`~diffalign.align.losses.diffusion_dpo_loss`)
rewards the policy for improving on the reference more for the winner than for the loser. From rankings of k > 2
images a random decided pair per prompt is used.

With ``label_temperature`` tau the hard label becomes p = sigmoid((r_w - r_l) / tau) from the target reward's
scores (:func:`~diffalign.align.losses.soft_dpo_loss`): near-ties are held level (p near 1/2) instead of pushed
apart; exact ties are still not selected.
With ``sft`` it is the authors' supervised baseline: the denoising loss on the winners alone. Only the winners go
through the network then (and through the reference only for ``kl_coef``), so no implicit accuracy is logged.
"""

from __future__ import annotations

import torch

from ..config import DiffusionDPOConfig
from ..losses import diffusion_dpo_loss, dpo_implicit_accuracy, noise_error, soft_dpo_loss
from .preference import PreferenceMethod, masked_mean


class DiffusionDPO(PreferenceMethod):
    name = "diffusion-dpo"
    config_class = DiffusionDPOConfig
    scores_for = " for its soft labels (label_temperature)"

    def __init__(self, cfg: DiffusionDPOConfig, policy):
        self.uses_scores = cfg.label_temperature is not None
        super().__init__(cfg, policy)

    def loss(self, batch, rows):
        if not self.cfg.sft:
            return super().loss(batch, rows)
        # the winners of the decided pairs (an on-policy tie trains nothing), through the policy alone
        decided = batch["phi"][rows, 0] > batch["phi"][rows, 1]
        x, y, t, cond = batch["noisy"][rows, 0], batch["target"][rows, 0], batch["t"][rows], batch["cond"][rows]
        out = self.policy.predict(x, t, cond)
        loss = masked_mean(noise_error(out, y), decided)
        if not self.cfg.kl_coef:
            return loss, {}
        kl = noise_error(out, self.policy.predict(x, t, cond, reference=True)).mean()
        return loss + self.cfg.kl_coef * kl, {"kl": float(kl.detach())}

    def objective(self, s, batch, rows):
        stats = {}
        if self.cfg.label_temperature is not None:
            scores = batch["scores"][rows]
            decided = scores[:, 0] > scores[:, 1]
            p = torch.sigmoid((scores[:, 0] - scores[:, 1]) / self.cfg.label_temperature).to(s.dtype)
            # every decided pair (near-ties pulled toward h = 0); an exact tie (on-policy) trains nothing
            loss = masked_mean(soft_dpo_loss(s[:, 0], s[:, 1], p, self.cfg.beta), decided)
            stats["label_p"] = float(p.mean())
        else:
            decided = batch["phi"][rows, 0] > batch["phi"][rows, 1]
            loss = masked_mean(diffusion_dpo_loss(s[:, 0], s[:, 1], self.cfg.beta), decided)
        acc = float(dpo_implicit_accuracy(s[decided, 0], s[decided, 1])) if decided.any() else float("nan")
        return loss, {"implicit_acc": acc, **stats}

"""Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024).

The winner and the loser of a pair are noised at the same t with the same noise; the loss
``-log sigmoid(-beta/2 [(e_w - e_w^ref) - (e_l - e_l^ref)])`` (:func:`~diffalign.align.losses.diffusion_dpo_loss`)
rewards the policy for improving on the reference more for the winner than for the loser. From rankings of k > 2
images a random decided pair per prompt is used.
"""

from __future__ import annotations

from ..config import DiffusionDPOConfig
from ..losses import diffusion_dpo_loss
from .preference import PreferenceMethod, masked_mean


class DiffusionDPO(PreferenceMethod):
    name = "diffusion-dpo"
    config_class = DiffusionDPOConfig

    def objective(self, s, batch, rows):
        decided = batch["phi"][rows, 0] > batch["phi"][rows, 1]
        loss = masked_mean(diffusion_dpo_loss(s[:, 0], s[:, 1], self.cfg.beta), decided)
        acc = masked_mean((s[:, 0] < s[:, 1]).float() + 0.5 * (s[:, 0] == s[:, 1]).float(), decided)
        return loss, {"implicit_acc": float(acc) if decided.any() else float("nan")}

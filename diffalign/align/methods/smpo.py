"""SmPO-Diffusion (Lu et al., "Smoothed Preference Optimization via ReNoise Inversion for Aligning Diffusion Models
with Varied Human Preferences", ICML 2025), as the authors' code implements it (a fork of Diffusion-DPO's):

* the winner of a pair is the image with the higher reward score, and the hard label becomes the smoothed
  p = sigmoid(s~_w - s~_l) of the normalised scores; the Diffusion-DPO logit is scaled by gamma (2p - 1)
  (:func:`~diffalign.align.losses.smpo_loss`), so pairs of nearly equal score carry nearly no gradient;
* the training input of each clean image is its ReNoise inversion to t by the current model
  (:mod:`diffalign.align.inversion`), and the regression target the noise that inversion implies,
  eps = (z_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), instead of shared random forward noise.

One change from the authors' code: their inversion runs every grid step below t (every 200 of 1000 steps) and stops
there, leaving an x0 residual in the target; here the n inversion steps end exactly at t.
"""

from __future__ import annotations

from ..config import SmPOConfig
from ..inversion import invert
from ..losses import smpo_loss, smpo_preference
from .preference import PreferenceMethod, masked_mean, training_target


class SmPO(PreferenceMethod):
    name = "smpo"
    config_class = SmPOConfig
    uses_scores = True

    def __init__(self, cfg: SmPOConfig, policy):
        super().__init__(cfg, policy)
        self.score_range = None
        if (cfg.score_low is None) != (cfg.score_high is None):
            raise ValueError("set both score_low and score_high, or neither (null: the data's range).")
        if cfg.score_low is not None:
            self.score_range = (cfg.score_low, cfg.score_high)
        elif self.data is not None:
            values = self.data.scores[self.score_name]
            self.score_range = (float(values.min()), float(values.max()))

    def noise(self, x0, cond, t, generator):
        if self.cfg.inversion_steps == 0:
            return super().noise(x0, cond, t, generator)
        p, g = x0.shape[:2]
        flat, tt = x0.flatten(0, 1), t.repeat_interleave(g)
        z = invert(self.policy, flat, cond.repeat_interleave(g, 0), tt, self.cfg.inversion_steps,
                   self.cfg.renoise).float()
        a = self.policy.alphas_cumprod[tt].float().reshape(-1, *([1] * (flat.dim() - 1)))
        eps = (z - a.sqrt() * flat.float()) / (1 - a).sqrt()
        target = training_target(self.policy.prediction_type, flat.float(), eps, a)
        return z.to(x0.dtype).unflatten(0, (p, g)), target.to(x0.dtype).unflatten(0, (p, g))

    def objective(self, s, batch, rows):
        scores = batch["scores"][rows]
        low, high = self.score_range or (float(batch["scores"].min()), float(batch["scores"].max()))
        if not high > low:  # an on-policy batch whose images all scored the same
            high = low + 1.0
        p = smpo_preference(scores[:, 0], scores[:, 1], low, high).to(s.dtype)
        decided = scores[:, 0] > scores[:, 1]
        loss = masked_mean(smpo_loss(s[:, 0], s[:, 1], p, self.cfg.beta, self.cfg.gamma), decided)
        acc = masked_mean((s[:, 0] < s[:, 1]).float(), decided)
        return loss, {"implicit_acc": float(acc) if decided.any() else float("nan"), "smpo_p": float(p.mean())}

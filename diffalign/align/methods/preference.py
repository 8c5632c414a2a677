"""What the DPO family shares (Diffusion-DPO, RankDPO, SmPO): rows of k images of one prompt with soft labels,
from a preference dataset or sampled on-policy and ranked by a reward; one timestep and one noise per prompt; and
the per-image score s = ||target - policy||^2 - ||target - reference||^2 (per-element means,
:func:`~diffalign.align.losses.noise_error`). A method says which images of a row it trains on
(:meth:`PreferenceMethod.select`), how it noises them (:meth:`PreferenceMethod.noise`) and its objective.
"""

from __future__ import annotations

import torch

from ..config import PreferenceConfig
from ..data import load_preferences, phi_from_scores
from ..losses import noise_error
from ..policy import Policy
from ..rewarding import build_reward, score
from ..trajectory import generate


def training_target(kind: str, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What the network regresses at alphabar ``a`` for its prediction type."""
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if kind == "sample":
        return x0
    raise ValueError(f"the DPO family supports epsilon, v_prediction and sample models, not {kind!r}.")


class PreferenceMethod:
    """The shared data path and score of the DPO family; subclasses define ``select`` / ``noise`` / ``objective``."""

    name = "preference"
    config_class = PreferenceConfig
    uses_scores = False
    """The method needs the target reward's scores (SmPO), not only labels."""
    scores_for = ""
    """What the scores are for, in the error when a dataset has none."""

    def __init__(self, cfg: PreferenceConfig, policy: Policy):
        cfg.check()
        self.cfg, self.policy = cfg, policy
        self.data = None
        if cfg.data is not None:
            data = load_preferences(cfg.data)
            self.score_name = self._score_name(data)
            self.data = data.ranked_by(self.score_name if (cfg.reward is not None or self.uses_scores) else None)
            self.data.check_images(policy.image_shape[1:], cfg.resize)
            self.rows = self.data.check_decided()
            for p in dict.fromkeys(self.data.prompts):
                policy.check_prompts([p])
            self.k = self.data.k
            self.reward = None
        else:
            self.reward = build_reward(cfg.reward, cfg.model, cfg.reward_kwargs)
            self.prompts = policy.training_prompts(cfg.prompts)
            self.k = cfg.k
        self.group = self.k if self.group_size is None else self.group_size
        self.images_per_batch = cfg.prompts_per_step * self.group

    group_size: int | None = 2
    """Images per prompt a loss sees (None: all k of the row)."""

    def _score_name(self, data) -> str | None:
        if self.cfg.reward is not None:
            if "," in self.cfg.reward and self.uses_scores:
                raise ValueError(f"{self.name} uses one reward's scores{self.scores_for}; `reward` names several "
                                 f"({self.cfg.reward}). Name one, or rank by several without scores.")
            return self.cfg.reward
        if self.uses_scores:
            if not data.scores:
                raise ValueError(f"{self.name} needs reward scores{self.scores_for}, and {data.source} has none "
                                 "(only labels); score the images (`diffalign data synth`) or train on-policy with a "
                                 "`reward`.")
            if len(data.scores) > 1:
                raise ValueError(f"{data.source} has scores of several rewards ({', '.join(data.scores)}); set "
                                 f"`reward` to the one {self.name} should use.")
            return next(iter(data.scores))
        return None

    # ------------------------------------------------------------------ data
    def _rows(self, generator: torch.Generator) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prompts, images [P, k, C, H, W] in [0, 1], phi [P, k] and the target reward's scores [P, k] (or None)."""
        p = self.cfg.prompts_per_step
        if self.data is not None:
            rows = [self.rows[i] for i in torch.randint(len(self.rows), (p,), generator=generator)]
            images = self.data.images(rows, self.policy.image_shape[1:], self.policy.image_shape[0], self.cfg.resize)
            scores = self.data.scores[self.score_name][rows] if self.score_name in self.data.scores else None
            return [self.data.prompts[i] for i in rows], images, self.data.phi[rows], scores
        prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (p,), generator=generator)]
        flat_prompts = [q for q in prompts for _ in range(self.k)]
        x_T = torch.randn((p * self.k, *self.policy.latent_shape), generator=generator)
        images = generate(self.policy, flat_prompts, x_T, self.cfg.sampler, self.cfg.sample_steps, self.cfg.guidance,
                          generator=generator)
        values = score(self.reward, images, flat_prompts)
        if values.shape[1] != 1:
            raise ValueError(f"{self.name} ranks by a scalar reward; name one reward.")
        scores = values[:, 0].reshape(p, self.k).cpu()
        return prompts, images.unflatten(0, (p, self.k)).cpu(), phi_from_scores([scores]), scores

    def select(self, phi: torch.Tensor, scores: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """Indices [P, group] of the images of each row to train on: by default one decided pair, winner first
        (``pair_selection``: a random one, or the best against the worst)."""
        if self.cfg.pair_selection == "extremes":
            return torch.stack([phi.argmax(1), phi.argmin(1)], 1)  # a row of ties: any pair, given no weight
        pick = []
        for row in phi:
            pairs = [(i, j) for i in range(len(row)) for j in range(len(row)) if row[i] > row[j]]
            if not pairs:  # an on-policy tie: any pair (the objective gives it no weight)
                pairs = [(0, 1)]
            pick.append(pairs[int(torch.randint(len(pairs), (1,), generator=generator))])
        return torch.tensor(pick)

    def noise(self, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy latents and regression targets [P, g, ...]: forward noise at t, shared by the images of a prompt."""
        a = self.policy.alphas_cumprod[t].float().reshape(-1, 1, *([1] * (x0.dim() - 2))).to(x0.device)
        eps = torch.randn((x0.shape[0], 1, *x0.shape[2:]), generator=generator).to(x0.device, x0.dtype)
        eps = eps.expand_as(x0)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return noisy, training_target(self.policy.prediction_type, x0, eps, a)

    def collect(self, generator: torch.Generator) -> dict:
        prompts, images, phi, scores = self._rows(generator)
        stats = {} if self.reward is None else {"reward_mean": float(scores.mean())}  # all k images of each prompt
        idx = self.select(phi, scores, generator)
        take = idx[:, :, None, None, None].expand(-1, -1, *images.shape[2:])
        images = torch.gather(images, 1, take)
        phi = torch.gather(phi, 1, idx)
        scores = torch.gather(scores, 1, idx) if scores is not None else None
        p, g = images.shape[:2]
        x0 = self.policy.encode_images(images.flatten(0, 1)).unflatten(0, (p, g))
        cond = self.policy.encode(prompts)
        drop = torch.rand(p, generator=generator) < self.cfg.caption_dropout
        if drop.any():
            cond = cond.clone()
            cond[drop.to(cond.device)] = self.policy.null_condition(int(drop.sum()))
        t = torch.randint(len(self.policy.alphas_cumprod), (p,), generator=generator).to(self.policy.device)
        noisy, target = self.noise(x0, cond, t, generator)
        return {"noisy": noisy, "target": target, "t": t, "cond": cond, "phi": phi.to(noisy.device),
                "scores": None if scores is None else scores.to(noisy.device), "stats": stats}

    def chunks(self, batch: dict) -> list[list[int]]:
        return [list(range(batch["noisy"].shape[0]))]

    # ------------------------------------------------------------------ loss
    def image_scores(self, batch: dict, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, kl) per image, [len(rows), g] each, differentiable in the policy: s = error(policy) -
        error(reference), and kl the per-pixel mean of (policy output - reference output)^2 (``kl_coef``)."""
        noisy, target = batch["noisy"][rows], batch["target"][rows]
        p, g = noisy.shape[:2]
        x, y = noisy.flatten(0, 1), target.flatten(0, 1)
        t = batch["t"][rows].repeat_interleave(g)
        cond = batch["cond"][rows].repeat_interleave(g, 0)
        out, out_ref = self.policy.predict(x, t, cond), self.policy.predict(x, t, cond, reference=True)
        s = noise_error(out, y) - noise_error(out_ref, y)
        return s.unflatten(0, (p, g)), noise_error(out, out_ref).unflatten(0, (p, g))

    def loss(self, batch: dict, rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        s, kl = self.image_scores(batch, rows)
        loss, stats = self.objective(s, batch, rows)
        kl = kl.mean()
        if self.cfg.kl_coef:
            loss = loss + self.cfg.kl_coef * kl
        return loss, {"score_abs": float(s.detach().abs().mean()), "kl": float(kl.detach()), **stats}

    def objective(self, s: torch.Tensor, batch: dict, rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the entries where ``mask`` holds (zero, still differentiable, where none does)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)

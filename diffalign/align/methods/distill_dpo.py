"""Distillation-DPO for image diffusion models (after "Diffusion Distillation With Direct Preference Optimization
For Efficient 3D LiDAR Scene Completion", whose code does LiDAR completion).

A few-step student (the policy's LoRA; the teacher is the same UNet with the adapter disabled) samples two images
per prompt from different noise; a reward ranks them. Two fake-score networks (LoRA adapters on the teacher) learn
the scores of the student's winning and losing samples with the denoising loss; the student then takes a
distribution-matching step (DMD, Yin et al. 2024) that pulls winners toward the teacher's distribution and pushes
losers away:

    g_w = (x0_fake_w - x0_teacher) / mean|x0_w - x0_teacher|     (at x_t^w; the teacher with classifier-free guidance)
    L_G = 0.5 mse(x0_w, sg(x0_w - g_w)) - lambda 0.5 mse(x0_l, sg(x0_l - clip(g_l)))  (+ regression onto the teacher)

in the stop-gradient form (:func:`~diffalign.align.losses.distill_dpo_generator_loss`): the released code's
``(eps_T - eps_fake) * (x_t - x0)`` passes no gradient to the student. The two updates alternate, each with its
own optimizer (the engine's ``phases``). The student samples with deterministic DDIM on a trailing grid of
``student_steps`` steps; the generator update uses its x0 prediction at one random step of that grid, reached
without gradient (DMD2's backward simulation). An optional regression of the student's samples onto teacher
samples from the same noise (DMD's stabiliser) backpropagates through all student steps.
"""

from __future__ import annotations

import torch
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from ...samplers import make_scheduler
from ...samplers.ddim import DDIMScheduler
from ..config import DistillDPOConfig
from ..losses import distill_dpo_generator_loss, dmd_gradient, noise_error
from ..policy import Policy, keep_requires_grad, lora_config, use_adapter
from ..rewarding import build_reward, score
from .preference import training_target

FAKES = ("fake_w", "fake_l")


def student_scheduler(policy: Policy, steps: int) -> DDIMScheduler:
    """Deterministic DDIM on the trailing grid of ``steps`` steps (starts at t = T - 1)."""
    sched = DDIMScheduler.from_config(policy.pipe.scheduler.config, eta=0.0, timestep_spacing="trailing")
    sched.set_timesteps(steps, device=policy.device)
    return sched


class DistillDPO:
    name = "distill-dpo"
    config_class = DistillDPOConfig
    phases = ("fake", "main")

    def __init__(self, cfg: DistillDPOConfig, policy: Policy):
        cfg.check()
        if policy.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"the teacher predicts {policy.prediction_type!r}; the student's DDIM sampler and the "
                             "score distillation need epsilon, v_prediction or sample prediction.")
        if policy.lora is None and not policy.full_finetune:
            raise ValueError("distill-dpo trains a student: give LoRA settings or full_finetune.")
        self.cfg, self.policy = cfg, policy
        self.reward = build_reward(cfg.reward, cfg.model, cfg.reward_kwargs)
        self.prompts = policy.training_prompts(cfg.prompts)
        self.sched = student_scheduler(policy, cfg.student_steps)
        # the fake-score networks: LoRA adapters on the teacher (the shared UNet, or the frozen copy of a full
        # fine-tune), initialised to zero, so each starts as the teacher
        self.host = policy._reference_unet if policy._reference_unet is not None else policy.unet
        self.fake_params: list[torch.nn.Parameter] = []
        with keep_requires_grad(self.host):
            for name in FAKES:
                inject_adapter_in_model(lora_config(self.host, cfg.fake_lora), self.host, adapter_name=name)
            for layer in self.host.modules():  # injecting activates the new adapter: the student's stays active
                if isinstance(layer, BaseTunerLayer):
                    layer.set_adapter([a for a in layer.active_adapters if a not in FAKES] or ["default"])
        for pname, prm in self.host.named_parameters():
            if any(f".{name}." in pname for name in FAKES):
                prm.requires_grad_(True)
                self.fake_params.append(prm)
        self.images_per_batch = 2 * cfg.pairs_per_step
        self.export_info = {"sampling": {"sampler": "ddim", "steps": cfg.student_steps,
                                         "scheduler_config": {"timestep_spacing": "trailing", "eta": 0.0}}}
        self.bank = self._teacher_bank() if cfg.regression_weight > 0 else None

    # ------------------------------------------------------------------ engine hooks
    def phase_parameters(self, phase: str) -> list[torch.nn.Parameter]:
        return self.fake_params

    def phase_lr(self, phase: str) -> float:
        return self.cfg.fake_lr

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().contiguous()
                for name in FAKES for k, v in get_peft_model_state_dict(self.host, adapter_name=name).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in FAKES:
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            set_peft_model_state_dict(self.host, part, adapter_name=name)

    # ------------------------------------------------------------------ networks
    def _fake(self, name: str, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with use_adapter(self.host, name):
            return self.policy.predict_with(self.host, x, t, cond)

    def _student_x0(self, x: torch.Tensor, index: int, cond: torch.Tensor) -> torch.Tensor:
        t = self.sched.timesteps[index]
        return self.sched.predict_x0_eps(self.policy.predict(x, t, cond), x, index)[0]

    def _student_sample(self, x: torch.Tensor, cond: torch.Tensor, until: int | None = None) -> list[torch.Tensor]:
        """The student's latents x_0 (noise) .. x_K (sample), or up to step ``until``."""
        xs = [x]
        for i in range(len(self.sched.timesteps) if until is None else until):
            out = self.policy.predict(xs[-1], self.sched.timesteps[i], cond)
            xs.append(self.sched.transition(out, xs[-1], i)[0])
        return xs

    @torch.no_grad()
    def _teacher_bank(self) -> dict[str, torch.Tensor]:
        """Teacher samples from fixed noise (the regression targets)."""
        cfg, policy = self.cfg, self.policy
        gen = torch.Generator().manual_seed(cfg.seed + 7_919)
        n = cfg.regression_pairs
        prompts = [self.prompts[i % len(self.prompts)] for i in range(n)]
        z = torch.randn((n, *policy.latent_shape), generator=gen).to(policy.device, policy.dtype)
        cond = policy.encode(prompts)
        sched = make_scheduler(cfg.regression_sampler, policy.pipe.scheduler.config)
        sched.set_timesteps(cfg.regression_steps, device=policy.device)
        x = z * sched.init_noise_sigma
        for t in sched.timesteps:
            out = policy.predict(sched.scale_model_input(x, t), t, cond, cfg.teacher_guidance, reference=True)
            x = sched.step(out, t, x).prev_sample
        return {"noise": z, "cond": cond, "sample": x}

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def collect(self, generator: torch.Generator) -> dict:
        cfg, policy = self.cfg, self.policy
        p = cfg.pairs_per_step
        prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (p,), generator=generator)]
        cond = policy.encode(prompts)
        noise = torch.randn((2 * p, *policy.latent_shape), generator=generator).to(policy.device, policy.dtype)
        cond2 = torch.cat([cond, cond])
        xs = self._student_sample(noise, cond2)
        rewards = score(self.reward, policy.decode(xs[-1]), prompts * 2)
        if rewards.shape[1] != 1:
            raise ValueError("distill-dpo ranks pairs by a scalar reward; name one reward.")
        r = rewards[:, 0].reshape(2, p)
        first_wins = r[0] >= r[1]
        keep = (r[0] - r[1]).abs() >= max(cfg.min_reward_gap, 0.0)
        keep &= r[0] != r[1]
        k = int(torch.randint(len(self.sched.timesteps), (1,), generator=generator))
        x_k = xs[k].reshape(2, p, *xs[k].shape[1:])
        order = torch.stack([torch.where(first_wins, 0, 1), torch.where(first_wins, 1, 0)])  # [2, P]: winner, loser
        x_k = torch.stack([x_k[order[j], torch.arange(p)] for j in range(2)])
        x0 = self._student_x0(x_k.flatten(0, 1), k, cond2)
        t = torch.randint(cfg.t_min, cfg.t_max + 1, (4, p), generator=generator).to(policy.device)
        eps = torch.randn((4, p, *policy.latent_shape), generator=generator).to(policy.device, policy.dtype)
        reg = (torch.randint(cfg.regression_pairs, (cfg.regression_batch,), generator=generator)
               if self.bank is not None else None)
        gap = (r.max(0).values - r.min(0).values)
        return {"x_k": x_k, "k": k, "x0": x0.reshape(2, p, *x0.shape[1:]), "cond": cond, "keep": keep.to(policy.device),
                "t": t, "eps": eps, "reg": reg,
                "stats": {"reward_mean": float(r.mean()), "pairs_skipped": float((~keep).float().mean()),
                          "reward_gap": float(gap.mean())}}

    def chunks(self, batch: dict) -> list[list[int]]:
        return [list(range(batch["cond"].shape[0]))]

    def _noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self.policy.alphas_cumprod[t].float().reshape(-1, *([1] * (x0.dim() - 1)))
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * eps.float()).to(x0.dtype)

    # ------------------------------------------------------------------ losses
    def loss(self, batch: dict, rows: list[int], phase: str = "main") -> tuple[torch.Tensor, dict[str, float]]:
        keep = batch["keep"][rows].float()
        n_keep = keep.sum().clamp(min=1.0)
        cond = batch["cond"][rows]
        if phase == "fake":  # denoising loss of each fake network on its samples, independent t and noise
            total = 0.0
            for j, name in enumerate(FAKES):
                x0, t, eps = batch["x0"][j, rows], batch["t"][j, rows], batch["eps"][j, rows]
                x_t = self._noised(x0, t, eps)
                out = self._fake(name, x_t, t, cond)
                a = self.policy.alphas_cumprod[t].float().reshape(-1, *([1] * (x0.dim() - 1)))
                target = training_target(self.policy.prediction_type, x0.float(), eps.float(), a)
                total = total + (noise_error(out, target) * keep).sum() / n_keep
            return total, {}
        # the generator: x0 of the winner and the loser with gradient, at the same t and noise
        x_k = batch["x_k"][:, rows]
        p = len(rows)
        x0 = self._student_x0(x_k.flatten(0, 1), batch["k"], torch.cat([cond, cond]))
        t = batch["t"][2, rows].repeat(2)
        x_t = self._noised(x0.detach(), t, batch["eps"][2, rows].repeat(2, *([1] * (x0.dim() - 1))))
        with torch.no_grad():
            teacher = self.policy.split_prediction(
                self.policy.predict(x_t, t, torch.cat([cond, cond]), self.cfg.teacher_guidance, reference=True),
                x_t, t)[0]
            fake = torch.cat([self.policy.split_prediction(self._fake(name, x_t[j * p:(j + 1) * p], t[:p], cond),
                                                           x_t[j * p:(j + 1) * p], t[:p])[0]
                              for j, name in enumerate(FAKES)])
        g = dmd_gradient(x0.float(), teacher, fake)
        pair = distill_dpo_generator_loss(x0[:p].float(), g[:p], x0[p:].float(), g[p:], self.cfg.loser_weight,
                                          self.cfg.loser_clip)
        loss = (pair * keep).sum() / n_keep
        stats = {"dmd_grad_abs": float(g.abs().mean())}
        if self.bank is not None and self.cfg.regression_weight > 0:
            idx = batch["reg"]
            sample = self._student_sample(self.bank["noise"][idx], self.bank["cond"][idx])[-1]
            reg = noise_error(sample, self.bank["sample"][idx]).mean()
            loss = loss + self.cfg.regression_weight * reg
            stats["regression"] = float(reg.detach())
        return loss, stats

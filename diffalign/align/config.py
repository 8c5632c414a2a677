"""Training configuration: one dataclass per method, loadable from YAML and overridable with ``key=value`` strings.

    cfg = config_for("d3po", yaml_path="cfg.yaml", overrides=["lr=1e-4", "lora.rank=8"])
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LoraSettings:
    """peft LoRA on the UNet. ``target_modules=None`` picks the attention projections (to_q, to_k, to_v,
    to_out.0, as diffusers' LoRA training example) and, in UNets without cross-attention (the shipped class-
    conditional models), also the ResNet convolutions conv1 / conv2."""

    rank: int = 4
    alpha: float | None = None
    """LoRA alpha (default: equal to the rank, as diffusers' example)."""
    target_modules: list[str] | None = None
    init: str = "gaussian"


@dataclass
class TrainConfig:
    """What every method shares: model, prompts, optimisation, checkpoints, logging."""

    model: str = "builtin:digits"
    prompts: list[str] | None = None
    """Training prompts (default: every class name of a class-conditional model)."""
    seed: int = 0
    max_steps: int = 100
    """Optimizer steps."""
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this much wall time."""
    lr: float = 3e-5
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None
    """accelerate's "no", "fp16" or "bf16"; None: accelerate's own setting (``accelerate launch --mixed_precision``
    or its config file; "no" outside ``accelerate launch``)."""
    full_finetune: bool = False
    """Train every UNet weight; the reference is then a frozen copy instead of the adapter-disabled UNet."""
    reference: str = "adapter"
    """LoRA only: "adapter" (the UNet with its adapter disabled, no second copy) or "copy" (a frozen deepcopy)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    checkpoint_every: int = 50
    checkpoint_minutes: float | None = None
    """Also checkpoint whenever this much training wall time has passed since the last checkpoint."""
    keep_checkpoints: int = 2
    log_every: int = 1
    """Write a row to ``metrics.jsonl`` (and to the trackers) every this many optimizer steps; a step that
    checkpoints always has its row."""
    tensorboard: bool = False
    device: str | None = None
    """None: accelerate's choice (its accelerator when there is one, and the process's own under ``accelerate
    launch``); "cpu": the CPU. Pick a GPU with ``CUDA_VISIBLE_DEVICES``."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights (diffusers' ``EMAModel``) whose decay rises to
    this cap; 0: off. The final weights, and the weights a checkpoint loads and is evaluated with, are then the
    average; training goes on with the raw weights, which every checkpoint also keeps, so resume stays exact."""
    ema_power: float = 0.75
    """The average's warm-up: step k's decay is min(ema_decay, 1 - k^-ema_power), as in diffusers' unconditional
    training example (``use_ema_warmup``, its default power 3/4); ema_power = 1 is the plain mean of all steps."""

    def check(self) -> None:
        """Raise a ValueError naming the bad value (subclasses add their own checks)."""
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no average), got {self.ema_decay}.")
        if not self.ema_power > 0:
            raise ValueError(f"ema_power must be > 0, got {self.ema_power}.")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1 (1: every step), got {self.log_every}.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1 (1: no accumulation), got "
                             f"{self.gradient_accumulation_steps}.")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (the gradient-norm clip), got {self.max_grad_norm}.")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; use \"no\", \"fp16\", \"bf16\" or null "
                             "(accelerate's own setting).")
        if self.device not in (None, "cpu"):
            raise ValueError(f"device={self.device!r}: training runs on the CPU (\"cpu\") or on accelerate's choice "
                             "of device (null, the default); pick a GPU with CUDA_VISIBLE_DEVICES, or several with "
                             "`accelerate launch`.")


@dataclass
class RolloutConfig(TrainConfig):
    """Methods that sample stochastic DDIM trajectories with the policy and score them with a reward."""

    reward: str | None = "jpeg_compressibility"
    """A registered reward, or several joined by "," (a vector reward, compared by Pareto dominance in D3PO)."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward's factory (for a vector reward: ``{reward name: {...}}``)."""
    num_steps: int = 20
    eta: float = 1.0
    guidance: float = 5.0
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on (a random subset, as ``train.timestep_fraction``)."""
    steps_per_backward: int = 0
    """Back-propagate the trajectory's steps in groups of this many (less activation memory, same gradient);
    0: all steps in one batched pass."""
    kl_coef: float = 0.0
    """Weight of the KL to the reference added to the loss: the mean over trained steps and images of each DDIM
    transition's KL(policy || reference) (per-pixel mean, DPOK's regulariser). 0: off, as in the D3PO / DDPO papers.
    D3PO logs the KL either way (its reference pass is needed for the loss); DDPO only when it is used."""

    def check(self) -> None:
        super().check()
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}.")
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0 (the log-probabilities need stochastic DDIM steps), got {self.eta}.")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}.")
        if self.steps_per_backward < 0:
            raise ValueError(f"steps_per_backward must be >= 0, got {self.steps_per_backward}.")


@dataclass
class D3POConfig(RolloutConfig):
    """D3PO (Yang et al., CVPR 2024). Defaults are the paper's code (``config/base.py``) unless noted."""

    labels: str | None = None
    """Human labels (``diffalign align export-pairs``): the pairs directory's ``labels.jsonl``; replaces the reward."""
    pairs: str | None = None
    """Directory written by ``diffalign align export-pairs`` (trajectories to train on with ``labels``)."""
    beta: float = 0.1
    clip: float = 0.1
    """Ratio clamp [1 - clip, 1 + clip] (``train.eps``)."""
    pairs_per_step: int = 4
    """Pairs sampled on-policy (per process) and trained on for one optimizer step (per accumulation step)."""


@dataclass
class DDPOConfig(RolloutConfig):
    """DDPO (Black et al., ICLR 2024), the baseline D3PO compares against: PPO-clip on the DDIM step
    log-probabilities with reward advantages. Defaults follow ddpo-pytorch's ``config/base.py`` (LoRA lr 3e-4, clip
    range 1e-4, advantages clipped to +-5) but 20 steps instead of 50, as D3PO samples."""

    lr: float = 3e-4
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    images_per_step: int = 8
    """Images sampled on-policy (per process) for one optimizer step (per accumulation step)."""


@dataclass
class PreferenceConfig(TrainConfig):
    """The DPO family (Diffusion-DPO, RankDPO, SmPO): offline from a preference dataset (``data``), or on-policy
    from images the current model samples and ``reward`` ranks."""

    data: str | None = None
    """A preference dataset directory (``pairs.jsonl`` / ``rankings.jsonl``, or a saved ``datasets`` dataset)."""
    reward: str | None = None
    """On-policy: the reward that ranks the sampled images. Offline: rank the data by this reward's stored scores
    instead of its labels, or by several rewards' joined by "," (phi averaged over them); None: the labels."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-4
    beta: float = 5000.0
    """In the per-element-mean, times-1/2 convention of the Diffusion-DPO code (see ``losses.dpo_logits``)."""
    prompts_per_step: int = 4
    """Prompts (dataset rows) per optimizer step (per process and accumulation step)."""
    k: int = 2
    """On-policy: images sampled per prompt (RankDPO ranks k; Diffusion-DPO and SmPO train on one pair of them)."""
    pair_selection: str = "random"
    """Diffusion-DPO and SmPO: the pair of a row's k images to train on. "random": a random decided pair each time
    the row is drawn; "extremes": the best image against the worst (the largest label gap; a label tie for best or
    worst goes to the first such image)."""
    caption_dropout: float = 0.0
    """Fraction of prompts trained unconditionally (the original Diffusion-DPO code uses 0.2; diffusers' port 0)."""
    resize: bool = False
    """Resize and centre-crop dataset images of another size to the model's (otherwise such images are an error)."""
    guidance: float = 1.0
    """On-policy sampling guidance."""
    sampler: str = "dpm-solver++"
    """On-policy sampler."""
    sample_steps: int = 20
    kl_coef: float = 0.0
    """Weight of the KL to the reference added to the loss: c x the mean over the trained images of the per-pixel
    mean of (model output - reference output)^2 at the training noise level, the KL of the two models' Gaussian
    reverse steps there up to the per-t weight that Diffusion-DPO's objective also drops (Eq. 14's constant
    omega(lambda_t)). 0: off, as in the papers; the KL is logged either way (except by Diffusion-DPO's ``sft``,
    which runs the reference only when the KL is used)."""

    def check(self) -> None:
        super().check()
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}.")
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}.")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 images per prompt (a preference compares images), got {self.k}.")
        if self.pair_selection not in ("random", "extremes"):
            raise ValueError(f"pair_selection must be 'random' or 'extremes', got {self.pair_selection!r}.")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}.")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")
        if self.data is None and self.reward is None:
            raise ValueError("give a preference dataset (`data`, `--data DIR`) or a `reward` to label on-policy "
                             "samples.")


@dataclass
class DiffusionDPOConfig(PreferenceConfig):
    """Diffusion-DPO (Wallace et al., CVPR 2024): beta 5000 as the authors' launchers."""

    label_temperature: float | None = None
    """None: hard labels, as the paper. tau > 0: soft Bradley-Terry labels p = sigmoid((r_w - r_l) / tau) from the
    target reward's scores (in its units), trained with :func:`~diffalign.align.losses.soft_dpo_loss`: each pair's
    implied reward margin is pulled to the reward's margin over tau instead of growing without bound, and pairs of
    nearly equal reward are held level."""

    sft: bool = False
    """Supervised fine-tuning on the winners instead (the authors' code's ``--sft`` baseline): the plain denoising
    loss on each pair's preferred image. Only the winners go through the network (and through the reference only
    for ``kl_coef``), so no implicit accuracy is logged."""

    def check(self) -> None:
        super().check()
        if self.sft and self.label_temperature is not None:
            raise ValueError("sft trains on the winners alone; it takes no label_temperature.")
        if self.label_temperature is not None and not self.label_temperature > 0:
            raise ValueError(f"label_temperature must be > 0 (or null for hard labels), got {self.label_temperature}.")


@dataclass
class RankDPOConfig(PreferenceConfig):
    """RankDPO (Karthik et al., ICCV 2025). The paper gives no beta or learning rate; these are Diffusion-DPO's."""

    k: int = 4
    ranking: str = "predicted"
    """Ranks in the DCG discount: "predicted" (the current model's, Fig. 2) or "label" (phi's, Eq. 6)."""
    weighting: str = "dcg"
    """"dcg": the gain x discount weights of Eq. 6; "none": every decided pair weighs 1 (DPO over all pairs)."""

    def check(self) -> None:
        super().check()
        if self.ranking not in ("predicted", "label"):
            raise ValueError(f"ranking must be 'predicted' or 'label', got {self.ranking!r}.")
        if self.weighting not in ("dcg", "none"):
            raise ValueError(f"weighting must be 'dcg' or 'none', got {self.weighting!r}.")
        if self.pair_selection != "random":
            raise ValueError("RankDPO trains on all k images of a row; pair_selection applies to Diffusion-DPO and "
                             "SmPO.")


@dataclass
class SmPOConfig(PreferenceConfig):
    """SmPO-Diffusion (Lu et al., ICML 2025); defaults from the authors' SD1.5 launcher and code."""

    beta: float = 2000.0
    gamma: float = 10.0
    """The sensitivity: the logit is scaled by gamma (2p - 1)."""
    score_low: float | None = 0.11543526500463486
    score_high: float | None = 0.28201571106910706
    """Scores are normalised as (s - low) / (high - low) before p = sigmoid(s~_w - s~_l). The defaults are the
    authors' PickScore constants; null takes the lowest / highest score of the dataset (or of each on-policy
    batch)."""
    inversion_steps: int = 5
    """DDIM inversion steps to the sampled t (0: random forward noise instead of inversion)."""
    renoise: int = 1
    """ReNoise iterations per inversion step (the authors' code: 1, two model calls per step)."""

    def check(self) -> None:
        super().check()
        if self.inversion_steps < 0 or self.renoise < 0:
            raise ValueError("inversion_steps and renoise must be >= 0.")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}.")


@dataclass
class DistillDPOConfig(TrainConfig):
    """Distillation-DPO for images: a few-step student distilled from the frozen teacher by distribution matching
    (DMD), with pairs of student samples ranked by a reward deciding which fake-score network scores which sample."""

    reward: str | None = "jpeg_compressibility"
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(rank=16))
    """The student's LoRA (a few-step student needs more capacity than a preference LoRA)."""
    fake_lora: LoraSettings = field(default_factory=lambda: LoraSettings(rank=16))
    """The LoRA of each fake-score network (on the teacher)."""
    lr: float = 1e-4
    """The student's learning rate."""
    fake_lr: float = 1e-4
    student_steps: int = 4
    """Sampling steps of the student (1-8), deterministic DDIM on a trailing grid (t = 999, 749, 499, 249 at 4)."""
    pairs_per_step: int = 4
    teacher_guidance: float = 1.75
    """Classifier-free guidance of the teacher's score in the generator loss (DMD2's SD1.5 value)."""
    loser_weight: float = 0.5
    """lambda: the weight of the push-away term of the losers."""
    loser_clip: float = 1.0
    """Bound on the loser's per-element update (the negative KL term is unbounded)."""
    min_reward_gap: float = 0.0
    """Pairs whose rewards differ by less are skipped (both fake networks, the generator's pair terms)."""
    regression_weight: float = 0.25
    """Weight of the regression of the student's samples onto the teacher's samples from the same noise
    (DMD's stabiliser; 0 turns it off)."""
    regression_pairs: int = 64
    """Teacher samples (noise -> image, ``regression_sampler`` with ``regression_steps``) held for the regression."""
    regression_batch: int = 4
    regression_sampler: str = "dpm-solver++"
    regression_steps: int = 20
    t_min: int = 20
    t_max: int = 980
    """Timesteps of the distribution-matching and fake-score losses (DMD's 0.02 T - 0.98 T)."""

    def check(self) -> None:
        super().check()
        if not 1 <= self.student_steps <= 8:
            raise ValueError(f"student_steps must be between 1 and 8 (a few-step student), got {self.student_steps}.")
        if self.pairs_per_step < 1:
            raise ValueError(f"pairs_per_step must be >= 1, got {self.pairs_per_step}.")
        if self.reward is None:
            raise ValueError("distill-dpo ranks its pairs with a reward; set `reward`.")
        if self.loser_weight < 0 or self.loser_clip <= 0 or self.regression_weight < 0:
            raise ValueError("loser_weight and regression_weight must be >= 0 and loser_clip > 0.")
        if not 0 <= self.t_min < self.t_max:
            raise ValueError(f"need 0 <= t_min < t_max, got {self.t_min}, {self.t_max}.")


METHOD_CONFIGS: dict[str, type[TrainConfig]] = {"d3po": D3POConfig, "ddpo": DDPOConfig,
                                                "diffusion-dpo": DiffusionDPOConfig, "rankdpo": RankDPOConfig,
                                                "smpo": SmPOConfig, "distill-dpo": DistillDPOConfig}


def _coerce(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _assign(obj: Any, dotted: str, value: Any, source: str) -> None:
    *parents, last = dotted.split(".")
    for name in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, name):
            raise ValueError(f"{source}: unknown config key {dotted!r}.")
        obj = getattr(obj, name)
    names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    if last not in names:
        raise ValueError(f"{source}: unknown config key {dotted!r}; valid keys: {', '.join(sorted(names))}.")
    current = getattr(obj, last)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {dotted} is a group of settings; set one of them ({dotted}.<key>=value) or "
                             f"give a mapping, not {value!r}.")
        for key, sub in value.items():
            _assign(current, key, sub, source)
        return
    kind = str({f.name: f.type for f in dataclasses.fields(obj)}[last])
    if value is None and "None" in kind:
        setattr(obj, last, None)
        return
    if kind.startswith("str") and isinstance(value, os.PathLike):
        value = os.fspath(value)
    for prefix, types, what, example in (("str", str, "a string", "name"), ("list", list, "a list", '["a", "b"]'),
                                         ("dict", dict, "a mapping", '{"key": 1}')):
        if kind.startswith(prefix) and not isinstance(value, types):
            raise ValueError(f"{source}: {dotted} must be {what}, got {value!r} (e.g. {dotted}='{example}').")
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"{source}: {dotted} must be true or false, got {value!r}.")
    numeric = isinstance(current, (int, float)) and not isinstance(current, bool) or kind.startswith(("int", "float"))
    if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{source}: {dotted} must be a number, got {value!r}.")
    if kind.startswith("int"):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{source}: {dotted} must be a whole number, got {value!r}.")
        value = int(value)
    elif numeric and kind.startswith("float"):
        value = float(value)
    setattr(obj, last, value)


def config_for(method: str, yaml_path: str | Path | None = None, overrides: list[str] | dict | None = None
               ) -> TrainConfig:
    """The config of ``method``: defaults, then the YAML file, then ``key=value`` overrides (dotted keys for
    nested settings, values parsed as JSON where they parse: ``lora.rank=8``, ``prompts=["a","b"]``)."""
    if method not in METHOD_CONFIGS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHOD_CONFIGS)}.")
    cfg = METHOD_CONFIGS[method]()
    if yaml_path is not None:
        import yaml

        try:
            data = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{yaml_path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config keys.")
        written_for = data.pop("method", method)  # a run's config.yaml names its method
        if written_for != method:
            raise ValueError(f"{yaml_path} is a {written_for} config, not a {method} one; train {written_for}, or "
                             "drop its `method` line and the keys that method alone has.")
        for key, value in data.items():
            _assign(cfg, key, value, str(yaml_path))
    items = overrides.items() if isinstance(overrides, dict) else [
        (item.partition("=")[0].strip(), _coerce(item.partition("=")[2])) for item in overrides or []]
    for key, value in items:
        if not key:
            raise ValueError("overrides must look like key=value.")
        _assign(cfg, key, value, "override")
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: TrainConfig, method: str) -> str:
    """The config as YAML, ``method`` first: what a run writes to ``config.yaml`` and ``--config`` reads."""
    import yaml

    return yaml.safe_dump({"method": method, **to_dict(cfg)}, sort_keys=False)


def save_config(cfg: TrainConfig, method: str, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg, method))

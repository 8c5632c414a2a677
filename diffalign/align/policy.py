"""The policy: a thin adapter over a diffusers pipeline with what every alignment method needs.

* prompts to conditioning: class labels (:class:`~diffalign.pipelines.ClassConditionalPipeline`) or CLIP text
  embeddings (Stable Diffusion and SDXL pipelines, through the pipeline's own ``encode_prompt``; SDXL's pooled
  embedding travels as one extra token, see :meth:`Policy.encode`);
* the (classifier-free guided) model output at a timestep, for the policy or for the reference;
* latents to images in [0, 1] (through the VAE where the pipeline has one);
* the trainable parameters: a peft LoRA on the UNet, or every UNet weight (``full_finetune``).

The reference of a LoRA policy is the same UNet with the adapter disabled (no second UNet in memory); with
``full_finetune`` (or ``reference="copy"``) it is a frozen copy made before training.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from .config import LoraSettings

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EMA_FILE = "ema.safetensors"
"""A checkpoint's averaged weights (runs with ``ema_decay > 0``)."""
ALIGNMENT_FILE = "alignment.json"
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_config(unet: torch.nn.Module, settings: LoraSettings) -> LoraConfig:
    """The peft config of ``settings`` for ``unet`` (default targets: see :class:`LoraSettings`)."""
    targets = settings.target_modules
    if targets is None:
        text = getattr(unet.config, "cross_attention_dim", None) is not None
        candidates = ATTENTION_TARGETS if text else ATTENTION_TARGETS + ["conv1", "conv2"]
        names = {"to_out.0" if name.endswith("to_out.0") else name.rsplit(".", 1)[-1]
                 for name, _ in unet.named_modules()}
        targets = [t for t in candidates if t in names]
    if settings.rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {settings.rank}.")
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, init_lora_weights=settings.init,
                      target_modules=list(targets))


@contextmanager
def keep_requires_grad(model: torch.nn.Module, default: bool = False) -> Iterator[None]:
    """Restore which of ``model``'s weights require gradients after the block (peft's ``set_adapter``,
    ``enable_adapters`` and adapter injection change it); weights created in the block get ``default``."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), default))


def _set_adapter(model: torch.nn.Module, names: str | list[str]) -> None:
    with keep_requires_grad(model):
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.set_adapter(names)


@contextmanager
def use_adapter(model: torch.nn.Module, name: str) -> Iterator[torch.nn.Module]:
    """Run ``model`` with only the LoRA adapter ``name`` active (the others stay, inactive); which weights require
    gradients is left as it was."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [list(m.active_adapters) for m in layers]
    _set_adapter(model, name)
    try:
        yield model
    finally:
        with keep_requires_grad(model):
            for m, names in zip(layers, before, strict=True):
                m.set_adapter(names)


def set_adapters_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer on or off, leaving which weights require gradients as it was (peft's
    ``enable_adapters`` also changes that)."""
    with keep_requires_grad(model):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA layer into its base layer and remove the adapter modules (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


def pipeline_kind(pipe) -> str:
    """``"class"`` (:class:`~diffalign.pipelines.ClassConditionalPipeline`), ``"sd"`` (a UNet conditioned on one CLIP
    text encoder: Stable Diffusion 1.x / 2.x) or ``"sdxl"`` (SDXL base: two CLIP encoders, pooled embedding and
    size ids); any other pipeline is a ``TypeError`` that says what is supported."""
    unet = getattr(pipe, "unet", None)
    if hasattr(pipe, "null_label") and unet is not None:
        return "class"
    supported = ("alignment trains the UNet of a ClassConditionalPipeline, a Stable Diffusion pipeline (UNet + CLIP "
                 "text encoder) or an SDXL base pipeline (UNet + two CLIP text encoders)")
    name = type(pipe).__name__
    if unet is None:
        parts = "a transformer" if getattr(pipe, "transformer", None) is not None else "no UNet"
        raise TypeError(f"{name} is not supported: it has {parts}; {supported}.")
    if getattr(pipe, "text_encoder", None) is None or not hasattr(pipe, "encode_prompt"):
        raise TypeError(f"{name} is not supported: it has no text encoder `text_encoder` (an SDXL refiner?); "
                        f"{supported}.")
    embedding = getattr(unet.config, "addition_embed_type", None)
    if embedding is None:
        return "sd"
    if embedding == "text_time" and getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    raise TypeError(f"{name} is not supported: its UNet takes addition_embed_type={embedding!r} inputs; {supported}.")


class Policy:
    """Conditioning, guided prediction, decoding and trainable parameters of a pipeline's UNet.

    Args:
        pipe: a :class:`~diffalign.pipelines.ClassConditionalPipeline`, a Stable Diffusion or an SDXL base pipeline.
        lora: LoRA settings (None with ``full_finetune=False``: nothing is trainable, e.g. for evaluation).
        full_finetune: train every UNet weight.
        reference: ``"adapter"`` (LoRA disabled) or ``"copy"`` (a frozen deepcopy of the initial UNet).
    """

    def __init__(self, pipe, lora: LoraSettings | None = None, full_finetune: bool = False,
                 reference: str = "adapter"):
        if reference not in ("adapter", "copy"):
            raise ValueError(f"reference={reference!r}; use 'adapter' or 'copy'.")
        self.kind = pipeline_kind(pipe)
        self.is_text = self.kind != "class"
        self.pipe = pipe
        self.unet = pipe.unet
        self.device = self.unet.device
        if self.kind == "sdxl":
            self._init_sdxl()
        for module in (self.unet, getattr(pipe, "vae", None), getattr(pipe, "text_encoder", None),
                       getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False)
        self.lora = None if full_finetune else lora
        self.full_finetune = full_finetune
        self._reference_unet = None
        if full_finetune or (lora is not None and reference == "copy"):
            self._reference_unet = copy.deepcopy(self.unet).eval()
        if full_finetune:
            self.unet.requires_grad_(True)
        elif lora is not None:
            self.lora_config = lora_config(self.unet, lora)
            inject_adapter_in_model(self.lora_config, self.unet)
            for name, param in self.unet.named_parameters():
                param.requires_grad_("lora_" in name)
        self._trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.forward_unet = self.unet
        """The module called when gradients are needed (the trainer sets it to the accelerate-wrapped UNet)."""
        self._text_cache: dict[str, torch.Tensor] = {}
        self._reference_depth = 0

    def _init_sdxl(self) -> None:
        """SDXL's extra UNet inputs: the pooled embedding's width, and the size ids of the pipeline's default call
        (original size = target size = the image size, crop (0, 0)), the same for every image."""
        self._pooled_dim = self.pipe.text_encoder_2.config.projection_dim
        width = self.unet.config.cross_attention_dim
        if self._pooled_dim > width:
            raise TypeError(f"the pooled text embedding ({self._pooled_dim}) is wider than the UNet's cross-attention "
                            f"width ({width}); this SDXL variant is not supported.")
        _, h, w = self.image_shape
        self._time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device)
        expected = self.unet.add_embedding.linear_1.in_features
        got = self.unet.config.addition_time_embed_dim * self._time_ids.shape[1] + self._pooled_dim
        if expected != got:
            raise TypeError(f"this SDXL UNet expects {expected} added inputs, not the base model's six size ids and "
                            f"pooled embedding ({got}); SDXL refiners (aesthetic-score ids) are not supported.")

    # ------------------------------------------------------------------ shapes and conditioning
    @property
    def latent_shape(self) -> tuple[int, ...]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
        return (cfg.in_channels, *size)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the pipeline makes."""
        c, h, w = self.latent_shape
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return (c, h, w)
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        return (vae.config.out_channels, h * f, w * f)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule alphabar_t, t = 0 .. T - 1 (float64, on the policy's device)."""
        return self.pipe.scheduler.alphas_cumprod.to(device=self.device, dtype=torch.float64)

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.prediction_type

    def split_prediction(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) of a model output ``out`` at noisy latents ``x`` and timesteps ``t`` (one per sample), for the
        epsilon, v_prediction and sample prediction types (differentiable)."""
        a = self.alphas_cumprod[t.reshape(-1)].to(torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
        a = a.expand(x.shape[0], *a.shape[1:]) if a.shape[0] == 1 else a
        out, x = out.float(), x.float()
        kind = self.prediction_type
        if kind == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt(), out
        if kind == "v_prediction":
            return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
        if kind == "sample":
            return out, (x - a.sqrt() * out) / (1 - a).sqrt()
        raise ValueError(f"prediction type {kind!r} is not supported here (epsilon, v_prediction or sample).")

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images [N, C, H, W] in [0, 1]: the VAE posterior mean times its scaling factor, or
        ``2 x - 1`` for pixel-space models (the inverse of :meth:`decode`)."""
        x = images.to(device=self.device, dtype=torch.float32) * 2 - 1
        if getattr(self.pipe, "vae", None) is None:
            return x.to(self.dtype)
        with self._vae() as vae:
            z = vae.encode(x.to(vae.dtype)).latent_dist.mean
            mean, std = self._latents_mean_std(z)
            return ((z - mean) * vae.config.scaling_factor / std).to(self.dtype)

    def _latents_mean_std(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The VAE's per-channel latent statistics where its config has them (as the SDXL pipeline applies them),
        else (0, 1)."""
        cfg = self.pipe.vae.config
        if getattr(cfg, "latents_mean", None) is None or getattr(cfg, "latents_std", None) is None:
            return 0.0, 1.0
        shape = (1, -1, *([1] * (like.dim() - 2)))
        return (torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).reshape(shape),
                torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).reshape(shape))

    @contextmanager
    def _vae(self) -> Iterator[torch.nn.Module]:
        """The pipeline's VAE outside autocast (the pipeline never runs it under autocast), and in float32 where the
        pipeline would upcast it (SDXL's float16 VAE with ``force_upcast``, which overflows in float16)."""
        vae = self.pipe.vae
        upcast = self.kind == "sdxl" and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            with torch.autocast(self.device.type, enabled=False):
                yield vae
        finally:
            if upcast:
                vae.to(torch.float16)

    def check_prompts(self, prompts: Sequence[str]) -> list[str]:
        """Validate prompts where they enter (an empty list, or a class name the model does not know, is an error)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("the prompt list is empty; give at least one prompt.")
        if not self.is_text:
            for p in prompts:
                self.pipe.prompt_to_label(p)
        return prompts

    def training_prompts(self, prompts: Sequence[str] | None) -> list[str]:
        """The given prompts (validated), or every class name of a class-conditional model."""
        if prompts is None:
            if self.is_text:
                raise ValueError("a text-to-image model needs prompts: set `prompts` (a list of strings).")
            prompts = list(self.pipe.config.class_names)
        return self.check_prompts(prompts)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Conditioning of each prompt: class labels [N] or text embeddings [N, L, D]. For SDXL [N, L + 1, D]: the
        text embeddings, then the pooled embedding (zero-padded to D) as one more token, so that every method can
        batch, index and concatenate the conditioning as one tensor."""
        if not self.is_text:
            return torch.tensor([self.pipe.prompt_to_label(p) for p in prompts], dtype=torch.long, device=self.device)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with torch.autocast(self.device.type, enabled=False):  # as the pipeline encodes: outside autocast
                out = self.pipe.encode_prompt(prompt=missing, device=self.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
            embeds = out[0]
            if self.kind == "sdxl":
                pooled = torch.nn.functional.pad(out[2], (0, embeds.shape[-1] - out[2].shape[-1]))
                embeds = torch.cat([embeds, pooled[:, None].to(embeds.dtype)], dim=1)
            self._text_cache.update(zip(missing, embeds, strict=True))
        return torch.stack([self._text_cache[p] for p in prompts])

    def null_condition(self, n: int) -> torch.Tensor:
        """The unconditional input for classifier-free guidance, as the pipeline makes it: the null class, the
        empty prompt, or zeros (SDXL's ``force_zeros_for_empty_prompt``)."""
        if not self.is_text:
            return torch.full((n,), self.pipe.null_label, dtype=torch.long, device=self.device)
        empty = self.encode([""] * n)
        return torch.zeros_like(empty) if getattr(self.pipe.config, "force_zeros_for_empty_prompt", False) else empty

    # ------------------------------------------------------------------ prediction
    @contextmanager
    def as_reference(self) -> Iterator[torch.nn.Module]:
        """Yields the reference network: the frozen copy, or the UNet with its adapter disabled."""
        if self._reference_unet is not None:  # a frozen copy (adapters a method adds to it are switched off)
            set_adapters_enabled(self._reference_unet, False)
            try:
                yield self._reference_unet
            finally:
                set_adapters_enabled(self._reference_unet, True)
            return
        if self.lora is None:
            yield self.unet
            return
        self._reference_depth += 1  # nested uses keep the adapter off until the outermost one ends
        set_adapters_enabled(self.unet, False)
        try:
            yield self.unet
        finally:
            self._reference_depth -= 1
            if self._reference_depth == 0:
                set_adapters_enabled(self.unet, True)

    def _call(self, net, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        if self.kind == "sdxl":
            added = {"text_embeds": cond[:, -1, :self._pooled_dim],
                     "time_ids": self._time_ids.to(device=cond.device, dtype=cond.dtype).expand(x.shape[0], -1)}
            return net(x, t, encoder_hidden_states=cond[:, :-1], added_cond_kwargs=added).sample
        if self.is_text:
            return net(x, t, encoder_hidden_states=cond).sample
        return net(x, t, class_labels=cond).sample

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float = 1.0,
                reference: bool = False) -> torch.Tensor:
        """Model output (the scheduler's prediction type) at timestep(s) ``t``, guided as
        ``uncond + guidance (cond - uncond)`` when ``guidance != 1``. Gradients flow unless ``reference``."""
        if reference:
            with torch.no_grad(), self.as_reference() as net:
                return self._guided(net, x, t, cond, guidance)
        net = self.forward_unet if torch.is_grad_enabled() else self.unet
        return self._guided(net, x, t, cond, guidance)

    def predict_with(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                     guidance: float = 1.0) -> torch.Tensor:
        """:meth:`predict` through another network (an auxiliary adapter of the same UNet, say)."""
        return self._guided(net, x, t, cond, guidance)

    def _guided(self, net, x, t, cond, guidance):
        if guidance == 1.0:
            return self._call(net, x, t, cond)
        t2 = torch.cat([t, t]) if t.numel() > 1 else t
        out = self._call(net, torch.cat([x, x]), t2, torch.cat([cond, self.null_condition(x.shape[0])]))
        c, u = out.chunk(2)
        return u + guidance * (c - u)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float32 [N, C, H, W]."""
        if getattr(self.pipe, "vae", None) is not None:
            with self._vae() as vae:
                z = latents.to(vae.dtype)
                mean, std = self._latents_mean_std(z)
                latents = vae.decode(z * std / vae.config.scaling_factor + mean).sample
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ parameters and saving
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The policy's own trained weights (its LoRA, or the UNet), fixed when the policy is built."""
        return list(self._trainable)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights: the LoRA weights (peft names), or the whole UNet state dict."""
        if self.lora is not None:
            return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
        return {k: v.detach().contiguous() for k, v in self.unet.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.lora is not None:
            result = set_peft_model_state_dict(self.unet, state)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"LoRA weights do not fit this model (unexpected keys, e.g. {unexpected[:3]}).")
        else:
            self.unet.load_state_dict(state)

    def save(self, out_dir: str | Path, base_model: str, method: str, extra: dict | None = None) -> None:
        """Write the trained weights so that :func:`load_aligned_pipeline` (and, for Stable Diffusion and SDXL,
        diffusers' ``pipe.load_lora_weights(out_dir)``) loads them: LoRA weights in diffusers' file layout, or the UNet.
        ``extra`` goes to ``alignment.json`` (``{"sampling": {"sampler", "steps", "scheduler_config"}}``: how the
        model is meant to be sampled, e.g. a few-step student)."""
        out = Path(out_dir)
        info = {"base_model": base_model, "method": method, "full_finetune": self.full_finetune, **(extra or {})}
        if self.lora is not None:
            state = {f"unet.{k}": v for k, v in self.trainable_state_dict().items()}
            save_file(state, str(out / LORA_WEIGHTS), metadata={"format": "pt"})
            info["lora"] = {"rank": self.lora_config.r, "alpha": self.lora_config.lora_alpha,
                            "target_modules": sorted(self.lora_config.target_modules)}
        else:
            self.unet.save_pretrained(out / "unet")
        (out / ALIGNMENT_FILE).write_text(json.dumps(info, indent=2))


def load_aligned_pipeline(out_dir: str | Path, device: str | torch.device = "cpu", merge: bool = True):
    """The pipeline of a training output directory, or of one of its checkpoints (``out/checkpoints/step-N``):
    the base model with the trained LoRA (merged into the UNet by default) or the fine-tuned UNet (a checkpoint of
    a run with ``ema_decay > 0``: the averaged weights, as the run's output). A run that
    records how it is sampled (a few-step student) gets that scheduler, and its sampler name and step count as
    ``pipe.recommended_sampler`` / ``pipe.recommended_steps``."""
    from ..pipelines.class_conditional import load_pipeline

    out = Path(out_dir)
    if (out / "trainer_state.json").is_file():  # a checkpoint: its averaged weights where the run keeps an average
        info = json.loads((out / "trainer_state.json").read_text())
        info["base_model"] = info["model"]
        weights, prefix = out / (EMA_FILE if "ema" in info else "weights.safetensors"), ""
    elif (out / ALIGNMENT_FILE).is_file():
        info = json.loads((out / ALIGNMENT_FILE).read_text())
        weights, prefix = out / (LORA_WEIGHTS if not info.get("full_finetune") else "unet"), "unet."
    else:
        raise FileNotFoundError(f"{out} is neither a `diffalign train` output directory nor one of its checkpoints.")
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing; {out} is not a finished training output directory.")
    pipe = load_pipeline(info["base_model"], device=device)
    if info.get("sampling") is None and (out.parent.parent / ALIGNMENT_FILE).is_file():  # a checkpoint of a run
        info["sampling"] = json.loads((out.parent.parent / ALIGNMENT_FILE).read_text()).get("sampling")
    if info.get("sampling"):
        from ..samplers import make_scheduler

        sampling = info["sampling"]
        pipe.scheduler = make_scheduler(sampling["sampler"], pipe.scheduler.config,
                                        **sampling.get("scheduler_config", {}))
        pipe.recommended_sampler, pipe.recommended_steps = sampling["sampler"], sampling["steps"]
    if info.get("full_finetune"):
        state = (load_file(str(weights)) if weights.is_file()
                 else type(pipe.unet).from_pretrained(weights).state_dict())
        pipe.unet.load_state_dict(state)
        return pipe.to(device)
    lora = info["lora"]
    settings = LoraSettings(rank=lora["rank"], alpha=lora["alpha"], target_modules=lora["target_modules"],
                            init=lora.get("init", "gaussian"))
    state = {k.removeprefix(prefix): v for k, v in load_file(str(weights)).items()}
    inject_adapter_in_model(lora_config(pipe.unet, settings), pipe.unet)
    set_peft_model_state_dict(pipe.unet, state)
    if merge:
        merge_lora(pipe.unet)
    return pipe.to(device)

"""A diffusers pipeline for class-conditional pixel-space UNets with classifier-free guidance, and model loading.

    pipe = diffalign.load_pipeline("builtin:fashion")
    pipe.scheduler = diffalign.samplers.DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config)
    images = pipe("sneaker", num_images_per_prompt=4, guidance_scale=4.0, num_inference_steps=20).images
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["ClassConditionalPipeline", "ModelNotAvailableError", "load_pipeline"]


class ModelNotAvailableError(RuntimeError):
    """A hub model is neither cached nor downloadable (offline)."""


class ClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional image generation with a ``UNet2DModel`` whose class embedding has a null class.

    Components: ``unet`` (epsilon/v/sample prediction, ``num_class_embeds = len(class_names) + 1``; the last class
    index is the null class used for classifier-free guidance) and ``scheduler`` (any diffusers or diffalign
    scheduler). Config: ``class_names`` (prompts), ``class_aliases`` (extra prompt -> index entries) and
    ``model_name`` (a registered model, e.g. ``"builtin:fashion"``, whose shipped sampler data apply: see
    :meth:`sampling_scheduler`).
    """

    model_cpu_offload_seq = "unet"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved pipeline. A local directory is loaded component by component here, so that components
        whose class lives outside diffusers (diffalign's schedulers) load too; hub ids go through diffusers."""
        path = Path(str(pretrained_model_name_or_path)).expanduser()
        if not (path / "model_index.json").is_file():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        index = json.loads((path / "model_index.json").read_text())
        torch_dtype = kwargs.pop("torch_dtype", None)
        parts = {}
        for name in ("unet", "scheduler"):
            if name in kwargs:
                parts[name] = kwargs.pop(name)
                continue
            library, class_name = index[name]
            component_cls = getattr(importlib.import_module(library), class_name)
            extra = {"torch_dtype": torch_dtype} if name == "unet" and torch_dtype is not None else {}
            parts[name] = component_cls.from_pretrained(str(path), subfolder=name, **extra)
        class_names = kwargs.pop("class_names", index.get("class_names"))
        class_aliases = kwargs.pop("class_aliases", index.get("class_aliases"))
        model_name = kwargs.pop("model_name", index.get("model_name"))
        if kwargs:
            raise TypeError(f"unexpected arguments for a local ClassConditionalPipeline: {sorted(kwargs)}")
        return cls(**parts, class_names=class_names, class_aliases=class_aliases, model_name=model_name)

    def __init__(self, unet, scheduler, class_names: list[str] | None = None,
                 class_aliases: dict[str, int] | None = None, model_name: str | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        n = getattr(unet.config, "num_class_embeds", None)
        if class_names is None and n:
            class_names = [str(i) for i in range(n - 1)]
        self.register_to_config(class_names=list(class_names or []), class_aliases=dict(class_aliases or {}),
                                model_name=model_name)
        self._shipped: tuple | None = None

    def sampling_scheduler(self, guidance_scale: float = 1.0, teleport: bool = False):
        """The scheduler a call samples with: ``self.scheduler``, completed with the shipped data of
        ``config.model_name`` for its sampler at ``guidance_scale`` (DPM-Solver-v3 statistics, DC-Solver ratios,
        searched time steps; :func:`~diffalign.models.sampler_data.sampler_overrides`) where its config leaves
        them unset, so that ``pipe.scheduler = DPMSolverV3Scheduler.from_config(pipe.scheduler.config)`` samples
        as ``diffalign sample`` does. Values set in the scheduler's config are kept; ``guidance_scale`` follows the
        call. ``teleport``: the time steps searched with the Gaussian teleport instead."""
        from ..models.sampler_data import model_sampler_overrides
        from ..samplers import SAMPLERS

        sched, model = self.scheduler, getattr(self.config, "model_name", None)
        sampler = next((name for name, cls in SAMPLERS.items() if type(sched) is cls), None)
        if not model or sampler is None:
            return sched
        config = {k: v for k, v in sched.config.items() if not k.startswith("_")}  # no _use_default_values
        overrides = model_sampler_overrides(model, sampler, guidance_scale, teleport=teleport)
        if config.get("timesteps_path") is not None:  # ratios calibrated on the default grid do not apply to theirs
            overrides = {k: v for k, v in overrides.items() if k not in ("dc_ratios_path", "cpr_path")}
        updates = {k: v for k, v in overrides.items()
                   if (k == "guidance_scale" or config.get(k) is None) and config.get(k) != v}
        if "timesteps_path" not in updates:
            updates.pop("timesteps_missing", None)
        if not updates:
            return sched
        key = (id(sched), tuple(sorted((k, str(v)) for k, v in updates.items())))
        if self._shipped is None or self._shipped[0] != key:
            self._shipped = (key, type(sched).from_config({**config, **updates}))
        return self._shipped[1]

    @property
    def null_label(self) -> int:
        n = getattr(self.unet.config, "num_class_embeds", None)
        if not n:
            raise ValueError("this UNet has no class embedding (num_class_embeds is None).")
        return int(n) - 1

    def prompt_to_label(self, prompt: str) -> int:
        """Class index of a prompt (class name, alias or index; case and punctuation ignored)."""
        from ..models.builtin import label_for_prompt

        return label_for_prompt(prompt, self.config.class_names, self.config.class_aliases)

    def _labels(self, prompt, class_labels, num_images_per_prompt: int) -> torch.Tensor | None:
        if prompt is not None and class_labels is not None:
            raise ValueError("pass either `prompt` or `class_labels`, not both.")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            labels = [self.prompt_to_label(p) for p in prompts]
        elif class_labels is not None:
            labels = torch.as_tensor(class_labels).reshape(-1).tolist()
            bad = [k for k in labels if not 0 <= int(k) < self.null_label]
            if bad:
                raise ValueError(f"class labels {bad} out of range 0..{self.null_label - 1}.")
        else:
            return None
        return torch.tensor(labels, dtype=torch.long).repeat_interleave(num_images_per_prompt)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 20,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        shipped_sampler_data: bool = True,
        teleport=None,
    ):
        """Generate images.

        Args:
            prompt: class name(s) (see ``config.class_names``); ``None`` with ``class_labels=None`` samples the
                unconditional (null-class) model.
            class_labels: class indices instead of prompts.
            num_images_per_prompt: images per prompt / label (or in total, when unconditional).
            guidance_scale: classifier-free guidance weight ``w`` (``uncond + w (cond - uncond)``; 1 = no guidance).
            num_inference_steps: scheduler steps.
            generator: torch generator(s) for the initial noise (and stochastic schedulers).
            output_type: ``"pil"``, ``"np"`` (NHWC float in [0, 1]) or ``"pt"`` (NCHW float in [0, 1]).
            latents: initial noise (unit variance) instead of drawing it.
            shipped_sampler_data: complete the scheduler with the model's shipped sampler data
                (:meth:`sampling_scheduler`); False samples with ``self.scheduler`` exactly as configured.
            teleport: replace the first model evaluation by the Gaussian teleport
                (:mod:`diffalign.samplers.teleport`): ``True`` for the statistics shipped for ``config.model_name``,
                or a statistics file, or a ``GaussianTeleport``. The scheduler (multistep) then takes
                ``num_inference_steps`` model evaluations on the last points of its ``num_inference_steps + 1``-point
                grid.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        labels = self._labels(prompt, class_labels, num_images_per_prompt)
        batch = len(labels) if labels is not None else num_images_per_prompt
        device = self._execution_device
        dtype = self.unet.dtype
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
        shape = (batch, cfg.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}.")
        null = torch.full((batch,), self.null_label, dtype=torch.long, device=device)
        cond = labels.to(device) if labels is not None else null
        guided = labels is not None and guidance_scale != 1.0
        unet_labels = torch.cat([cond, null]) if guided else cond

        teleporting = teleport is not None and teleport is not False
        sched = (self.sampling_scheduler(guidance_scale if guided else 1.0, teleporting) if shipped_sampler_data
                 else self.scheduler)
        x = latents.to(device=device, dtype=dtype)
        if teleporting:
            from ..models.sampler_data import load_teleport

            model = getattr(self.config, "model_name", None)
            if teleport is True and not model:
                raise ValueError("teleport=True takes the statistics shipped for the pipeline's model_name, which this "
                                 "pipeline lacks; pass a statistics file (`diffalign calibrate teleport`) instead.")
            x, sigmas = load_teleport(model or "", teleport).start(sched, x, num_inference_steps, labels,
                                                                   guidance_scale if guided else 1.0)
            sched.set_timesteps(sigmas=sigmas, device=device)
        else:
            sched.set_timesteps(num_inference_steps, device=device)
            x = x * sched.init_noise_sigma
        step_kwargs = {}
        if "generator" in inspect.signature(sched.step).parameters:
            step_kwargs["generator"] = generator
        for t in self.progress_bar(sched.timesteps):
            model_in = sched.scale_model_input(x, t)
            if guided:
                model_in = torch.cat([model_in, model_in])
            out = self.unet(model_in, t, class_labels=unet_labels).sample
            if guided:
                c, u = out.chunk(2)
                out = u + guidance_scale * (c - u)
            x = sched.step(out, t, x, **step_kwargs).prev_sample

        images = (x.float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            result = images.cpu()
        else:
            result = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


# --------------------------------------------------------------------------------------------------------
# Loading by name
# --------------------------------------------------------------------------------------------------------


def builtin_pipeline(name: str, device: str | torch.device = "cpu", scheduler: str = "dpm-solver++"):
    """The shipped model ``builtin:<name>`` as a :class:`ClassConditionalPipeline` (DPM-Solver++ by default); its
    ``model_name`` makes the shipped sampler data apply to whichever diffalign scheduler it is given."""
    from ..models.builtin import builtin_spec, load_builtin_scheduler_config, load_builtin_unet
    from ..samplers import make_scheduler

    spec = builtin_spec(name)
    unet = load_builtin_unet(spec.name)
    sched = make_scheduler(scheduler, load_builtin_scheduler_config(spec.name))
    pipe = ClassConditionalPipeline(unet=unet, scheduler=sched, class_names=list(spec.class_names),
                                    class_aliases=dict(spec.aliases), model_name=f"builtin:{spec.name}")
    pipe.set_progress_bar_config(disable=None)
    return pipe.to(device)


def _offline_message(name: str, err: Exception) -> str:
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return (f"model {name!r} is not available offline: it is not a local directory and its weights are not in the "
            f"Hugging Face cache ({home}). Download it once with network access (e.g. "
            f"`huggingface-cli download {name}`), pass the path of a local diffusers directory instead, or set HF_HOME "
            f"to a cache that holds it. (Cause: {type(err).__name__}: {_first_sentence(str(err))})")


def load_pipeline(name_or_path: str, device: str | torch.device = "cpu", **kwargs):
    """Load a pipeline by name.

    * ``"builtin:digits"`` / ``"builtin:fashion"``: the shipped models as :class:`ClassConditionalPipeline`;
    * a local diffusers directory: ``DiffusionPipeline.from_pretrained`` (a directory saved from a
      :class:`ClassConditionalPipeline` loads as one);
    * a ``diffalign train`` output directory: its base model with the trained weights;
    * a hub id: from the local cache first, then the hub; when neither works (offline, not cached) one
      :class:`ModelNotAvailableError` says how to make it available.
    """
    if name_or_path.startswith("builtin:"):
        return builtin_pipeline(name_or_path, device=device)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("alignment.json", "trainer_state.json")):
        # a `diffalign train` output directory or one of its checkpoints
        from ..align.policy import load_aligned_pipeline

        return load_aligned_pipeline(path, device=device)
    if path.is_dir():
        index = path / "model_index.json"
        cls = DiffusionPipeline
        if index.is_file() and json.loads(index.read_text()).get("_class_name") == ClassConditionalPipeline.__name__:
            cls = ClassConditionalPipeline
        return cls.from_pretrained(str(path), **kwargs).to(device)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"no diffusers pipeline directory at {name_or_path!r}.")
    try:
        pipe = DiffusionPipeline.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except Exception as cached_err:  # not in the cache: try the hub
        from ..rewards.hub import hub_reachable

        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not hub_reachable():
            raise ModelNotAvailableError(_offline_message(name_or_path, cached_err)) from None
        try:
            pipe = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
        except Exception as err:
            if _is_network_error(err):
                raise ModelNotAvailableError(_offline_message(name_or_path, err)) from None
            raise
    return pipe.to(device)


def _is_network_error(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) means the hub could not be reached."""
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "ReadTimeout",
             "MaxRetryError", "NameResolutionError", "ConnectError", "TimeoutException"}
    e: BaseException | None = err
    while e is not None:
        if type(e).__name__ in names or isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if "couldn't connect" in str(e).lower() or "offline" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def to_numpy_images(images) -> np.ndarray:
    """Pipeline output (PIL list, NHWC array or NCHW tensor) as an NHWC float array in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.permute(0, 2, 3, 1).cpu().numpy()
    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])


def _first_sentence(text: str, limit: int = 200) -> str:
    """The first sentence of an error message, cut at a word boundary when it is longer than ``limit``."""
    line = (text.strip().splitlines() or [""])[0]
    sentence = line.split(". ")[0].rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence

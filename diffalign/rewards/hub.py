"""Rewards backed by downloaded weights: LAION aesthetic, PickScore, CLIP score, HPSv2 and ImageReward.

Each reward imports its heavy dependency (transformers, torchmetrics' CLIP code, ``hpsv2``, ``image-reward``) only
when it is instantiated, and loads its weights from a local path or the local Hugging Face cache. When the weights
or the optional package are missing (for example offline, with ``HF_HUB_OFFLINE=1``), instantiation raises one
:class:`RewardUnavailableError` whose message names the weights and how to get them::

    from diffalign.rewards import get_reward
    reward = get_reward("aesthetic", clip_path="/models/clip-vit-large-patch14",
                        mlp_path="/models/sac+logos+ava1-l14-linearMSE.pth")
    scores, info = reward(images, prompts)          # images: [N, C, H, W] floats in [0, 1]

Models are kept on the device of the images they score (moved on the first call).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from .registry import register_reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_MLP_REPO = "camenduru/improved-aesthetic-predictor"  # hub mirror of the file in the LAION GitHub repo
AESTHETIC_MLP_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                     "sac%2Blogos%2Bava1-l14-linearMSE.pth")
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
OPEN_CLIP_VIT_H = ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_pytorch_model.bin")
IMAGEREWARD_REPO = "THUDM/ImageReward"


class RewardUnavailableError(RuntimeError):
    """A reward cannot be built here: its weights or its optional package are missing.

    The message names what is missing and how to get it (download once with network access, pass a local path, set
    ``HF_HOME`` to a cache that holds the weights, or ``pip install`` the package).
    """


class Weight(NamedTuple):
    """One set of weights a reward needs: a hub repository, optionally one file in it, and a description."""

    repo: str
    file: str | None = None
    what: str = ""
    download_args: str = ""  # extra `hf download` arguments, e.g. --include patterns

    def describe(self) -> str:
        where = f"{self.file} from hub repo {self.repo}" if self.file else f"hub id {self.repo}"
        return f"{where} ({self.what})" if self.what else where

    def command(self) -> str:
        return " ".join(p for p in ("hf download", self.repo, self.file or "", self.download_args) if p)


def _hub_state() -> tuple[str, bool]:
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"), False
    return str(constants.HF_HUB_CACHE), bool(constants.HF_HUB_OFFLINE)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unavailable(reward: str, reason: str, weights: Sequence[Weight], local_hint: str | None = None,
                pip: str | None = None) -> RewardUnavailableError:
    """Build the :class:`RewardUnavailableError` for ``reward`` (raise it outside any ``except`` block)."""
    cache, offline = _hub_state()
    lines = [f"reward {reward!r} is unavailable: {reason}."]
    if pip:
        lines.append(f"Install its optional package: pip install {pip}")
    lines.append("It needs these weights:")
    lines += [f"  - {w.describe()}" for w in weights]
    lines.append("To get them, do one of:")
    lines.append("  - download them once on a machine with network access (they go to the Hugging Face cache):")
    lines += [f"      {w.command()}" for w in weights]
    lines.append("    (with huggingface_hub < 1.0 the command is `huggingface-cli download` instead of `hf download`)")
    if local_hint:
        lines.append(f"  - or pass local copies: {local_hint}")
    lines.append(f"  - or set HF_HOME to a Hugging Face cache that already holds them (the hub cache now is {cache}"
                 + ("; HF_HUB_OFFLINE=1 is set, so nothing is downloaded)" if offline else ")"))
    return RewardUnavailableError("\n".join(lines))


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``org/name`` or ``name``)."""
    return name.startswith((".", "~", "/", os.sep)) or name.count("/") > 1 or "\\" in name or name[1:2] == ":"


def _hub_name(name_or_path: str, default: str) -> str:
    """The hub id to name in messages: the argument itself unless it is a local path."""
    return default if _looks_like_path(str(name_or_path)) else str(name_or_path)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (one request, no retries)."""
    try:
        import requests
        from huggingface_hub import constants

        requests.head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:  # no network, DNS failure, proxy refusal, missing package: all mean "cannot download"
        return False


def _in_hub_cache(repo: str) -> bool:
    cache, _ = _hub_state()
    return os.path.isdir(os.path.join(cache, f"models--{repo.replace('/', '--')}"))


def _load(reward: str, name: str, loader: Callable[[str], Any], weights: Sequence[Weight],
          local_hint: str | None, hub_id: bool = True) -> Any:
    """``loader(name)`` where ``name`` is a local path or a hub id; missing files become RewardUnavailableError.

    A hub id that is not in the local cache fails at once when the hub does not answer (instead of after the hub
    client's retries). ``hub_id=False``: ``name`` is the package's own model name, whose files the loader finds
    itself (no hub-cache check)."""
    name = str(name)
    path = os.path.expanduser(name)
    _, offline = _hub_state()
    if not os.path.exists(path) and _looks_like_path(name):
        error = unavailable(reward, f"the local path {name!r} does not exist", weights, local_hint)
    elif hub_id and not os.path.exists(path) and not offline and not _in_hub_cache(name) and not hub_reachable():
        error = unavailable(reward, f"{name!r} is not in the Hugging Face cache and the hub cannot be reached "
                            "(no network)", weights, local_hint)
    else:
        try:
            return loader(path if os.path.exists(path) else name)
        except (OSError, ValueError) as exc:  # hub client: not cached / offline / invalid id; missing local files
            error = unavailable(reward, f"could not load {name!r} ({_first_line(exc)})", weights, local_hint)
    raise error  # raised outside the except block: no chained traceback from inside the hub client


def _import(reward: str, module: str, pip: str, weights: Sequence[Weight], local_hint: str | None = None) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        error = unavailable(reward, f"the optional package {pip!r} is not installed or does not import "
                            f"({_first_line(exc)})", weights, local_hint, pip=pip)
    raise error


def _transformers(reward: str, weights: Sequence[Weight]) -> Any:
    return _import(reward, "transformers", "transformers", weights)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (e.g. the unused text tower of a full CLIP checkpoint)."""
    from transformers.utils import logging as tlog

    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _features(out: Any) -> torch.Tensor:
    """Projected CLIP features from ``get_*_features`` (a tensor in transformers 4, a ModelOutput in 5)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find CLIP features in {type(out).__name__}.")


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.repeat(1, 3, 1, 1) if arr.shape[1] == 1 else arr
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def clip_preprocess(images: torch.Tensor, size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP's image preprocessing in torch (differentiable): [N, C, H, W] in [0, 1] -> normalised [N, 3, size, size].

    Shorter side resized to ``size`` (bicubic, antialiased, as PIL does), center crop, clamp to [0, 1] (as the uint8
    round trip of the PIL pipeline does), normalisation with CLIP's mean/std; 1-channel images are repeated to 3.
    """
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        short, long = (h, w) if h <= w else (w, h)
        new_long = max(size, int(size * long / short))
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
        if (new_h, new_w) != (h, w):
            images = nn.functional.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False,
                                               antialias=True).clamp(0, 1)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[..., top:top + size, left:left + size]
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


# --------------------------------------------------------------------------------------------------------------------
# LAION aesthetic predictor


def aesthetic_mlp(input_dim: int = 768) -> nn.Sequential:
    """The LAION improved-aesthetic-predictor head (``MLP.layers`` of its ``simple_inference.py``): purely linear,
    with dropout between the first layers; its state dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``."""
    return nn.Sequential(
        nn.Linear(input_dim, 1024), nn.Dropout(0.2),
        nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def load_aesthetic_mlp(path: str) -> nn.Sequential:
    """Load the aesthetic head from a torch state dict (``.pth``, read with ``weights_only=True``) or a safetensors
    file; keys may carry the original ``layers.`` prefix or none."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} does not hold a state dict.")
    state = {k.removeprefix("module.").removeprefix("layers."): v for k, v in state.items()}
    if "0.weight" not in state:
        raise ValueError(f"{path} is not the LAION aesthetic head: keys {sorted(state)[:6]}...")
    mlp = aesthetic_mlp(int(state["0.weight"].shape[1]))
    mlp.load_state_dict(state, strict=True)
    return mlp.eval().requires_grad_(False)


def _aesthetic_weights(clip_path: str, mlp_repo: str) -> list[Weight]:
    return [Weight(_hub_name(clip_path, CLIP_L14), what="CLIP ViT-L/14; only its image tower is used"),
            Weight(mlp_repo, AESTHETIC_MLP_FILE, what=f"LAION aesthetic head, originally {AESTHETIC_MLP_URL}")]


def _resolve_mlp(mlp_path: str | None, mlp_repo: str, weights: list[Weight], hint: str) -> str:
    if mlp_path is not None:
        path = os.path.expanduser(str(mlp_path))
        if os.path.isdir(path):
            for name in (AESTHETIC_MLP_FILE, AESTHETIC_MLP_FILE.replace(".pth", ".safetensors")):
                if os.path.isfile(os.path.join(path, name)):
                    return os.path.join(path, name)
            error = unavailable("aesthetic", f"the directory {mlp_path!r} holds no {AESTHETIC_MLP_FILE}", weights,
                                hint)
        elif os.path.isfile(path):
            return path
        else:
            error = unavailable("aesthetic", f"the file {mlp_path!r} does not exist", weights, hint)
        raise error

    def download(repo: str) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, AESTHETIC_MLP_FILE)

    return _load("aesthetic", mlp_repo, download, weights, hint)


def _load_clip_vision(path: str) -> nn.Module:
    """``CLIPVisionModelWithProjection`` from a vision-only or a full CLIP checkpoint (whose top-level
    ``projection_dim`` is copied into the vision config, which transformers 5 does not do by itself)."""
    from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(path)
    if isinstance(config, CLIPConfig):
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        config = vision
    with _quiet_transformers():
        model = CLIPVisionModelWithProjection.from_pretrained(path, config=config)
    return model.eval().requires_grad_(False)


@register_reward("aesthetic", differentiable=True)
def aesthetic(clip_path: str = CLIP_L14, mlp_path: str | None = None, mlp_repo: str = AESTHETIC_MLP_REPO):
    """LAION aesthetic predictor (~1-10): CLIP ViT-L/14 image embedding, L2-normalised, through the linear MLP head
    ``sac+logos+ava1-l14-linearMSE.pth`` (as in ddpo-pytorch, d3po and DiffusionDPO).

    ``clip_path``: hub id or local directory of the CLIP model (a full ``CLIPModel`` or a
    ``CLIPVisionModelWithProjection`` checkpoint). ``mlp_path``: the head as a ``.pth`` state dict or a
    ``.safetensors`` file, or a directory holding it; by default ``sac+logos+ava1-l14-linearMSE.pth`` from the
    hub repo ``mlp_repo``. Preprocessing is done in torch, so ``differentiable=True`` gives gradients to the images.
    """
    weights = _aesthetic_weights(clip_path, mlp_repo)
    hint = 'get_reward("aesthetic", clip_path="<dir of clip-vit-large-patch14>", mlp_path="<path of the .pth>")'
    _transformers("aesthetic", weights)
    clip = _load("aesthetic", clip_path, _load_clip_vision, weights, hint)
    mlp = load_aesthetic_mlp(_resolve_mlp(mlp_path, mlp_repo, weights, hint))
    if mlp[0].in_features != clip.config.projection_dim:
        raise ValueError(f"the aesthetic head takes {mlp[0].in_features}-d embeddings but {clip_path!r} gives "
                         f"{clip.config.projection_dim}-d ones; the LAION head needs CLIP ViT-L/14 ({CLIP_L14}).")
    size = int(clip.config.image_size)

    def fn(images, prompts, metadata):
        clip.to(images.device)
        mlp.to(images.device)
        embeds = clip(pixel_values=clip_preprocess(images.float(), size)).image_embeds
        embeds = embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)
        return mlp(embeds).squeeze(1), {}

    return fn


# --------------------------------------------------------------------------------------------------------------------
# PickScore and CLIP score


def _load_clip_model(path: str) -> nn.Module:
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(path).eval().requires_grad_(False)


def _load_clip_processor(path: str) -> Any:
    from transformers import CLIPProcessor

    return CLIPProcessor.from_pretrained(path)


@register_reward("pickscore")
def pickscore(model_path: str = PICKSCORE_MODEL, processor_path: str = PICKSCORE_PROCESSOR):
    """PickScore: ``logit_scale * cos(text, image)`` of ``yuvalkirstain/PickScore_v1`` (a CLIP-H ``CLIPModel``) for
    each image with its own prompt, with the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor (images go through
    the processor as PIL images, as in the reference code, so the reward is not differentiable).

    ``model_path`` / ``processor_path``: hub ids or local directories. ``info["cosine"]`` holds the cosines.
    """
    weights = [Weight(_hub_name(model_path, PICKSCORE_MODEL), what="PickScore CLIP-H model"),
               Weight(_hub_name(processor_path, PICKSCORE_PROCESSOR),
                      what="its processor: tokenizer and image preprocessing files",
                      download_args='--include "*.json" "*.txt"')]
    hint = 'get_reward("pickscore", model_path="<dir of PickScore_v1>", processor_path="<dir of the CLIP-H processor>")'
    _transformers("pickscore", weights)
    model = _load("pickscore", model_path, _load_clip_model, weights, hint)
    processor = _load("pickscore", processor_path, _load_clip_processor, weights, hint)

    def fn(images, prompts, metadata):
        device = images.device
        model.to(device)
        pixels = processor(images=_to_pil(images), return_tensors="pt")["pixel_values"].to(device)
        text = processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embeds = _features(model.get_image_features(pixel_values=pixels))
        text_embeds = _features(model.get_text_features(input_ids=text["input_ids"].to(device),
                                                        attention_mask=text["attention_mask"].to(device)))
        cosine = nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return model.logit_scale.exp() * cosine, {"cosine": cosine}

    return fn


class _TensorFeatures(nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors, as torchmetrics' CLIP score expects (transformers 5
    returns ModelOutputs there)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return _features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _features(self.model.get_text_features(*args, **kwargs))


@register_reward("clip_score")
def clip_score(model_name_or_path: str = CLIP_L14):
    """CLIP score of each image with its prompt, ``100 * cos(image, text)``, computed by torchmetrics' ``CLIPScore``
    code with the ``CLIPModel`` / ``CLIPProcessor`` at ``model_name_or_path`` (hub id or local directory).

    Per-image values are not clipped at 0 (torchmetrics' ``CLIPScore.compute`` reports ``max(mean, 0)``).
    """
    weights = [Weight(_hub_name(model_name_or_path, CLIP_L14), what="CLIP model and processor")]
    hint = 'get_reward("clip_score", model_name_or_path="<dir of a CLIP model with its processor>")'
    _transformers("clip_score", weights)
    from torchmetrics.multimodal.clip_score import CLIPScore

    model = _load("clip_score", model_name_or_path, _load_clip_model, weights, hint)
    processor = _load("clip_score", model_name_or_path, _load_clip_processor, weights, hint)
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor))
    try:
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    except ImportError:  # other torchmetrics versions: one metric call per image
        _clip_score_update = None

    def fn(images, prompts, metadata):
        metric.to(images.device)
        uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        uint8 = uint8.repeat(1, 3, 1, 1) if uint8.shape[1] == 1 else uint8
        if _clip_score_update is not None:
            scores, _ = _clip_score_update(list(uint8), list(prompts), metric.model, metric.processor)
        else:
            scores = []
            for image, prompt in zip(uint8, prompts, strict=True):
                metric.reset()
                metric.update(image[None], [prompt])
                scores.append(metric.score.clone())
            scores = torch.stack(scores)
        return scores.float(), {}

    return fn


# --------------------------------------------------------------------------------------------------------------------
# HPSv2 and ImageReward (optional packages)


def _group_by_prompt(prompts: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    return groups


@register_reward("hpsv2")
def hpsv2(hps_version: str = "v2.1"):
    """Human Preference Score v2 / v2.1 through the ``hpsv2`` package (``pip install hpsv2``), with its documented
    ``hpsv2.score(images, prompt, hps_version=...)`` API, called once per distinct prompt with PIL images.

    Needs ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` from the hub repo ``xswu/HPSv2`` and the open_clip
    ViT-H-14 weights (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), both checked in the Hugging Face cache at
    instantiation. ``hpsv2.score`` reloads its checkpoint on every call, so this reward is slow. Not tested here:
    the package and its weights cannot be installed offline; only the missing-package and missing-weights errors are.
    """
    if hps_version not in HPS_FILES:
        raise ValueError(f"hps_version={hps_version!r}; use one of {sorted(HPS_FILES)}.")
    weights = [Weight(HPS_REPO, HPS_FILES[hps_version], what=f"HPS {hps_version} checkpoint"),
               Weight(*OPEN_CLIP_VIT_H, what="open_clip ViT-H-14 weights hpsv2 builds its model from")]
    module = _import("hpsv2", "hpsv2", "hpsv2", weights)

    def check(weight: Weight) -> Callable[[str], str]:
        def download(repo: str) -> str:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(repo, weight.file)

        return download

    for weight in weights:
        _load("hpsv2", weight.repo, check(weight), weights, None)

    def fn(images, prompts, metadata):
        pil, scores = _to_pil(images), torch.zeros(len(prompts))
        for prompt, idx in _group_by_prompt(prompts).items():
            values = module.score([pil[i] for i in idx], prompt, hps_version=hps_version)
            scores[idx] = torch.tensor([float(v) for v in values])
        return scores, {}

    return fn


@register_reward("imagereward")
def imagereward(model_name_or_path: str = "ImageReward-v1.0", download_root: str | None = None,
                device: str | None = None):
    """ImageReward (BLIP-based) through the ``image-reward`` package (``pip install image-reward``), with its
    documented API: ``ImageReward.load(name_or_checkpoint, device=..., download_root=...)`` then
    ``model.score(prompt, pil_image)`` per image.

    ``model_name_or_path``: ``"ImageReward-v1.0"`` or the path of ``ImageReward.pt``; ``download_root``: the directory
    holding ``ImageReward.pt`` and ``med_config.json`` (default ``~/.cache/ImageReward``). The package also loads the
    ``bert-base-uncased`` tokenizer from the hub. Not tested here: the package and its weights cannot be installed
    offline; only the missing-package and missing-weights errors are.
    """
    weights = [Weight(IMAGEREWARD_REPO, "ImageReward.pt", what="ImageReward-v1.0 checkpoint"),
               Weight(IMAGEREWARD_REPO, "med_config.json", what="its BLIP text-encoder config"),
               Weight("bert-base-uncased", what="BLIP tokenizer", download_args='--include "*.json" "*.txt"')]
    hint = ('get_reward("imagereward", download_root="<dir holding ImageReward.pt and med_config.json>") '
            '(e.g. filled by: hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir <dir>)')
    module = _import("imagereward", "ImageReward", "image-reward", weights, hint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _load("imagereward", model_name_or_path,
                  lambda name: module.load(name, device=device, download_root=download_root), weights, hint,
                  hub_id=False)  # "ImageReward-v1.0" is the package's name, its files are in download_root

    def fn(images, prompts, metadata):
        pil = _to_pil(images)
        return torch.tensor([float(model.score(p, im)) for p, im in zip(prompts, pil, strict=True)]), {}

    return fn


__all__ = [
    "RewardUnavailableError",
    "aesthetic_mlp",
    "clip_preprocess",
    "load_aesthetic_mlp",
    "unavailable",
]

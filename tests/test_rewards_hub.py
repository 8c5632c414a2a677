"""Weight-backed rewards (aesthetic, pickscore, clip_score, hpsv2, imagereward) with tiny random-weight stand-ins of
the same architectures built here, and their errors when the weights or optional packages are missing offline."""

import json
import os
import shutil
import subprocess
import sys
import traceback
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from diffalign.rewards import get_reward
from diffalign.rewards.hub import (
    RewardUnavailableError,
    aesthetic_mlp,
    clip_preprocess,
    load_aesthetic_mlp,
)

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

pytestmark = pytest.mark.filterwarnings("ignore:.*torchvision:UserWarning", "ignore:Converting a tensor:UserWarning")


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2/CLIP) uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel (projection_dim 768, the LAION head's input) with a CLIPTokenizer built from a minimal
    vocab.json/merges.txt (single bytes only) and a 32-px CLIPImageProcessor, saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    chars = _byte_chars()
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(path)
    assert tokenizer("a cat")["input_ids"] == [vocab["<|startoftext|>"], vocab["a</w>"], vocab["c"], vocab["a"],
                                               vocab["t</w>"], vocab["<|endoftext|>"]]
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=768,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


class _LaionMLP(nn.Module):
    """The module the LAION file was saved from: its state dict keys are ``layers.N.*``."""

    def __init__(self):
        super().__init__()
        self.layers = aesthetic_mlp(768)


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("mlp") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(_LaionMLP().state_dict(), path)
    return path


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face home (env and the hub client's constants both point at it)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


def _put_in_hub_cache(cache, repo: str, files: dict) -> None:
    """Lay files out as the hub client caches a download of ``repo`` (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _images(n=2, size=(40, 56), seed=0):
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------- aesthetic


def test_aesthetic_head_has_the_laion_architecture_and_loads_pth_and_safetensors(mlp_file, tmp_path):
    head = aesthetic_mlp()
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    assert not any(isinstance(m, (nn.ReLU, nn.GELU)) for m in head)  # the released head is purely linear
    saved = torch.load(mlp_file, weights_only=True)
    assert sorted({k.rsplit(".", 1)[0] for k in saved}) == [f"layers.{i}" for i in (0, 2, 4, 6, 7)]

    from safetensors.torch import save_file

    save_file({k.removeprefix("layers."): v for k, v in saved.items()}, tmp_path / "head.safetensors")
    x = torch.randn(3, 768)
    expected = x
    for i in (0, 2, 4, 6, 7):
        expected = expected @ saved[f"layers.{i}.weight"].T + saved[f"layers.{i}.bias"]
    for path in (mlp_file, tmp_path / "head.safetensors"):
        torch.testing.assert_close(load_aesthetic_mlp(str(path))(x), expected)
    torch.save({"layers.0.weight": torch.zeros(4, 768)}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError):
        load_aesthetic_mlp(str(tmp_path / "other.pth"))


def test_torch_clip_preprocessing_matches_the_clip_image_processor():
    from transformers import CLIPImageProcessor

    coarse = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(3))
    image = nn.functional.interpolate(coarse, size=(300, 400), mode="bilinear", align_corners=False)
    image = (image * 255).round() / 255
    ours = clip_preprocess(image)
    assert ours.shape == (1, 3, 224, 224)
    reference = CLIPImageProcessor()(images=[_pil(image[0])], return_tensors="pt")["pixel_values"]
    one_step = 1 / 255 / min(CLIPImageProcessor().image_std)
    assert (ours - reference).abs().mean() < 0.5 * one_step and (ours - reference).abs().max() < 2 * one_step
    grey = clip_preprocess(image.mean(1, keepdim=True))
    torch.testing.assert_close(grey[:, 0] * 0.26862954 + 0.48145466, grey[:, 2] * 0.27577711 + 0.40821073)


def test_aesthetic_from_local_paths_scores_validates_and_differentiates(tiny_clip, mlp_file, tmp_path):
    from transformers import CLIPModel

    reward = get_reward("aesthetic", clip_path=str(tiny_clip), mlp_path=str(mlp_file))
    images = _images(3)
    scores, _ = reward(images, ["a", "b", "c"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()

    clip = CLIPModel.from_pretrained(tiny_clip).eval()  # independent path: the full model's image features
    embeds = clip.get_image_features(pixel_values=clip_preprocess(images, 32))
    embeds = embeds if isinstance(embeds, torch.Tensor) else embeds.pooler_output
    expected = load_aesthetic_mlp(str(mlp_file))(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(scores, expected.detach(), rtol=1e-4, atol=1e-5)

    grey, _ = reward(images.mean(1, keepdim=True), ["", "", ""])  # 1-channel images are repeated to RGB
    assert grey.shape == (3,) and torch.isfinite(grey).all()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        reward(images * 2 - 1, ["a", "b", "c"])

    shutil.copy(mlp_file, tmp_path / mlp_file.name)  # a directory holding the file works too
    differentiable = get_reward("aesthetic", differentiable=True, clip_path=str(tiny_clip), mlp_path=str(tmp_path))
    x = images.clone().requires_grad_(True)
    values, _ = differentiable(x, ["a", "b", "c"])
    values.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_aesthetic_default_ids_load_from_an_hf_home_cache(tiny_clip, mlp_file, offline_hub):
    _put_in_hub_cache(offline_hub, "openai/clip-vit-large-patch14",
                      {p.name: p for p in tiny_clip.iterdir() if p.is_file()})
    _put_in_hub_cache(offline_hub, "camenduru/improved-aesthetic-predictor", {mlp_file.name: mlp_file})
    scores, _ = get_reward("aesthetic")(_images(2), ["", ""])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


# ---------------------------------------------------------------------------------------------- pickscore, clip_score


def _clip_embeddings(path, images, prompts):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    pixels = processor(images=[_pil(im) for im in images], return_tensors="pt")["pixel_values"]
    feats = [model.get_image_features(pixel_values=pixels),
             model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt"))]
    feats = [f if isinstance(f, torch.Tensor) else f.pooler_output for f in feats]
    return model, nn.functional.cosine_similarity(*feats, dim=-1).detach()


def test_pickscore_from_local_paths_depends_on_the_prompt(tiny_clip):
    reward = get_reward("pickscore", model_path=str(tiny_clip), processor_path=str(tiny_clip))
    images = _images(1).repeat(3, 1, 1, 1)
    prompts = ["a photo of a cat", "a dog on the grass", "a photo of a cat"]
    scores, info = reward(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert scores[0] != scores[1] and scores[0] == scores[2]
    model, cosine = _clip_embeddings(tiny_clip, images, prompts)
    torch.testing.assert_close(scores, model.logit_scale.exp().detach() * cosine, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(info["cosine"], cosine, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        reward(images * 2 - 1, prompts)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(images, prompts[:2])


def test_clip_score_from_a_local_path_is_100_cos_per_image_and_prompt(tiny_clip):
    reward = get_reward("clip_score", model_name_or_path=str(tiny_clip))
    images = torch.cat([_images(1), _images(1), _images(1, seed=5)])
    prompts = ["a photo of a cat", "a dog on the grass", "a photo of a cat"]
    scores, _ = reward(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and scores[0] != scores[1]
    _, cosine = _clip_embeddings(tiny_clip, images, prompts)
    torch.testing.assert_close(scores, 100 * cosine, rtol=1e-4, atol=1e-4)
    as_uint8, _ = reward((images * 255).round().to(torch.uint8), prompts)
    torch.testing.assert_close(as_uint8, scores, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        reward(images * 2 - 1, prompts)


# --------------------------------------------------------------------------------------------------- offline errors


def _assert_clear(exc: BaseException, *needles: str) -> str:
    message = str(exc)
    assert isinstance(exc, RuntimeError)
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    frames = [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]
    assert not any("huggingface_hub" in f or "site-packages/transformers" in f for f in frames), frames
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    return message


FIX = ("hf download", "HF_HOME", "huggingface-cli download")


@pytest.mark.parametrize(("name", "kwargs", "needles"), [
    ("aesthetic", {}, ("openai/clip-vit-large-patch14", "sac+logos+ava1-l14-linearMSE.pth", "clip_path=",
                       "mlp_path=", "HF_HUB_OFFLINE=1")),
    ("aesthetic", {"clip_path": "nobody/no-such-clip"}, ("nobody/no-such-clip", "hf download nobody/no-such-clip")),
    ("aesthetic", {"clip_path": "/no/such/dir/clip"}, ("/no/such/dir/clip", "does not exist")),
    ("pickscore", {}, ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "model_path=",
                       "processor_path=")),
    ("clip_score", {}, ("openai/clip-vit-large-patch14", "model_name_or_path=")),
    ("clip_score", {"model_name_or_path": "nobody/no-such-clip"}, ("nobody/no-such-clip",)),
])
def test_missing_weights_offline_raise_one_clear_error(offline_hub, name, kwargs, needles):
    with pytest.raises(RewardUnavailableError) as info:
        get_reward(name, **kwargs)
    message = _assert_clear(info.value, *FIX, *needles)
    assert str(offline_hub) in message


def test_aesthetic_with_clip_but_without_the_head_names_the_head(tiny_clip, offline_hub):
    with pytest.raises(RewardUnavailableError) as info:
        get_reward("aesthetic", clip_path=str(tiny_clip))
    _assert_clear(info.value, *FIX, "hf download camenduru/improved-aesthetic-predictor "
                                    "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(RewardUnavailableError, match="does not exist"):
        get_reward("aesthetic", clip_path=str(tiny_clip), mlp_path="/no/such/head.pth")


@pytest.mark.parametrize(("name", "module", "needles"), [
    ("hpsv2", "hpsv2", ("pip install hpsv2", "xswu/HPSv2", "HPS_v2.1_compressed.pt", "open_clip_pytorch_model.bin")),
    ("imagereward", "ImageReward", ("pip install image-reward", "THUDM/ImageReward", "ImageReward.pt")),
])
def test_missing_optional_packages_raise_one_clear_error(monkeypatch, offline_hub, name, module, needles):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail even where the package is installed
    with pytest.raises(RewardUnavailableError) as info:
        get_reward(name)
    _assert_clear(info.value, *needles)


def test_hpsv2_glue_with_a_stand_in_package(monkeypatch, offline_hub, tmp_path):
    calls = []

    def score(images, prompt, hps_version="v2.0"):
        calls.append((len(images), prompt, hps_version))
        return [len(prompt) + 0.5 * i for i in range(len(images))]

    monkeypatch.setitem(sys.modules, "hpsv2", types.SimpleNamespace(score=score))
    with pytest.raises(RewardUnavailableError) as info:  # package present, checkpoints not cached
        get_reward("hpsv2")
    _assert_clear(info.value, *FIX, "hf download xswu/HPSv2 HPS_v2.1_compressed.pt")
    (tmp_path / "w").write_bytes(b"0")
    _put_in_hub_cache(offline_hub, "xswu/HPSv2", {"HPS_v2.1_compressed.pt": tmp_path / "w"})
    _put_in_hub_cache(offline_hub, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                      {"open_clip_pytorch_model.bin": tmp_path / "w"})
    scores, _ = get_reward("hpsv2")(_images(3), ["ab", "abcd", "ab"])
    assert scores.tolist() == [2.0, 4.0, 2.5]
    assert sorted(calls) == [(1, "abcd", "v2.1"), (2, "ab", "v2.1")]


def test_imagereward_glue_with_a_stand_in_package(monkeypatch, offline_hub):
    class Model:
        def score(self, prompt, image):
            return len(prompt) + image.size[0] / 100

    def load(name, device="cpu", download_root=None):
        if download_root is None:
            raise FileNotFoundError("cannot find the requested files in the local cache")
        return Model()

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    scores, _ = get_reward("imagereward", download_root="/models/imagereward")(_images(2, (16, 24)), ["a", "abc"])
    assert scores.tolist() == pytest.approx([1.24, 3.24])
    with pytest.raises(RewardUnavailableError) as info:
        get_reward("imagereward")
    _assert_clear(info.value, *FIX, "THUDM/ImageReward", "download_root=")
    # no network but not marked offline: the package's model name is not looked up in the hub cache
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("diffalign.rewards.hub.hub_reachable", lambda *a, **k: False)
    scores, _ = get_reward("imagereward", download_root="/models/imagereward")(_images(2, (16, 24)), ["a", "abc"])
    assert scores.tolist() == pytest.approx([1.24, 3.24])


def test_heavy_dependencies_are_imported_only_when_a_hub_reward_is_built():
    code = ("import sys; from diffalign.rewards import available_rewards, get_reward; names = available_rewards(); "
            "get_reward('brightness'); assert {'aesthetic', 'pickscore', 'clip_score', 'hpsv2', 'imagereward'} <= "
            "set(names); print(sorted(m for m in ('transformers', 'hpsv2', 'ImageReward', "
            "'torchmetrics.multimodal.clip_score') if m in sys.modules))")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_missing_weights_without_network_fail_at_once(offline_hub, monkeypatch):
    """Not offline by configuration, but the hub does not answer: one clear error, without the client's retries."""
    import time

    from huggingface_hub import constants

    from diffalign.rewards import hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    calls = []
    monkeypatch.setattr(hub, "_load_clip_model", lambda path: calls.append(path))
    start = time.perf_counter()
    with pytest.raises(RewardUnavailableError, match="cannot be reached") as info:
        get_reward("clip_score")
    assert time.perf_counter() - start < 2 and not calls  # the hub client was never asked
    _assert_clear(info.value, *FIX, "openai/clip-vit-large-patch14")

"""The shipped models (builtin:digits, builtin:fashion): weights, pipeline, registry, training script, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import diffalign
from diffalign.models import builtin
from diffalign.models.builtin import (
    FASHION_DIR,
    MissingWeightsError,
    fashion_available,
    load_builtin_classifier,
    load_builtin_data,
    load_builtin_unet,
    translate,
    weights_dir,
)
from diffalign.models.registry import MODELS, load_model
from diffalign.pipelines import ClassConditionalPipeline, ModelNotAvailableError, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_FILES = ("unet.safetensors", "unet_config.json", "classifier.safetensors", "classifier_config.json",
                "fid_stats.safetensors", "MODEL_CARD.md")
FASHION_GUIDED_ACCURACY_BOUND = 0.5
needs_fashion_data = pytest.mark.skipif(
    not fashion_available(),
    reason=f"Fashion-MNIST not installed in {FASHION_DIR} (apt-get install -y dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def digits_pipe() -> ClassConditionalPipeline:
    pipe = diffalign.load_pipeline("builtin:digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["digits", "fashion"])
def test_shipped_weight_files_are_safetensors(name):
    from safetensors import safe_open

    d = weights_dir(name)
    for f in WEIGHT_FILES:
        assert (d / f).is_file(), f"missing {d / f}"
    with safe_open(str(d / "unet.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 10
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pt")) and not list(d.glob("*.pth"))
    config = json.loads((d / "unet_config.json").read_text())
    assert config["num_class_embeds"] == 11  # 10 classes + the null class
    assert sum(p.stat().st_size for p in d.iterdir()) < 8e6


def test_pipeline_outputs(digits_pipe):
    g = torch.Generator().manual_seed(0)
    out = digits_pipe("seven", num_images_per_prompt=2, guidance_scale=3.0, num_inference_steps=8, generator=g,
                      output_type="np")
    assert out.images.shape == (2, 8, 8, 1) and np.isfinite(out.images).all()
    assert out.images.min() >= 0 and out.images.max() <= 1
    pt = digits_pipe(class_labels=[1, 2, 3], num_inference_steps=5, output_type="pt").images
    assert pt.shape == (3, 1, 8, 8) and torch.isfinite(pt).all()
    pil = digits_pipe(["zero", "9"], num_inference_steps=5).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    uncond = digits_pipe(num_images_per_prompt=2, num_inference_steps=5, output_type="pt", return_dict=False)[0]
    assert uncond.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="names no class"):
        digits_pipe("sneaker", num_inference_steps=2)


def test_pipeline_accepts_any_scheduler_and_round_trips(digits_pipe, tmp_path):
    from diffusers import DDIMScheduler

    from diffalign.samplers import DPMSolverPlusPlusScheduler

    def run(pipe):
        return pipe(class_labels=[4, 5], guidance_scale=2.0, num_inference_steps=6, output_type="pt",
                    generator=torch.Generator().manual_seed(1)).images

    pipe = ClassConditionalPipeline(**digits_pipe.components, class_names=digits_pipe.config.class_names,
                                    class_aliases=digits_pipe.config.class_aliases)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(digits_pipe.scheduler.config)
    reference = run(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(str(tmp_path / "pipe"))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, ClassConditionalPipeline)
    assert type(loaded.scheduler).__name__ == "DPMSolverPlusPlusScheduler"
    assert list(loaded.config.class_names) == list(digits_pipe.config.class_names)
    torch.testing.assert_close(run(loaded), reference)
    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    assert torch.isfinite(run(loaded)).all()


def test_pipeline_applies_the_models_shipped_sampler_data(digits_pipe, tmp_path):
    """A diffalign scheduler swapped into a built-in pipeline gets the model's shipped data (here DPM-Solver-v3's
    guided statistics) as `diffalign sample` does, unless its config sets its own or the call turns it off."""
    from diffalign.models.sampler_data import model_sampler_overrides
    from diffalign.samplers import DPMSolverV3Scheduler, make_scheduler

    def run(pipe, **kwargs):
        return pipe(class_labels=[4, 5], guidance_scale=7.5, num_inference_steps=6, output_type="pt",
                    generator=torch.Generator().manual_seed(1), **kwargs).images

    pipe = ClassConditionalPipeline(**digits_pipe.components, class_names=digits_pipe.config.class_names,
                                    model_name="builtin:digits")
    pipe.set_progress_bar_config(disable=True)
    assert digits_pipe.config.model_name == "builtin:digits"
    config = digits_pipe.scheduler.config
    pipe.scheduler = DPMSolverV3Scheduler.from_config(config)
    shipped = run(pipe)
    plain = run(pipe, shipped_sampler_data=False)
    overrides = model_sampler_overrides("builtin:digits", "dpm-solver-v3", 7.5)
    assert overrides["ems_path"].endswith("builtin_digits") and overrides["guidance_scale"] == 7.5
    pipe.scheduler = make_scheduler("dpm-solver-v3", config, **overrides)
    explicit = run(pipe, shipped_sampler_data=False)
    torch.testing.assert_close(shipped, explicit)
    assert (shipped - plain).abs().max() > 1e-3
    assert pipe.sampling_scheduler(7.5) is pipe.scheduler  # everything already set: used as it is
    pipe.save_pretrained(tmp_path / "pipe")
    assert load_pipeline(str(tmp_path / "pipe")).config.model_name == "builtin:digits"


def test_load_model_predict_and_guidance():
    from diffalign.sampling import sample_images

    named = load_model("builtin:digits")
    assert named.dtype == torch.float32 and named.sample_shape == (1, 8, 8)
    assert named.scheduler_config["prediction_type"] == "epsilon"
    assert named.prompt_to_label("seven") == 7 and named.prompt_to_label("7") == 7
    x, t = torch.randn(3, 1, 8, 8), torch.tensor(500)
    labels = torch.tensor([0, 1, 2])
    cond, uncond = named.predict(x, t, labels, 1.0), named.predict(x, t, None, 1.0)
    torch.testing.assert_close(named.predict(x, t, labels, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
    images = sample_images(named, "dpm-solver++", 6, 4, label=3, guidance=2.0, progress=False)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    assert "builtin:digits" in MODELS and "builtin:fashion" in MODELS and "reference:digits" in MODELS


def test_guided_digits_are_classified_as_prompted(digits_pipe):
    # Measured with the shipped weights: see MODEL_CARD.md (guidance 4, 20 DPM-Solver++ steps). Chance is 0.1.
    classifier = load_builtin_classifier("digits")
    labels = torch.arange(50) % 10
    images = digits_pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=20, output_type="pt",
                         generator=torch.Generator().manual_seed(123)).images
    with torch.no_grad():
        acc = (classifier(images * 2 - 1).argmax(1) == labels).float().mean().item()
    assert acc >= 0.7, f"guided accuracy {acc:.2f}"


def test_classifier_fid_separates_real_from_noise():
    from diffalign.models.builtin import fid_metric

    x, _ = load_builtin_data("digits", "train")
    real = fid_metric("digits")
    real.add((x[:300] + 1) / 2)
    noise = fid_metric("digits")
    noise.add(torch.rand(300, 1, 8, 8))
    assert float(real.compute()) * 10 < float(noise.compute())
    rgb = fid_metric("digits")  # colour images are converted to grey, as for every classifier-feature FID
    rgb.add(((x[:300] + 1) / 2).repeat(1, 3, 1, 1))
    assert float(rgb.compute()) == pytest.approx(float(real.compute()), rel=1e-6)


def test_classifier_rewards_take_any_float_dtype():
    from diffalign.rewards import get_reward

    images = (load_builtin_data("digits", "test")[0][:8] + 1) / 2
    prompts = ["zero"] * 8
    for name in ("prompt_following", "classifier_confidence", "realism"):
        reward = get_reward(name, model="builtin:digits")
        expected = reward(images, prompts)[0]
        for dtype in (torch.float64, torch.bfloat16):
            torch.testing.assert_close(reward(images.to(dtype), prompts)[0].float(), expected, rtol=0.05, atol=0.02)


def test_fashion_guided_samples_are_classified_as_prompted():
    # 20 images, two per class, guidance 4, 20 DPM-Solver++ steps; MODEL_CARD.md has the 300-image measurement.
    pipe = load_pipeline("builtin:fashion")
    pipe.set_progress_bar_config(disable=True)
    prompts = list(pipe.config.class_names) * 2
    images = pipe(prompts, guidance_scale=4.0, num_inference_steps=20, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    assert images.shape == (20, 1, 32, 32) and torch.isfinite(images).all()
    classifier = load_builtin_classifier("fashion")
    labels = torch.arange(20) % 10
    with torch.no_grad():
        acc = (classifier(images * 2 - 1).argmax(1) == labels).float().mean().item()
    assert acc >= FASHION_GUIDED_ACCURACY_BOUND, f"guided accuracy {acc:.2f}"
    named = load_model("builtin:fashion")
    assert named.sample_shape == (1, 32, 32) and named.prompt_to_label("sneaker") == 7


@needs_fashion_data
def test_fashion_data_layout():
    x, y = load_builtin_data("fashion", "test")
    assert x.shape == (10000, 1, 32, 32) and y.shape == (10000,)
    assert x[:, :, :2].eq(-1).all() and x.min() >= -1 and x.max() <= 1
    assert torch.bincount(y).tolist() == [1000] * 10


def test_missing_weights_file_gives_the_training_command(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match=r"unet_config\.json.*train_builtin\.py --model digits"):
        load_builtin_unet("digits", directory=tmp_path)
    monkeypatch.setattr(builtin, "WEIGHTS_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="scripts/train_builtin.py --model fashion"):
        load_model("builtin:fashion")


def test_unknown_names_list_the_valid_ones(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="builtin:digits, builtin:fashion"):
        load_model("builtin:cifar10")
    with pytest.raises(ValueError, match="builtin:digits, builtin:fashion"):
        load_pipeline("builtin:cifar10")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="not available offline"):
        load_pipeline("no-such-org/no-such-model")


def test_translate_moves_each_image_and_fills_background():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5)
    dy, dx = torch.tensor([2, 0]), torch.tensor([2, 3])
    out = translate(x, dy, dx, shift=2)
    assert out.shape == x.shape
    torch.testing.assert_close(out[0], x[0])  # offset (shift, shift): no move
    # image 1 moves down 2 rows (offset 0 - shift) and left 1 column (offset 3 - shift)
    torch.testing.assert_close(out[1, 0, 2:, :4], x[1, 0, :2, 1:])
    assert (out[1, 0, :2] == -1).all() and (out[1, 0, :, 4] == -1).all()


def test_training_script_tiny_run(tmp_path):
    spec = importlib.util.spec_from_file_location("train_builtin", ROOT / "scripts" / "train_builtin.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, work = tmp_path / "weights", tmp_path / "work"
    common = ["--model", "digits", "--out", str(out), "--work-dir", str(work), "--subset", "64",
              "--threads", str(torch.get_num_threads())]
    assert script.main([*common, "--what", "classifier", "--classifier-epochs", "1"]) == 0
    assert script.main([*common, "--what", "unet", "--steps", "3", "--batch-size", "8", "--checkpoint-every", "2"]) == 0
    for f in ("unet.safetensors", "unet_config.json", "classifier.safetensors", "training.json"):
        assert (out / f).is_file()
    assert (work / "unet_checkpoint.safetensors").is_file()
    assert json.loads((work / "unet_checkpoint.json").read_text())["step"] == 3
    first = load_builtin_unet("digits", directory=out).state_dict()
    # resuming a finished run changes nothing
    assert script.main([*common, "--what", "unet", "--steps", "3", "--batch-size", "8", "--resume"]) == 0
    for k, v in load_builtin_unet("digits", directory=out).state_dict().items():
        torch.testing.assert_close(v, first[k])
    assert script.main([*common, "--what", "stats"]) == 0
    assert (out / "fid_stats.safetensors").is_file()


def test_cli_sample_builtin(tmp_path):
    from PIL import Image

    from diffalign.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", "--model", "builtin:digits", "--sampler", "dpm-solver++", "--steps", "10", "--guidance", "4",
                 "--prompt", "seven", "--num-images", "4", "--out", str(out), "--quiet"]) == 0
    assert Image.open(out).size[0] > 16

"""Distillation-DPO: the generator loss reaches the student (the released code's does not), its sign, the bounded
loser term, alternating training with checkpoints / resume / several processes, the exported student and bad
input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffalign
from diffalign.align import Policy, config_for, train
from diffalign.align.losses import distill_dpo_generator_loss, dmd_gradient
from diffalign.align.methods import get_method

FAST = {"model": "builtin:digits", "reward": "brightness", "pairs_per_step": 2, "student_steps": 2,
        "regression_pairs": 4, "regression_batch": 2, "regression_steps": 4, "checkpoint_every": 0}


def cfg(**overrides):
    return config_for("distill-dpo", overrides={**FAST, **overrides})


def test_generator_loss_gradient_is_the_dmd_direction_and_the_loser_term_is_bounded():
    x0_w, x0_l = torch.randn(3, 1, 4, 4, requires_grad=True), torch.randn(3, 1, 4, 4, requires_grad=True)
    teacher, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    g_w = dmd_gradient(x0_w, teacher, fake)
    norm = (x0_w - teacher).abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    assert torch.allclose(g_w, (fake - teacher) / norm)
    g_l = 100 * torch.randn(3, 1, 4, 4)  # a runaway loser term
    loss = distill_dpo_generator_loss(x0_w, g_w, x0_l, g_l, loser_weight=0.5, loser_clip=1.0).sum()
    gw, gl = torch.autograd.grad(loss, [x0_w, x0_l])
    assert torch.allclose(gw, g_w / 16)  # descent moves winners by -g_w: toward the teacher's prediction
    assert torch.allclose(gl, -0.5 * g_l.clamp(-1, 1) / 16)  # losers move away, by at most lambda * clip
    # the released form: (eps_T - eps_fake) * (x_t - x0) with x_t = x0 + sigma eps; no gradient reaches x0
    eps, sigma = torch.randn(3, 1, 4, 4), 0.7
    released = ((teacher - fake) * ((x0_w + sigma * eps) - x0_w)).mean()
    assert torch.autograd.grad(released, x0_w, allow_unused=True)[0].abs().max() == 0


@pytest.mark.parametrize("full_finetune", [False, True])
def test_the_generator_update_reaches_the_student_and_the_fake_update_only_the_fakes(full_finetune):
    config = cfg(full_finetune=full_finetune)
    torch.manual_seed(0)
    policy = Policy(diffalign.load_pipeline("builtin:digits"), config.lora, full_finetune)
    algo = get_method("distill-dpo")(config, policy)
    batch = algo.collect(torch.Generator().manual_seed(0))
    student, fakes = policy.trainable_parameters(), algo.phase_parameters("fake")
    assert student and fakes and not {id(p) for p in student} & {id(p) for p in fakes}
    loss, _ = algo.loss(batch, algo.chunks(batch)[0])
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in student if p.grad is not None) > 0
    assert all(p.grad is None for p in fakes)
    for p in student:
        p.grad = None
    loss, _ = algo.loss(batch, algo.chunks(batch)[0], "fake")
    loss.backward()
    assert all(p.grad is None for p in student)
    assert sum(float(p.grad.abs().sum()) for p in fakes if p.grad is not None) > 0


def test_teacher_reference_and_fakes_are_the_right_networks():
    config = cfg()
    policy = Policy(diffalign.load_pipeline("builtin:digits"), config.lora)
    algo = get_method("distill-dpo")(config, policy)
    with torch.no_grad():
        for p in algo.fake_params:  # perturb the fakes: the teacher and the student must not see it
            p.add_(0.1)
        x = torch.randn(2, *policy.latent_shape)
        t, c = torch.tensor([500, 500]), policy.encode(["3", "4"])
        base = diffalign.load_pipeline("builtin:digits").unet(x, t, class_labels=c).sample
        assert torch.allclose(policy.predict(x, t, c, reference=True), base, atol=1e-5)
        assert torch.allclose(policy.predict(x, t, c), base, atol=1e-5)  # the student's LoRA starts at zero
        assert not torch.allclose(algo._fake("fake_w", x, t, c), base, atol=1e-3)


def test_training_checkpoints_resume_and_export(tmp_path):
    full = train("distill-dpo", cfg(max_steps=4, checkpoint_every=2), tmp_path / "full", progress=False)
    rows = full.metrics
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(k in rows[-1] for k in ("loss", "fake_loss", "grad_norm", "fake_grad_norm", "reward_mean"))
    ckpt = tmp_path / "full" / "checkpoints" / "step-000002"
    assert {"method.safetensors", "optimizer.safetensors", "optimizer_fake.safetensors"} <= {
        p.name for p in ckpt.iterdir()}
    # resume from step 2 in another directory: the same student and fakes as the uninterrupted run
    train("distill-dpo", cfg(max_steps=2, checkpoint_every=2), tmp_path / "cut", progress=False)
    train("distill-dpo", cfg(max_steps=4, checkpoint_every=2), tmp_path / "cut", resume="latest", progress=False)
    for name in ("weights.safetensors", "method.safetensors"):
        a = load_file(str(tmp_path / "full" / "checkpoints" / "step-000004" / name))
        b = load_file(str(tmp_path / "cut" / "checkpoints" / "step-000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the student is a pipeline with its own few-step scheduler
    pipe = diffalign.load_pipeline(str(tmp_path / "full"))
    assert pipe.recommended_steps == 2 and pipe.scheduler.config.timestep_spacing == "trailing"
    from diffalign.align.evaluate import evaluate_reward
    from diffalign.cli import main

    r = evaluate_reward(str(tmp_path / "full"), "brightness", num_images=8, sampler="ddim", steps=2)
    assert 0 <= r["mean"] <= 1
    assert main(["sample", "--model", str(tmp_path / "full"), "--num-images", "4", "--out",
                 str(tmp_path / "s.png"), "--json", str(tmp_path / "s.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())[0]["steps"] == 2
    assert main(["eval", "fid", "--model", str(tmp_path / "full"), "--sampler", "ddim", "--steps", "2",
                 "--num-images", "20", "--json", str(tmp_path / "fid.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] > 0


def test_two_processes_finish_with_identical_student_and_fakes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
           str(Path(__file__).with_name("_ddp_train.py")), str(tmp_path / "ddp"), "distill-dpo"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0, w1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    assert any(k.startswith("fake_w.") for k in w0)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_tiny_stable_diffusion_student_trains_and_reloads(tmp_path, kind):
    from diffalign.models.tiny_sd import tiny_sdxl_pipeline, tiny_stable_diffusion_pipeline

    build = {"sd": lambda: tiny_stable_diffusion_pipeline(seed=0, sample_size=8), "sdxl": tiny_sdxl_pipeline}[kind]
    build().save_pretrained(tmp_path / "sd")
    config = cfg(model=str(tmp_path / "sd"), prompts=["a photo of a cat", "a red dog"], max_steps=2,
                 teacher_guidance=3.0)
    result = train("distill-dpo", config, tmp_path / "run", progress=False)
    assert result.policy.kind == kind and len(result.metrics) == 2
    pipe = diffalign.load_pipeline(str(tmp_path / "run"))
    images = pipe(prompt="a red dog", num_inference_steps=pipe.recommended_steps, guidance_scale=1.0,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(torch.as_tensor(images)).all()


@pytest.mark.parametrize("overrides, error, match", [
    ({"student_steps": 0}, ValueError, "student_steps must be between 1 and 8"),
    ({"student_steps": 9}, ValueError, "student_steps must be between 1 and 8"),
    ({"reward": None}, ValueError, "ranks its pairs with a reward"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        train("distill-dpo", cfg(**overrides), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_teacher_the_student_cannot_use_is_refused():
    pipe = diffalign.load_pipeline("builtin:digits")
    pipe.scheduler.register_to_config(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="need epsilon, v_prediction or sample"):
        get_method("distill-dpo")(cfg(), Policy(pipe, cfg().lora))


def test_a_reward_returning_nan_is_an_error_and_leaves_nothing(tmp_path):
    from diffalign.rewards import register_reward

    register_reward("nan_for_distill_test")(
        lambda: lambda images, prompts, meta: (torch.full((len(images),), float("nan")), {}))
    with pytest.raises(FloatingPointError, match="returned NaN"):
        train("distill-dpo", cfg(reward="nan_for_distill_test", max_steps=2), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()

"""The alignment engine and D3PO: loss maths, log-probabilities, the reference, training, resume, several
processes, the Stable Diffusion path, human labels and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffalign
from diffalign.align import Policy, config_for, train
from diffalign.align.config import LoraSettings
from diffalign.align.losses import d3po_loss, gaussian_kl, gaussian_log_prob, implicit_accuracy
from diffalign.align.trainer import read_metrics
from diffalign.align.trajectory import (
    ddim_scheduler,
    sample_trajectories,
    step_kl,
    step_log_probs,
    step_transitions,
)

FAST = {"model": "builtin:digits", "reward": "brightness", "guidance": 1.0, "num_steps": 6, "pairs_per_step": 2,
        "checkpoint_every": 0}


def cfg(**overrides):
    return config_for("d3po", overrides={**FAST, **overrides})


# ---------------------------------------------------------------------- loss maths
def paper_d3po_loss(lr0, lr1, h0, beta, eps):
    """The reference code's formula, literally: ratios exp(log-ratio) clamped to [1 - eps, 1 + eps]."""
    r0 = torch.clamp(torch.exp(lr0), 1 - eps, 1 + eps)
    r1 = torch.clamp(torch.exp(lr1), 1 - eps, 1 + eps)
    return -torch.nn.functional.logsigmoid(beta * torch.log(r0) * h0 + beta * torch.log(r1) * (-h0))


def test_d3po_loss_matches_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    lr0, lr1 = torch.randn(50, generator=g) * 0.1, torch.randn(50, generator=g) * 0.1
    h = torch.randint(-1, 2, (50,), generator=g)
    for beta, clip in ((0.1, 0.1), (2.0, 0.2)):
        expected = paper_d3po_loss(lr0, lr1, h.float(), beta, clip)
        assert torch.allclose(d3po_loss(lr0, lr1, h, beta, clip), expected, atol=1e-7)


def test_d3po_loss_has_no_gradient_outside_the_clamp():
    lr0 = torch.tensor([0.5, -0.5, 0.01], requires_grad=True)
    lr1 = torch.tensor([-0.5, 0.5, -0.02], requires_grad=True)
    d3po_loss(lr0, lr1, torch.ones(3), beta=0.1, clip=0.1).sum().backward()
    assert lr0.grad[:2].abs().max() == 0 and lr1.grad[:2].abs().max() == 0
    assert lr0.grad[2] < 0 < lr1.grad[2]  # inside: raise the winner's ratio, lower the loser's


def test_preferring_the_winner_lowers_the_loss_and_ties_carry_no_gradient():
    base = d3po_loss(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1), 0.1, 0.1)
    assert torch.isclose(base, torch.tensor(math.log(2.0)))
    assert d3po_loss(torch.tensor(0.05), torch.tensor(0.0), torch.tensor(1), 0.1, 0.1) < base
    assert d3po_loss(torch.tensor(0.05), torch.tensor(0.0), torch.tensor(-1), 0.1, 0.1) > base
    lr = torch.tensor(0.05, requires_grad=True)
    tie = d3po_loss(lr, torch.tensor(0.0), torch.tensor(0), 0.1, 0.1)
    tie.backward()
    assert torch.isclose(tie, torch.tensor(math.log(2.0))) and lr.grad == 0
    acc = implicit_accuracy(torch.tensor([0.1, 0.1, 0.0]), torch.tensor([0.0, 0.2, 0.0]), torch.tensor([1, 1, 0]))
    assert acc == 0.5


# ---------------------------------------------------------------------- log-probabilities and the reference
@pytest.fixture(scope="module")
def digits_pipe():
    return diffalign.load_pipeline("builtin:digits")


def test_stored_log_prob_equals_an_independent_gaussian_density(digits_pipe):
    """Each stored log-probability is the Normal log-density (mean over pixels) of the stored step, with the mean
    and variance of DDIM's Eq. 12/16 recomputed here from alphas_cumprod (the DDPM-notation formulas)."""
    policy = Policy(digits_pipe)
    sched = ddim_scheduler(policy, 5, eta=1.0)
    labels = policy.encode(["3", "seven"])
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    traj = sample_trajectories(policy, sched, labels, x_T, guidance=3.0, generator=torch.Generator().manual_seed(2))
    abar = sched.alphas_cumprod.double()
    ts = [int(t) for t in sched.timesteps]
    for i, t in enumerate(ts):
        x = traj.latents[:, i].double()
        with torch.no_grad():
            c = digits_pipe.unet(x.float(), t, class_labels=labels).sample.double()
            u = digits_pipe.unet(x.float(), t, class_labels=torch.full((2,), 10)).sample.double()
        eps = u + 3.0 * (c - u)
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - var).clamp_min(0).sqrt() * eps
        if var == 0:  # the last step lands on sigma = 0: deterministic, stored log-prob 0
            assert traj.log_probs[:, i].abs().max() == 0
            assert torch.allclose(traj.latents[:, i + 1].double(), mean, atol=1e-4)
            continue
        expected = torch.distributions.Normal(mean, var.sqrt()).log_prob(traj.latents[:, i + 1].double())
        assert torch.allclose(traj.log_probs[:, i].double(), expected.mean((1, 2, 3)), atol=1e-3), i


def test_gaussian_log_prob_is_the_normal_density():
    x, mean = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    expected = torch.distributions.Normal(mean, 0.3).log_prob(x).mean((1, 2, 3))
    assert torch.allclose(gaussian_log_prob(x, mean, 0.3), expected, atol=1e-6)


def test_policy_and_reference_log_probs_agree_at_lora_init_and_differ_after_a_change(digits_pipe):
    import copy

    policy = Policy(copy.deepcopy(digits_pipe), lora=LoraSettings(rank=4))
    sched = ddim_scheduler(policy, 5, eta=1.0)
    labels = policy.encode(["1", "2"])
    traj = sample_trajectories(policy, sched, labels, torch.randn(2, 1, 8, 8), guidance=2.0,
                               generator=torch.Generator().manual_seed(0))
    steps = [0, 1, 2, 3]
    lp = step_log_probs(policy, sched, traj.latents, steps, labels, 2.0)
    ref = step_log_probs(policy, sched, traj.latents, steps, labels, 2.0, reference=True)
    assert torch.equal(lp, ref)
    assert torch.allclose(lp, traj.log_probs[:, steps], atol=1e-5)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lp2 = step_log_probs(policy, sched, traj.latents, steps, labels, 2.0)
    ref2 = step_log_probs(policy, sched, traj.latents, steps, labels, 2.0, reference=True)
    assert torch.equal(ref2, ref) and not torch.allclose(lp2, ref2)
    assert lp2.requires_grad and not ref2.requires_grad


def test_gaussian_kl_is_the_normal_kl_and_zero_only_at_equal_means():
    mp, mq = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mp, 0.3),
                                                 torch.distributions.Normal(mq, 0.3)).mean((1, 2, 3))
    assert torch.allclose(gaussian_kl(mp, mq, 0.3), expected, atol=1e-6)
    assert torch.equal(gaussian_kl(mq, mq, 0.3), torch.zeros(3))


def test_step_kl_is_zero_at_lora_init_and_its_gradient_pulls_the_policy_back(digits_pipe):
    import copy

    policy = Policy(copy.deepcopy(digits_pipe), lora=LoraSettings(rank=4))
    sched = ddim_scheduler(policy, 5, eta=1.0)
    labels = policy.encode(["3", "4"])
    traj = sample_trajectories(policy, sched, labels, torch.randn(2, 1, 8, 8), 1.0, torch.Generator().manual_seed(0))
    steps = [0, 1, 2, 3]

    def kl():
        mean_p, stds = step_transitions(policy, sched, traj.latents, steps, labels)
        mean_ref, _ = step_transitions(policy, sched, traj.latents, steps, labels, reference=True)
        return step_kl(mean_p, mean_ref, stds)

    assert torch.equal(kl(), torch.zeros(2, 4))
    lora = [p for name, p in policy.unet.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.05)
    before = kl()
    assert (before > 0).all() and before.requires_grad
    before.mean().backward()
    with torch.no_grad():  # one small step down the KL's gradient brings the policy's transitions closer
        for p in lora:
            p -= 1e-2 * p.grad / max(float(p.grad.norm()), 1e-12)
    assert kl().mean() < before.mean()


def test_kl_coef_adds_the_logged_kl_to_the_d3po_loss_and_keeps_training_closer_to_the_reference(tmp_path):
    from diffalign.align.methods.d3po import D3PO

    plain = train("d3po", cfg(max_steps=8, lr=1e-3, pairs_per_step=4, seed=0), tmp_path / "a", progress=False)
    kept = train("d3po", cfg(max_steps=8, lr=1e-3, pairs_per_step=4, seed=0, kl_coef=50.0), tmp_path / "b",
                 progress=False)
    assert plain.metrics[0]["kl"] == 0.0 == kept.metrics[0]["kl"]  # the first step is taken at LoRA init
    kl_plain = sum(r["kl"] for r in plain.metrics[-3:])
    kl_kept = sum(r["kl"] for r in kept.metrics[-3:])
    assert 0 < kl_kept < 0.5 * kl_plain
    method = D3PO(cfg(pairs_per_step=2, seed=1), plain.policy)
    batch = method.collect(torch.Generator().manual_seed(3))
    loss0, stats = method.loss(batch, batch["steps"])
    method.cfg.kl_coef = 2.0
    loss2, _ = method.loss(batch, batch["steps"])
    assert stats["kl"] > 0 and math.isclose(float((loss2 - loss0).detach()), 2.0 * stats["kl"], rel_tol=1e-4)
    with pytest.raises(ValueError, match="kl_coef"):
        D3PO(cfg(kl_coef=-1.0), plain.policy)
    # evaluated afterwards on fresh trajectories, the drift keeps its order
    from diffalign.align import evaluate_kl

    drift = [evaluate_kl(str(tmp_path / run), num_images=8, num_steps=6) for run in ("a", "b")]
    assert 0 < drift[1] < 0.5 * drift[0]
    with pytest.raises(ValueError, match="not a training output"):
        evaluate_kl("builtin:digits")


# ---------------------------------------------------------------------- training
def test_d3po_steps_raise_implicit_accuracy_and_the_reward(tmp_path, digits_pipe):
    """20 D3PO steps on builtin:digits toward brightness: on 256 held-out pairs of the base model the trained
    policy ranks the brighter image higher (implicit accuracy of the summed step log-ratios > 0.6; it is 0, all
    ties, at initialisation; 0.68-0.70 measured), and the mean brightness of samples from fixed noise rises."""
    from diffalign.align.methods.d3po import sample_pairs
    from diffalign.align.rewarding import score
    from diffalign.rewards import get_reward, pareto_compare

    n = 256
    reward = get_reward("brightness")
    base = Policy(digits_pipe)
    sched = ddim_scheduler(base, 6, 1.0)
    prompts = [str(i % 10) for i in range(n)]
    pairs = sample_pairs(base, sched, prompts, 1.0, torch.Generator().manual_seed(123))
    r = score(reward, pairs["images"], prompts * 2)
    h = pareto_compare(r[:n], r[n:])
    latents = torch.cat([pairs["latents"][:, 0], pairs["latents"][:, 1]])
    cond = torch.cat([pairs["cond"], pairs["cond"]])

    def accuracy(policy):
        with torch.no_grad():
            ratio = (step_log_probs(policy, sched, latents, range(5), cond)
                     - step_log_probs(policy, sched, latents, range(5), cond, reference=True))
        return float(implicit_accuracy(ratio[:n].sum(1), ratio[n:].sum(1), h))

    def brightness(policy):
        x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(7))
        traj = sample_trajectories(policy, sched, policy.encode(prompts[:64]), x_T, 1.0,
                                   torch.Generator().manual_seed(8))
        return float(reward(policy.decode(traj.final), prompts[:64])[0].mean())

    result = train("d3po", cfg(max_steps=20, lr=3e-4, pairs_per_step=4, seed=0), tmp_path / "run", progress=False)
    trained = result.policy
    with trained.as_reference():
        assert accuracy(trained) == 0.0  # the reference against itself: every ratio is 1
        before = brightness(trained)
    assert accuracy(trained) > 0.6
    assert brightness(trained) > before + 0.01
    rows = result.metrics
    assert [r["step"] for r in rows] == list(range(1, 21)) and rows[0]["implicit_acc"] == 0.0
    assert all(k in rows[0] for k in ("wall_s", "images_seen", "loss", "reward_mean", "implicit_acc"))


def test_vector_reward_bf16_tensorboard_and_accumulation(tmp_path):
    """A Pareto-compared vector reward, bf16 autocast, tensorboard logging and gradient accumulation together."""
    out = tmp_path / "run"
    result = train("d3po", cfg(reward="brightness,contrast", max_steps=2, mixed_precision="bf16", tensorboard=True,
                               gradient_accumulation_steps=2), out, progress=False)
    rows = result.metrics
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and 0 <= r["ties"] <= 1 for r in rows)
    assert rows[-1]["images_seen"] == 2 * 2 * 2 * 2
    assert list(out.rglob("events.out.tfevents.*"))
    (out / "notes.txt").write_text("mine")
    train("d3po", cfg(max_steps=1), out, overwrite=True, progress=False)  # replaces the run, logs and all
    assert not list(out.rglob("events.out.tfevents.*")) and (out / "notes.txt").read_text() == "mine"


def test_steps_back_propagated_in_groups_give_the_same_gradient(digits_pipe):
    import copy

    from diffalign.align.methods.d3po import D3PO
    from diffalign.align.trainer import _accelerator, _backward

    policy = Policy(copy.deepcopy(digits_pipe), lora=LoraSettings(rank=4))
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # away from the initialisation, where every ratio is 1
    accelerator = _accelerator(cpu=True)
    grads = []
    for k in (0, 2):
        method = D3PO(cfg(steps_per_backward=k, pairs_per_step=3), policy)
        batch = method.collect(torch.Generator().manual_seed(0))
        assert len(method.chunks(batch)) == (1 if k == 0 else 3)
        policy.unet.zero_grad()
        stats = _backward(accelerator, policy.unet, method, [batch])
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).norm() < 1e-4 * grads[0].norm()  # float32 sums
    assert math.isfinite(stats["loss"])


def test_output_directory_loads_as_a_pipeline_and_samples_from_the_cli(tmp_path):
    from diffalign.cli import main

    out = tmp_path / "run"
    train("d3po", cfg(max_steps=2, lr=1e-2), out, progress=False)
    assert {"config.yaml", "metrics.jsonl", "reward_curve.png", "alignment.json",
            "pytorch_lora_weights.safetensors"} <= {p.name for p in out.iterdir()}
    aligned, base = diffalign.load_pipeline(str(out)), diffalign.load_pipeline("builtin:digits")
    kwargs = {"prompt": ["3"], "num_inference_steps": 5, "output_type": "pt"}
    a = aligned(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = base(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.allclose(a, b)
    assert main(["sample", "--model", str(out), "--steps", "4", "--num-images", "2", "--prompt", "3",
                 "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "diffalign.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kwargs)


TRAIN_ARGS = ["train", "d3po", "--model", "builtin:digits", "--reward", "brightness", "--guidance", "1", "--lr",
              "1e-3", "--set", "num_steps=6", "--set", "pairs_per_step=2", "--set", "checkpoint_every=2",
              "--set", "keep_checkpoints=10", "--quiet"]


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    full = _cli(*TRAIN_ARGS, "--max-steps", "16", "--out", str(tmp_path / "full"))
    killed = _cli(*TRAIN_ARGS, "--max-steps", "16", "--out", str(tmp_path / "cut"))
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "checkpoints" / "step-000004").exists() and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert full.wait() == 0, full.stdout.read().decode()
    resumed = _cli(*TRAIN_ARGS, "--max-steps", "16", "--out", str(tmp_path / "cut"), "--resume")
    assert resumed.wait() == 0, resumed.stdout.read().decode()
    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))
    assert not list((tmp_path / "cut" / "checkpoints").glob(".tmp-*"))


def test_two_processes_finish_with_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu flag starts one process; --multi_gpu starts torchrun, which runs gloo CPU processes here
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(Path(__file__).with_name("_ddp_train.py")), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0, w1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["images_seen"] == 3 * 2 * 2 * 2
    assert any(abs(v).max() > 0 for k, v in w0.items() if "lora_B" in k)


# ---------------------------------------------------------------------- Stable Diffusion
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_tiny_stable_diffusion_trains_and_its_lora_loads_in_diffusers(tmp_path, kind):
    from diffusers import DiffusionPipeline

    from diffalign.models.tiny_sd import tiny_sdxl_pipeline, tiny_stable_diffusion_pipeline

    build = {"sd": lambda: tiny_stable_diffusion_pipeline(seed=0, sample_size=8), "sdxl": tiny_sdxl_pipeline}[kind]
    build().save_pretrained(tmp_path / "sd")
    config = config_for("d3po", overrides={"model": str(tmp_path / "sd"), "reward": "brightness",
                                           "prompts": ["a photo of a cat", "a red dog"], "num_steps": 4,
                                           "pairs_per_step": 2, "max_steps": 2, "lr": 1e-2, "guidance": 5.0,
                                           "checkpoint_every": 0})
    result = train("d3po", config, tmp_path / "run", progress=False)
    assert result.policy.kind == kind and len(result.metrics) == 2

    def sample(pipe):
        return pipe(prompt="a photo of a cat", num_inference_steps=3, guidance_scale=5.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "sd")  # StableDiffusion(XL)Pipeline
    before = sample(pipe)
    pipe.load_lora_weights(tmp_path / "run")
    after = sample(pipe)
    assert not torch.allclose(before, after, atol=1e-6)
    ours = diffalign.load_pipeline(str(tmp_path / "run"))
    ours.scheduler = pipe.scheduler
    assert type(ours) is type(pipe) and torch.allclose(sample(ours), after, atol=1e-4)


def test_sdxl_policy_predicts_what_the_pipeline_does():
    from diffalign.models.tiny_sd import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    policy = Policy(pipe, LoraSettings(rank=2))
    prompts = ["a red dog", "a photo of a cat"]
    cond = policy.encode(prompts)
    assert cond.shape == (2, pipe.tokenizer.model_max_length + 1, pipe.unet.config.cross_attention_dim)
    torch.testing.assert_close(policy.null_condition(2), torch.zeros_like(cond))  # force_zeros_for_empty_prompt
    x, t = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor(600)
    with torch.no_grad():
        ours = policy.predict(x, t, cond, guidance=4.0)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompt=prompts, device="cpu")
        size = policy.image_shape[1:]
        ids = pipe._get_add_time_ids(size, (0, 0), size, torch.float32, 32).repeat(4, 1)
        with policy.as_reference() as net:  # the adapter is zero at initialisation; check the plain UNet
            out = net(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, embeds]),
                      added_cond_kwargs={"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": ids})
    uncond, c = out.sample.chunk(2)
    torch.testing.assert_close(ours, uncond + 4.0 * (c - uncond), rtol=1e-4, atol=1e-5)


def test_an_sdxl_float16_vae_decodes_in_float32_as_the_pipeline_does():
    from diffalign.models.tiny_sd import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    full = Policy(pipe).decode(z := torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    pipe.vae.to(torch.float16)
    half_weights = Policy(pipe)
    upcast = half_weights.decode(z)
    assert pipe.vae.dtype == torch.float16  # back as it was
    pipe.vae.to(torch.float32)
    torch.testing.assert_close(upcast, half_weights.decode(z))  # float32 on the float16-rounded weights
    assert (upcast - full).abs().max() < 0.05 and half_weights.encode_images(upcast).dtype == torch.float32


@pytest.mark.parametrize("latent_stats", [False, True])
def test_sdxl_decoding_is_the_pipelines_own_even_under_autocast(latent_stats):
    from diffalign.models.tiny_sd import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    if latent_stats:  # per-channel latent statistics in the VAE config, as some SDXL variants have
        pipe.vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 1.5, 1.0, 2.0])
    call = {"prompt": "a red dog", "num_inference_steps": 2, "guidance_scale": 1.0}
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    images = pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    policy = Policy(pipe)
    torch.testing.assert_close(policy.decode(latents), images, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a mixed-precision training step: the VAE stays float32
        torch.testing.assert_close(policy.decode(latents), images, rtol=1e-5, atol=1e-5)
    # encoding inverts the decoding's latent scaling (the random VAE itself is no autoencoder)
    with torch.no_grad():
        raw = pipe.vae.encode(images * 2 - 1).latent_dist.mean
    cfg = pipe.vae.config
    mean, std = ((torch.tensor(cfg.latents_mean).reshape(1, 4, 1, 1), torch.tensor(cfg.latents_std).reshape(1, 4, 1, 1))
                 if latent_stats else (0.0, 1.0))
    torch.testing.assert_close(policy.encode_images(images), (raw - mean) * cfg.scaling_factor / std)


def test_pipelines_alignment_cannot_train_are_refused_by_name():
    from diffalign.models.tiny_sd import tiny_sd3_pipeline, tiny_sdxl_pipeline

    with pytest.raises(TypeError, match="StableDiffusion3Pipeline is not supported: it has a transformer"):
        Policy(tiny_sd3_pipeline())
    refiner = tiny_sdxl_pipeline()
    refiner.text_encoder = None  # an SDXL refiner has only the second text encoder
    with pytest.raises(TypeError, match="no text encoder `text_encoder` \\(an SDXL refiner\\?\\)"):
        Policy(refiner)


# ---------------------------------------------------------------------- human labels
def test_exported_pairs_train_from_a_labels_file(tmp_path):
    from diffalign.cli import main

    pairs = tmp_path / "pairs"
    assert main(["align", "export-pairs", "--model", "builtin:digits", "--out", str(pairs), "--num-pairs", "4",
                 "--steps", "5", "--quiet"]) == 0
    meta = json.loads((pairs / "pairs.json").read_text())
    assert len(meta["pairs"]) == 4 and all((pairs / f).is_file() for p in meta["pairs"] for f in p["images"])
    (pairs / "labels.jsonl").write_text('{"pair": 0, "preferred": 1}\n{"pair": 2, "preferred": 0}\n'
                                        '{"pair": 3, "preferred": null}\n')
    out = tmp_path / "run"
    assert main(["train", "d3po", "--model", "builtin:digits", "--data", str(pairs), "--out", str(out),
                 "--max-steps", "2", "--lr", "1e-2", "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "reward_mean" not in rows[0]
    saved = config_for("d3po", out / "config.yaml")  # what the run used: the export's sampling, no reward
    assert (saved.num_steps, saved.eta, saved.guidance, saved.reward) == (
        meta["num_steps"], meta["eta"], meta["guidance"], None)
    for flag in ("--reward", "--guidance"):
        assert main(["train", "d3po", "--data", str(pairs), flag, "1", "--out", str(tmp_path / "y")]) == 2
    assert main(["train", "distill-dpo", "--guidance", "3", "--out", str(tmp_path / "y")]) == 2
    assert main(["train", "ddpo", "--data", str(pairs), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()

    (pairs / "labels.jsonl").write_text('{"pair": 0, "preferred": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"labels.jsonl:2"):
        train("d3po", cfg(pairs=str(pairs), labels=str(pairs / "labels.jsonl"), reward=None), tmp_path / "x")
    (pairs / "labels.jsonl").write_text('{"pair": 7, "preferred": 1}\n')
    with pytest.raises(ValueError, match="pair 7 is not one of the 4"):
        train("d3po", cfg(pairs=str(pairs), labels=str(pairs / "labels.jsonl"), reward=None), tmp_path / "x")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# ---------------------------------------------------------------------- bad input
def test_config_from_yaml_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.001\nlora:\n  rank: 8\nprompts: [sneaker, bag]\n")
    c = config_for("d3po", tmp_path / "c.yaml", ["lora.alpha=16", "beta=0.2"])
    assert (c.lr, c.lora.rank, c.lora.alpha, c.beta, c.prompts) == (1e-3, 8, 16, 0.2, ["sneaker", "bag"])
    with pytest.raises(ValueError, match="unknown config key 'lora.rnak'"):
        config_for("d3po", overrides=["lora.rnak=8"])
    with pytest.raises(ValueError, match="must be a number"):
        config_for("d3po", overrides=["lr=fast"])
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        config_for("ppo")


def test_config_values_of_the_wrong_kind_are_refused_naming_the_key(tmp_path):
    for override, match in (({"lora": 5}, "lora is a group of settings"), ({"prompts": "sneaker"}, "must be a list"),
                            ({"model": 3}, "model must be a string"), ({"reward_kwargs": 2}, "must be a mapping")):
        with pytest.raises(ValueError, match=match):
            config_for("d3po", overrides=override)
    assert config_for("diffusion-dpo", overrides={"data": tmp_path}).data == str(tmp_path)  # paths become strings
    (tmp_path / "bad.yaml").write_text("lr: [0.1\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        config_for("d3po", tmp_path / "bad.yaml")
    for override, match in (({"max_steps": 2.5}, "max_steps must be a whole number"),
                            ({"max_minutes": "30"}, "max_minutes must be a number"),
                            ({"lora": {"alpha": "big"}}, "alpha must be a number")):
        with pytest.raises(ValueError, match=match):
            config_for("d3po", overrides=override)
    assert config_for("d3po", overrides={"max_steps": 4.0}).max_steps == 4
    for override, match in (({"log_every": 0}, "log_every must be >= 1"), ({"device": "cuda:1"}, "CUDA_VISIBLE"),
                            ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1"),
                            ({"max_grad_norm": 0}, "max_grad_norm must be > 0"),
                            ({"mixed_precision": "fp32"}, "mixed_precision='fp32'")):
        with pytest.raises(ValueError, match=match):
            train("d3po", cfg(**override), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="DDPO needs a scalar reward.*name one"):
        train("ddpo", config_for("ddpo", overrides={"model": "builtin:digits", "reward": "brightness,contrast"}),
              tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_log_every_thins_metrics_but_keeps_checkpoint_steps(tmp_path):
    train("d3po", cfg(max_steps=7, log_every=3, checkpoint_every=2, keep_checkpoints=10), tmp_path / "run",
          progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6, 7]


def test_resuming_an_earlier_checkpoint_removes_the_later_ones(tmp_path):
    out = tmp_path / "run"
    train("d3po", cfg(max_steps=6, checkpoint_every=2, keep_checkpoints=10), out, progress=False)
    with pytest.warns(UserWarning, match="removing the later checkpoint"):
        train("d3po", cfg(max_steps=3, checkpoint_every=2, keep_checkpoints=10), out,
              resume=str(out / "checkpoints" / "step-000002"), progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_runs_config_yaml_is_a_config_file_and_show_config_prints_it(tmp_path, capsys):
    from diffalign.cli import main

    out = tmp_path / "run"
    train("d3po", cfg(max_steps=1, lr=1e-2, **{"lora.rank": 2}), out, progress=False)
    again = config_for("d3po", out / "config.yaml")  # the run's own file reproduces its config
    assert again == cfg(max_steps=1, lr=1e-2, **{"lora.rank": 2})
    with pytest.raises(ValueError, match="is a d3po config, not a rankdpo one"):
        config_for("rankdpo", out / "config.yaml")
    assert main(["train", "d3po", "--config", str(out / "config.yaml"), "--set", "beta=0.3", "--show-config"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("method: d3po\n") and "beta: 0.3\n" in shown and "  rank: 2\n" in shown
    (tmp_path / "shown.yaml").write_text(shown)
    assert config_for("d3po", tmp_path / "shown.yaml").beta == 0.3
    assert main(["train", "d3po", "--reward", "brightness"]) == 2  # --out is required for training
    assert "needs --out" in capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "error", "match"), [
    ({"reward": "no_such_reward"}, ValueError, "unknown reward 'no_such_reward'"),
    ({"model": "builtin:nothing"}, ValueError, "unknown built-in model"),
    ({"prompts": []}, ValueError, "prompt list is empty"),
    ({"prompts": ["giraffe"]}, ValueError, "giraffe"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        train("d3po", cfg(**overrides), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_reward_returning_nan_or_the_wrong_shape_is_an_error_and_leaves_nothing(tmp_path):
    from diffalign.rewards import register_reward

    register_reward("test_nan")(lambda: lambda images, prompts, meta: (torch.full((len(images),), float("nan")), {}))
    register_reward("test_shape")(lambda: lambda images, prompts, meta: (torch.zeros(len(images) + 1), {}))
    with pytest.raises(FloatingPointError, match="test_nan.*NaN"):
        train("d3po", cfg(reward="test_nan", max_steps=2), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="test_shape.*shape"):
        train("d3po", cfg(reward="test_shape", max_steps=2), tmp_path / "b", progress=False)
    for d in ("a", "b"):
        assert not (tmp_path / d).exists() or not any((tmp_path / d).iterdir())


def test_output_directory_of_another_run_and_incompatible_resume_are_refused(tmp_path):
    out = tmp_path / "run"
    train("d3po", cfg(max_steps=2, checkpoint_every=1), out, progress=False)
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train("d3po", cfg(max_steps=2), out, progress=False)
    with pytest.raises(ValueError, match="lora.*does not fit|does not fit.*lora"):
        train("d3po", cfg(max_steps=3, **{"lora.rank": 8}), out, resume="latest", progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        train("d3po", cfg(max_steps=3, model="builtin:fashion"), out, resume="latest", progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train("d3po", cfg(max_steps=3), tmp_path / "empty", resume="latest", progress=False)
    with warnings.catch_warnings(record=True) as caught:  # more steps, other checkpointing: no warning
        warnings.simplefilter("always")
        assert len(train("d3po", cfg(max_steps=3, checkpoint_every=2), out, resume="latest",
                         progress=False).metrics) == 3
    assert not [w for w in caught if "config.yaml" in str(w.message)]
    with pytest.warns(UserWarning, match=r"other than the run's config.yaml: lr was 3e-05, now 0.001; beta was 0.1, "
                                         r"now 0.5\. The resumed run uses these .*--config .*config.yaml"):
        train("d3po", cfg(max_steps=4, lr=1e-3, beta=0.5), out, resume="latest", progress=False)
    assert config_for("d3po", out / "config.yaml").lr == 1e-3  # config.yaml records what the run went on with
    assert [r["lr"] for r in read_metrics(out / "metrics.jsonl")] == [3e-5, 3e-5, 3e-5, 1e-3]  # ... and uses it
    state = load_file(str(out / "checkpoints" / "step-000004" / "optimizer.safetensors"))
    assert state  # the moments carried over; the settings are the new ones
    group = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())["optimizer"][
        "param_groups"][0]
    assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (1e-3, 1e-3, 1e-4)
    assert len(train("d3po", cfg(max_steps=1), out, overwrite=True, progress=False).metrics) == 1


def test_resumed_optimizer_settings_are_the_configs_and_the_warmup_goes_on(tmp_path):
    out = tmp_path / "run"
    train("d3po", cfg(max_steps=2, checkpoint_every=1, lr=1e-2, lr_warmup_steps=4), out, progress=False)
    with pytest.warns(UserWarning, match="weight_decay was 0.0001, now 0.5"):
        train("d3po", cfg(max_steps=3, lr=2e-2, lr_warmup_steps=4, weight_decay=0.5, adam_beta1=0.5), out,
              resume="latest", progress=False)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 / 4, 2e-2 / 4, 3 * 2e-2 / 4])  # step 3 of the warm-up
    group = json.loads((out / "checkpoints" / "step-000003" / "trainer_state.json").read_text())["optimizer"][
        "param_groups"][0]
    assert (group["weight_decay"], group["betas"]) == (0.5, [0.5, 0.999])


def test_a_checkpoint_of_another_run_is_not_resumed_into_a_directory_holding_a_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train("d3po", cfg(max_steps=2, checkpoint_every=1, seed=1), a, progress=False)
    train("d3po", cfg(max_steps=3, checkpoint_every=1, seed=2), b, progress=False)
    before = sorted(p.name for p in (b / "checkpoints").iterdir()), (b / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="holds another training run"):
        train("d3po", cfg(max_steps=4, seed=1), b, resume=str(a / "checkpoints" / "step-000002"), progress=False)
    assert (sorted(p.name for p in (b / "checkpoints").iterdir()), (b / "metrics.jsonl").read_text()) == before
    # into a new directory it is a branch of run a
    fork = train("d3po", cfg(max_steps=3, seed=1), tmp_path / "fork", resume=str(a / "checkpoints" / "step-000002"),
                 progress=False)
    assert [r["step"] for r in fork.metrics] == [3]


def test_accumulation_and_precision_are_the_configs_not_accelerates_environment(tmp_path, monkeypatch):
    from diffalign.align import trainer

    made = []
    real = trainer._accelerator
    monkeypatch.setattr(trainer, "_accelerator", lambda **kw: made.append(real(**kw)) or made[-1])
    plain = train("d3po", cfg(max_steps=1), tmp_path / "a", progress=False).metrics[0]
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # accelerate would divide each loss by 4
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    env = train("d3po", cfg(max_steps=1, mixed_precision="no"), tmp_path / "b", progress=False).metrics[0]
    assert env["grad_norm"] == plain["grad_norm"] and made[-1].mixed_precision == "no"
    train("d3po", cfg(max_steps=1), tmp_path / "c", progress=False)  # mixed_precision null: accelerate's setting
    assert made[-1].mixed_precision == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    train("d3po", cfg(max_steps=1), tmp_path / "d", progress=False)  # not the earlier run's setting
    assert made[-1].mixed_precision == "no"


def test_the_returned_policy_predicts_what_the_saved_weights_do(tmp_path):
    out = tmp_path / "run"
    result = train("d3po", cfg(max_steps=2, lr=1e-2, mixed_precision="bf16"), out, progress=False)
    saved = Policy(diffalign.load_pipeline(str(out)))
    x = torch.randn(2, *saved.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = saved.encode(["3", "7"])
    with torch.no_grad():  # float32 both, with no bf16 forward left behind by accelerate
        torch.testing.assert_close(result.policy.predict(x, torch.tensor(500), cond),
                                   saved.predict(x, torch.tensor(500), cond), rtol=1e-4, atol=1e-5)
    assert result.policy.forward_unet is result.policy.unet


def test_rewards_score_at_their_own_precision_inside_a_mixed_precision_step():
    from diffalign.align.rewarding import score

    w = torch.linspace(-1, 1, 3 * 8 * 8)

    def linear(images, prompts, meta=None):  # a matmul, which bf16 autocast would run in bf16
        return images.flatten(1) @ w, {}

    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = score(linear, images, ["a"] * 4)
    assert inside.dtype == torch.float32 and torch.equal(inside, score(linear, images, ["a"] * 4))


def test_the_fp16_loss_scale_is_checkpointed_and_a_skipped_update_holds_the_schedule(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from accelerate.optimizer import AcceleratedOptimizer

    from diffalign.align.trainer import load_checkpoint, run_signature, save_checkpoint

    def accelerator(scale: float) -> SimpleNamespace:  # one process, with a GradScaler as accelerate's fp16 has
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=3)
        return SimpleNamespace(is_main_process=True, process_index=0, wait_for_everyone=lambda: None, scaler=scaler)

    c = cfg(max_steps=1)
    policy = Policy(diffalign.load_pipeline("builtin:digits"), c.lora)
    opt = torch.optim.AdamW(policy.trainable_parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    saving = accelerator(2.0**10)
    saving.scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    saving.scaler._growth_tracker.fill_(2)
    path = save_checkpoint(saving, tmp_path, policy, {"main": opt}, {"main": sched},
                           {"step": 1, "images_seen": 4, "wall_s": 1.0, **run_signature("d3po", c)}, keep=1)
    loading = accelerator(1.0)
    load_checkpoint(path, run_signature("d3po", c), loading, policy, {"main": opt}, {"main": sched})
    assert loading.scaler.get_scale() == 2.0**10 and loading.scaler.state_dict()["_growth_tracker"] == 2

    # an update the scaler skips (an overflow) does not advance the learning-rate schedule
    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: True))
    rows = train("d3po", cfg(max_steps=2, lr=1e-2, lr_warmup_steps=4), tmp_path / "run", progress=False).metrics
    assert [r["lr"] for r in rows] == [0.0, 0.0]  # still at the warm-up's start


def test_a_statistic_missing_in_one_chunk_is_averaged_over_the_others():
    from accelerate import Accelerator

    from diffalign.align.trainer import _backward

    weight = torch.nn.Parameter(torch.ones(()))

    class TwoChunks:
        def chunks(self, batch):
            return [[0, 1, 2], [3]]

        def loss(self, batch, chunk):  # accuracy is undefined (NaN) on the second chunk, e.g. all ties
            return weight * len(chunk), {"implicit_acc": 1.0 if len(chunk) == 3 else float("nan")}

    stats = _backward(Accelerator(cpu=True), torch.nn.Linear(1, 1), TwoChunks(), [{"stats": {}}])
    assert stats["implicit_acc"] == 1.0 and stats["loss"] == pytest.approx(3 * 0.75 + 1 * 0.25)


@pytest.mark.parametrize("full_finetune", [False, True])
def test_the_weight_average_follows_the_ema_recurrence_and_is_what_the_run_saves(tmp_path, full_finetune):
    from diffalign.align.policy import load_aligned_pipeline

    out, cap = tmp_path / "ema", 0.6
    train("d3po", cfg(max_steps=4, lr=1e-2 if not full_finetune else 1e-4, ema_decay=cap, ema_power=1.0,
                      checkpoint_every=1, keep_checkpoints=10, full_finetune=full_finetune), out, progress=False)
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    raw = [load_file(str(p / "weights.safetensors")) for p in ckpts]
    avg = [load_file(str(p / "ema.safetensors")) for p in ckpts]
    assert len(raw) == 4 and raw[0].keys() == avg[0].keys()
    expect = raw[0]  # step 1 starts the average at the weights (decay 0)
    for k in range(2, 5):  # the decay of step k: min(cap, 1 - k^-power), here 1/2, then the cap
        d = min(cap, 1 - k ** -1.0)
        expect = {n: d * expect[n] + (1 - d) * raw[k - 1][n] for n in expect}
        assert all(torch.allclose(avg[k - 1][n], expect[n], atol=1e-6) for n in expect)
    assert not all(torch.allclose(avg[-1][n], raw[-1][n], atol=1e-6) for n in expect)
    a, b = load_aligned_pipeline(ckpts[-1]).unet.state_dict(), load_aligned_pipeline(out).unet.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    if full_finetune:  # the output directory's UNet is the average (a second full copy of the weights)
        assert all(torch.equal(b[n], avg[-1][n]) for n in expect)
    else:
        saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
        assert all(torch.equal(saved[f"unet.{n}"], avg[-1][n]) for n in expect)


def test_a_resumed_run_continues_the_weight_average_exactly(tmp_path):
    run = {"max_steps": 4, "lr": 1e-2, "ema_decay": 0.9, "checkpoint_every": 2, "keep_checkpoints": 10}
    train("d3po", cfg(**run), tmp_path / "full", progress=False)
    train("d3po", cfg(**{**run, "max_steps": 2}), tmp_path / "cut", progress=False)
    with pytest.raises(ValueError, match="ema_decay is 0.9 there but 0.8 here"):
        train("d3po", cfg(**{**run, "ema_decay": 0.8}), tmp_path / "cut", resume="latest", progress=False)
    train("d3po", cfg(**run), tmp_path / "cut", resume="latest", progress=False)
    for name in ("pytorch_lora_weights.safetensors", "checkpoints/step-000004/weights.safetensors",
                 "checkpoints/step-000004/ema.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(ValueError, match="ema_decay must be in"):
        train("d3po", cfg(ema_decay=1.0), tmp_path / "bad", progress=False)


def test_eval_reward_is_deterministic_and_writes_the_json_contract(tmp_path):
    from diffalign.cli import main

    args = ["eval", "reward", "--model", "builtin:digits", "--reward", "prompt_following", "--num-images", "8",
            "--steps", "5", "--seed", "3", "--quiet"]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*args, "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a == b and {"model", "reward", "mean", "std", "n", "guidance", "seed"} <= set(a)
    assert 0.5 < a["mean"] <= 1.0 and a["n"] == 8
    assert main(["eval", "reward", "--model", "builtin:digits", "--reward", "nope", "--quiet"]) == 2


# ---------------------------------------------------------------------- DDPO baseline
def test_ddpo_loss_is_ppo_clip():
    log_ratio = torch.tensor([0.0, 0.5, -0.5, 0.5], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    from diffalign.align.losses import ddpo_loss

    loss = ddpo_loss(log_ratio, adv, clip_range=0.2)
    r = log_ratio.detach().exp()
    expected = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    assert torch.allclose(loss, expected)
    loss.sum().backward()
    # ratio 1.65 > 1.2 with A > 0: the clipped term is larger, no gradient; ratio 0.61 with A > 0: unclipped wins
    assert log_ratio.grad[1] == 0 and log_ratio.grad[2] < 0 and log_ratio.grad[0] == -1.0 and log_ratio.grad[3] > 0


def test_ddpo_advantages_are_normalised_per_prompt():
    from diffalign.align.methods.ddpo import prompt_advantages

    adv = prompt_advantages(torch.tensor([1.0, 3.0, 10.0, 30.0, 5.0]), ["a", "a", "b", "b", "c"], clip=5.0)
    assert torch.allclose(adv[:4], torch.tensor([-0.7071, 0.7071, -0.7071, 0.7071]), atol=1e-3)
    assert abs(float(adv[4]) - (5.0 - 9.8) / torch.tensor([1.0, 3.0, 10.0, 30.0, 5.0]).std()) < 1e-3


def test_ddpo_trains_on_the_same_engine(tmp_path):
    result = train("ddpo", config_for("ddpo", overrides={**{k: v for k, v in FAST.items() if k != "pairs_per_step"},
                                                           "images_per_step": 8, "max_steps": 3}),
                   tmp_path / "run", progress=False)
    rows = result.metrics
    assert len(rows) == 3 and rows[-1]["images_seen"] == 24 and all(math.isfinite(r["loss"]) for r in rows)
    assert any(v.abs().max() > 0 for k, v in result.policy.trainable_state_dict().items() if "lora_B" in k)
    assert "kl" not in rows[-1]  # no reference pass without kl_coef


def test_ddpo_kl_coef_adds_the_kl_to_its_loss(tmp_path):
    from diffalign.align.methods.ddpo import DDPO

    overrides = {**{k: v for k, v in FAST.items() if k != "pairs_per_step"}, "images_per_step": 4, "max_steps": 2,
                 "lr": 1e-3}
    result = train("ddpo", config_for("ddpo", overrides={**overrides, "kl_coef": 1.0}), tmp_path / "run",
                   progress=False)
    assert result.metrics[0]["kl"] == 0.0 and result.metrics[1]["kl"] > 0
    method = DDPO(config_for("ddpo", overrides=overrides), result.policy)
    batch = method.collect(torch.Generator().manual_seed(0))
    plain, stats = method.loss(batch, batch["steps"])
    method.cfg.kl_coef = 3.0
    with_kl, stats_kl = method.loss(batch, batch["steps"])
    assert "kl" not in stats and math.isclose(float((with_kl - plain).detach()), 3.0 * stats_kl["kl"], rel_tol=1e-4)

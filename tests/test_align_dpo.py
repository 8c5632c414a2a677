"""The DPO family on the alignment engine: loss maths against the papers' formulas, preference datasets, synthetic
rankings, ReNoise inversion, training (shipped model and tiny Stable Diffusion) and bad input."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

import diffalign
from diffalign.align import Policy, config_for, train
from diffalign.align.config import LoraSettings
from diffalign.align.data import load_preferences, phi_from_scores
from diffalign.align.inversion import ddim_denoise, invert
from diffalign.align.losses import (
    diffusion_dpo_loss,
    rank_dpo_loss,
    smpo_loss,
    smpo_preference,
    soft_dpo_loss,
)
from diffalign.align.methods import get_method
from diffalign.align.synth import synthesize
from diffalign.images import save_image


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------- loss maths
def test_diffusion_dpo_loss_is_the_papers_formula():
    s_w, s_l = torch.tensor([1e-4, -3e-4, 2e-4]), torch.tensor([-2e-4, 1e-4, 2e-4])
    got = diffusion_dpo_loss(s_w, s_l, beta=5000.0)
    for i in range(3):  # -log sigma(-beta/2 (s_w - s_l)), Supp. Eq. 46 with the code's mean-over-pixels errors
        assert got[i].item() == pytest.approx(-math.log(sigmoid(-0.5 * 5000 * (s_w[i] - s_l[i]).item())), rel=1e-5)


def direct_rank_dpo(s: list[float], phi: list[float], beta: float, ranks: list[int]) -> float:
    """Eq. 6-7 written out with loops."""
    total = 0.0
    for i in range(len(s)):
        for j in range(len(s)):
            if phi[i] > phi[j]:
                delta = abs(2 ** phi[i] - 2 ** phi[j]) * abs(1 / math.log(1 + ranks[i]) - 1 / math.log(1 + ranks[j]))
                total += delta * -math.log(sigmoid(-0.5 * beta * (s[i] - s[j])))
    return total


def test_rank_dpo_loss_is_eq7_with_predicted_or_label_ranks():
    s = [3e-4, -1e-4, 2e-4, 0.5e-4]
    phi = [1.0, 2 / 3, 0.0, 1 / 3]
    st, pt = torch.tensor([s]), torch.tensor([phi])
    predicted = [4, 1, 3, 2]  # s ascending: the model ranks image 1 first
    label = [1, 2, 4, 3]  # phi descending
    assert rank_dpo_loss(st, pt, 5000.0, "predicted").item() == pytest.approx(
        direct_rank_dpo(s, phi, 5000.0, predicted), rel=1e-5)
    assert rank_dpo_loss(st, pt, 5000.0, "label").item() == pytest.approx(
        direct_rank_dpo(s, phi, 5000.0, label), rel=1e-5)


def test_rank_dpo_with_two_images_and_unit_weights_is_diffusion_dpo():
    s_w, s_l = torch.randn(5) * 1e-3, torch.randn(5) * 1e-3
    s, phi = torch.stack([s_w, s_l], 1), torch.tensor([[1.0, 0.0]] * 5)
    got = rank_dpo_loss(s, phi, 3000.0, weights=torch.ones(5, 2, 2))
    assert torch.allclose(got, diffusion_dpo_loss(s_w, s_l, 3000.0), atol=1e-6)


def test_smpo_loss_is_the_authors_formula_and_a_hard_preference_is_diffusion_dpo():
    s_w, s_l = torch.randn(6) * 1e-3, torch.randn(6) * 1e-3
    score_w, score_l = torch.rand(6) * 0.1 + 0.2, torch.rand(6) * 0.1 + 0.1
    lo, hi = 0.11543526500463486, 0.28201571106910706
    p = smpo_preference(score_w, score_l, lo, hi)
    for i in range(6):  # preprocessing.py / train.py: softmax of the normalised scores, scale -0.5 beta (2p-1) 10
        nw, nl = (score_w[i].item() - lo) / (hi - lo), (score_l[i].item() - lo) / (hi - lo)
        prob = math.exp(nw) / (math.exp(nw) + math.exp(nl))
        assert p[i].item() == pytest.approx(prob, rel=1e-5)
        scale = -0.5 * 2000 * (2 * prob - 1) * 10
        ref = -math.log(sigmoid(scale * (s_w[i] - s_l[i]).item()))
        assert smpo_loss(s_w, s_l, p, 2000.0, 10.0)[i].item() == pytest.approx(ref, rel=1e-4)
    hard = smpo_loss(s_w, s_l, torch.ones(6), beta=2000.0, gamma=1.0)
    assert torch.allclose(hard, diffusion_dpo_loss(s_w, s_l, 2000.0), atol=1e-7)
    equal = smpo_loss(s_w.requires_grad_(), s_l, torch.full((6,), 0.5))
    assert torch.allclose(equal, torch.full((6,), math.log(2)))
    assert torch.autograd.grad(equal.sum(), s_w)[0].abs().max() == 0


def test_soft_label_dpo_is_the_bradley_terry_cross_entropy_with_a_finite_optimum():
    s_w, s_l = torch.randn(6) * 1e-3, torch.randn(6) * 1e-3
    p = torch.tensor([1.0, 0.9, 0.75, 0.6, 0.5, 0.99])
    got = soft_dpo_loss(s_w, s_l, p, 5000.0)
    for i in range(6):
        h = -0.5 * 5000 * (s_w[i] - s_l[i]).item()
        ref = -(p[i].item() * math.log(sigmoid(h)) + (1 - p[i].item()) * math.log(sigmoid(-h)))
        assert got[i].item() == pytest.approx(ref, rel=1e-5)
    assert torch.allclose(soft_dpo_loss(s_w, s_l, torch.ones(6)), diffusion_dpo_loss(s_w, s_l), atol=1e-7)
    # the images swapped with the label: the same loss
    assert torch.allclose(soft_dpo_loss(s_l, s_w, 1 - p), got, atol=1e-6)
    # the gradient vanishes where the margin is logit(p), and pushes toward it from either side
    margin = torch.logit(p[1:5].double())
    for offset, sign in ((0.0, 0), (0.5, 1), (-0.5, -1)):
        s = (-(margin + offset) / 2500.0).requires_grad_()  # s_w - s_l giving h = margin + offset
        g = torch.autograd.grad(soft_dpo_loss(s, torch.zeros_like(s), p[1:5].double()).sum(), s)[0]
        if sign == 0:
            assert g.abs().max() < 1e-9
        else:  # d loss / d h = sigmoid(h) - p: too large a margin is pushed back down
            assert (torch.sign(-g) == sign).all()


def test_rankdpo_tied_labels_share_their_rank_and_their_weight():
    from diffalign.align.losses import rank_dpo_weights, ranks_of

    phi = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.5]])
    assert ranks_of(phi, descending=True, share_ties=True).tolist() == [[1.5, 1.5, 3.0], [1.0, 3.0, 2.0]]
    w = rank_dpo_weights(phi, ranks_of(phi, descending=True, share_ties=True))
    assert w[0, 0, 2] == pytest.approx(float(w[0, 1, 2])) and w[0, 0, 1] == 0  # equal labels, equal weights
    s = torch.tensor([[0.3, -0.1, 0.2], [0.0, 0.0, 0.0]])
    # predicted ranks break ties by position: at LoRA initialisation every s is 0 and the pairs still get weights
    assert ranks_of(s, descending=False).tolist() == [[3, 1, 2], [1, 2, 3]]
    assert rank_dpo_loss(s.requires_grad_(), phi).sum().grad_fn is not None


def test_diffusion_dpo_soft_labels_come_from_the_target_rewards_scores(ranked, tmp_path):
    algo, batch = method_with_batch("diffusion-dpo", ranked, label_temperature=0.05)
    rows = algo.chunks(batch)[0]
    with torch.no_grad():
        s, _ = algo.image_scores(batch, rows)
        loss, stats = algo.loss(batch, rows)
    scores = batch["scores"][rows]
    p = torch.sigmoid((scores[:, 0] - scores[:, 1]) / 0.05)
    assert (p >= 0.5).all() and stats["label_p"] == pytest.approx(float(p.mean()), rel=1e-5)
    assert loss.item() == pytest.approx(float(soft_dpo_loss(s[:, 0], s[:, 1], p).mean()), rel=1e-5)
    tied = {**batch, "scores": batch["scores"].clone()}  # an exact tie (as on-policy) trains nothing
    tied["scores"][rows[0], 1] = tied["scores"][rows[0], 0]
    with torch.no_grad():
        loss_tied, _ = algo.loss(tied, rows)
    keep = scores[:, 0] > scores[:, 1]
    keep[0] = False
    assert loss_tied.item() == pytest.approx(float(soft_dpo_loss(s[keep, 0], s[keep, 1], p[keep]).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="label_temperature must be > 0"):
        config_for("diffusion-dpo", overrides={"data": str(ranked), "label_temperature": 0.0}).check()
    unscored = write_pairs(tmp_path / "data", 8, channels=1, prompts=("3", "7"), scores=False)
    with pytest.raises(ValueError, match=r"needs reward scores for its soft labels \(label_temperature\)"):
        train("diffusion-dpo", dpo_cfg(unscored, label_temperature=0.05), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_offline_data_ranked_by_several_rewards_averages_their_wins(ranked, tmp_path):
    data = load_preferences(ranked)
    both = data.ranked_by("brightness, jpeg_compressibility")
    expected = phi_from_scores([data.scores["brightness"], data.scores["jpeg_compressibility"]])
    assert torch.equal(both.phi, expected) and torch.allclose(both.phi, data.phi, atol=1e-6)  # synth's own labels
    assert not torch.equal(data.ranked_by("brightness").phi, both.phi)
    with pytest.raises(ValueError, match="no scores for reward 'contrast'"):
        data.ranked_by("brightness,contrast")
    algo, batch = method_with_batch("diffusion-dpo", ranked, reward="brightness,jpeg_compressibility")
    assert torch.equal(algo.data.phi, expected) and batch["scores"] is None
    with pytest.raises(ValueError, match="uses one reward's scores.*names several"):
        method_with_batch("diffusion-dpo", ranked, reward="brightness,jpeg_compressibility", label_temperature=0.1)
    with pytest.raises(ValueError, match="smpo uses one reward's scores"):
        method_with_batch("smpo", ranked, reward="brightness,jpeg_compressibility")


def test_diffusion_dpo_sft_is_the_winners_denoising_loss(ranked):
    algo, batch = method_with_batch("diffusion-dpo", ranked, sft=True)
    rows = algo.chunks(batch)[0]
    torch.manual_seed(3)
    with torch.no_grad():  # away from the reference, so that the loser would matter to DPO
        for prm in algo.policy.trainable_parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    calls = []
    predict = algo.policy.predict
    algo.policy.predict = lambda x, *a, **kw: calls.append((len(x), kw.get("reference", False))) or predict(x, *a, **kw)
    g = gradient(algo, batch)
    algo.policy.predict = predict
    assert calls == [(len(rows), False)]  # the winners alone, through the policy alone
    params = algo.policy.trainable_parameters()
    for prm in params:
        prm.grad = None
    x, target = batch["noisy"][rows, 0], batch["target"][rows, 0]
    mse = ((algo.policy.predict(x, batch["t"][rows], batch["cond"][rows]) - target) ** 2).flatten(1).mean(1).mean()
    mse.backward()
    direct = torch.cat([prm.grad.flatten() for prm in params])
    assert direct.abs().max() > 0
    torch.testing.assert_close(g, direct, rtol=1e-4, atol=1e-6 * float(direct.abs().max()))
    algo.cfg.kl_coef = 10.0  # the KL term adds the reference's prediction on the winners
    loss, stats = algo.loss(batch, rows)
    with torch.no_grad():
        out = algo.policy.predict(x, batch["t"][rows], batch["cond"][rows])
        ref = algo.policy.predict(x, batch["t"][rows], batch["cond"][rows], reference=True)
        kl = ((out - ref) ** 2).mean()
    assert stats["kl"] == pytest.approx(float(kl), rel=1e-4) and stats["kl"] > 0
    assert float(loss.detach()) == pytest.approx(float(mse.detach()) + 10.0 * float(kl), rel=1e-4)
    with pytest.raises(ValueError, match="sft trains on the winners alone"):
        config_for("diffusion-dpo", overrides={"data": str(ranked), "sft": True, "label_temperature": 0.1}).check()


def test_phi_is_the_fraction_of_pairwise_wins_over_rewards():
    a = torch.tensor([[3.0, 1.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    phi = phi_from_scores({"a": a, "b": b})
    # wins: image 0: 3 (a) + 1 (b); image 1: 0 + 2; image 2: 1 + 3 (2 vs 2 is no win); image 3: 1 + 0
    assert torch.allclose(phi, torch.tensor([[4, 2, 4, 1]]) / 6.0)


# ---------------------------------------------------------------------- the methods on a real policy
@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return synthesize(out, ["builtin:digits"], ["brightness", "jpeg_compressibility"], num_prompts=24, k=4,
                      steps=8, batch_prompts=12, progress=False)


def method_with_batch(name: str, data: Path, **overrides):
    torch.manual_seed(0)
    cfg = config_for(name, overrides={"model": "builtin:digits", "data": str(data), "reward": "brightness",
                                      "prompts_per_step": 3, "score_low": None, "score_high": None,
                                      "inversion_steps": 2, **overrides} if name == "smpo" else
                     {"model": "builtin:digits", "data": str(data), "reward": "brightness", "prompts_per_step": 3,
                      **overrides})
    policy = Policy(diffalign.load_pipeline("builtin:digits"), LoraSettings())
    algo = get_method(name)(cfg, policy)
    return algo, algo.collect(torch.Generator().manual_seed(1))


def gradient(algo, batch) -> torch.Tensor:
    params = algo.policy.trainable_parameters()
    for prm in params:
        prm.grad = None
    loss, _ = algo.loss(batch, algo.chunks(batch)[0])
    loss.backward()
    return torch.cat([prm.grad.flatten() for prm in params])


@pytest.mark.parametrize("name", ["diffusion-dpo", "rankdpo", "smpo"])
def test_swapping_winner_and_loser_flips_the_gradient(tmp_path, name):
    algo, batch = method_with_batch(name, write_pairs(tmp_path / "pairs", 8, channels=1, prompts=("3", "7"), n=4))
    g = gradient(algo, batch)
    swapped = dict(batch)
    order = torch.arange(batch["noisy"].shape[1]).flip(0)
    for key in ("noisy", "target"):  # the images change places, the labels (and scores) stay: the loser now wins
        swapped[key] = batch[key][:, order]
    g_swapped = gradient(algo, swapped)
    assert g.abs().max() > 0
    assert torch.allclose(g_swapped, -g, atol=1e-6 * float(g.abs().max()) + 1e-12)


@pytest.mark.parametrize("name", ["diffusion-dpo", "rankdpo", "smpo"])
def test_kl_coef_adds_the_logged_noise_prediction_kl_whose_gradient_pulls_toward_the_reference(tmp_path, name):
    algo, batch = method_with_batch(name, write_pairs(tmp_path / "pairs", 8, channels=1, prompts=("3", "7"), n=4))
    rows = algo.chunks(batch)[0]
    assert algo.loss(batch, rows)[1]["kl"] == 0.0  # at LoRA initialisation the policy is the reference
    torch.manual_seed(3)
    with torch.no_grad():  # move the adapter away from the reference
        for prm in algo.policy.trainable_parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    plain, stats = algo.loss(batch, rows)
    x, g = batch["noisy"][rows].flatten(0, 1), batch["noisy"].shape[1]
    t, cond = batch["t"][rows].repeat_interleave(g), batch["cond"][rows].repeat_interleave(g, 0)
    with torch.no_grad():
        out, ref = algo.policy.predict(x, t, cond), algo.policy.predict(x, t, cond, reference=True)
    assert stats["kl"] > 0 and stats["kl"] == pytest.approx(float(((out - ref) ** 2).mean()), rel=1e-5)
    algo.cfg.kl_coef = 2.0
    assert algo.loss(batch, rows)[0].item() == pytest.approx(plain.item() + 2.0 * stats["kl"], rel=1e-5)
    kl = algo.image_scores(batch, rows)[1].mean()
    kl.backward()
    with torch.no_grad():
        for prm in algo.policy.trainable_parameters():
            prm.sub_(0.5 * prm.grad)
    assert algo.image_scores(batch, rows)[1].mean().item() < 0.9 * kl.item()
    with pytest.raises(ValueError, match="kl_coef"):
        method_with_batch(name, tmp_path / "pairs", kl_coef=-1.0)


def test_winner_and_loser_share_t_and_noise_and_smpo_inverts(ranked):
    _, batch = method_with_batch("diffusion-dpo", ranked)
    assert torch.equal(batch["target"][:, 0], batch["target"][:, 1])  # the same epsilon for both images
    assert (batch["phi"][:, 0] > batch["phi"][:, 1]).all()  # winner first
    _, batch = method_with_batch("smpo", ranked)
    assert not torch.allclose(batch["target"][:, 0], batch["target"][:, 1])  # image-dependent inverted noise
    assert (batch["scores"][:, 0] > batch["scores"][:, 1]).all()


@pytest.mark.parametrize("name", ["diffusion-dpo", "smpo"])
def test_pair_selection_extremes_trains_the_best_against_the_worst(ranked, name):
    algo, batch = method_with_batch(name, ranked, pair_selection="extremes")
    phi = torch.tensor([[0.0, 1.0, 0.5, 0.5], [0.75, 0.25, 0.25, 1.0], [0.5, 0.5, 0.5, 0.5]])
    gen = torch.Generator().manual_seed(0)
    assert algo.select(phi, None, gen).tolist() == [[1, 0], [3, 1], [0, 0]]  # first of tied extremes; a tie row
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # draws nothing
    data = algo.data  # ranked by the brightness scores it trains on
    extremes = {(float(r.max()), float(r.min())) for r in data.scores["brightness"]}
    assert all((w, l) in extremes for w, l in batch["scores"].tolist())  # each row's best and worst image
    algo.cfg.pair_selection = "random"  # the default draws other decided pairs too
    assert (algo.select(data.phi, None, gen) != torch.stack([data.phi.argmax(1), data.phi.argmin(1)], 1)).any()
    with pytest.raises(ValueError, match="pair_selection must be 'random' or 'extremes'"):
        config_for(name, overrides={"data": str(ranked), "pair_selection": "best"}).check()
    with pytest.raises(ValueError, match="RankDPO trains on all k images"):
        config_for("rankdpo", overrides={"data": str(ranked), "pair_selection": "extremes"}).check()


def test_inversion_reconstructs_a_sample_and_renoise_is_not_worse():
    policy = Policy(diffalign.load_pipeline("builtin:digits"))
    cond = policy.encode([str(i % 10) for i in range(16)])
    z_T = torch.randn((16, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    errors = {}
    for n in (5, 10):
        x0 = ddim_denoise(policy, z_T, cond, 999, n)
        for r in (0, 1):
            back = ddim_denoise(policy, invert(policy, x0, cond, 999, n, renoise=r), cond, 999, n)
            errors[n, r] = float(((back - x0) ** 2).mean())
    assert errors[10, 0] < errors[5, 0]
    assert errors[5, 1] <= errors[5, 0] and errors[10, 1] <= errors[10, 0]
    # inverting to a small t is nearly exact
    x0 = ddim_denoise(policy, z_T, cond, 999, 10)
    back = ddim_denoise(policy, invert(policy, x0, cond, 50, 5, renoise=1), cond, 50, 5)
    assert float(((back - x0) ** 2).mean()) < 1e-3


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["diffusion-dpo", "rankdpo", "smpo"])
def test_training_on_ranked_data_raises_the_target_reward(tmp_path, ranked, name):
    from diffalign.align import evaluate_reward

    extra = {"score_low": None, "score_high": None, "inversion_steps": 2} if name == "smpo" else {}
    cfg = config_for(name, overrides={"model": "builtin:digits", "data": str(ranked), "reward": "brightness",
                                      "lr": 3e-3, "max_steps": 25, "prompts_per_step": 6, "checkpoint_every": 0,
                                      **extra})
    result = train(name, cfg, tmp_path / name, progress=False)
    assert all(math.isfinite(m["loss"]) for m in result.metrics)
    before = evaluate_reward("builtin:digits", "brightness", num_images=64, seed=7)["mean"]
    after = evaluate_reward(str(tmp_path / name), "brightness", num_images=64, seed=7)["mean"]
    assert after > before + 0.01, (before, after)


@pytest.mark.parametrize("name", ["diffusion-dpo", "rankdpo", "smpo"])
def test_on_policy_training_logs_reward_and_implicit_accuracy(tmp_path, name):
    cfg = config_for(name, overrides={"model": "builtin:digits", "reward": "brightness", "max_steps": 2,
                                      "prompts_per_step": 2, "sample_steps": 4, "checkpoint_every": 0,
                                      **({"inversion_steps": 1} if name == "smpo" else {})})
    metrics = train(name, cfg, tmp_path / name, progress=False).metrics
    assert len(metrics) == 2 and "reward_mean" in metrics[-1] and "implicit_acc" in metrics[-1]


def test_on_policy_samples_from_a_stochastic_sampler_follow_the_run_seed_only(tmp_path):
    """An ancestral sampler draws its noise from the step's seeded generator, not from the global RNG (so a resumed
    run samples what the uninterrupted one did)."""
    from diffalign.rewards import register_reward

    def make(draws: int = 0):  # brightness, after using the global RNG as much as it is told to
        def reward(images, prompts, meta=None):
            torch.rand(draws)
            return images.mean(dim=(1, 2, 3)), {}
        return reward

    register_reward("test_global_rng")(make)
    runs = []
    for name, draws in (("a", 1), ("b", 5)):
        cfg = config_for("diffusion-dpo", overrides={
            "model": "builtin:digits", "reward": "test_global_rng", "reward_kwargs": {"draws": draws},
            "max_steps": 3, "prompts_per_step": 2, "sample_steps": 4,
            "sampler": "diffusers:EulerAncestralDiscreteScheduler", "checkpoint_every": 0})
        runs.append(train("diffusion-dpo", cfg, tmp_path / name, progress=False).metrics)
    assert [r["reward_mean"] for r in runs[0]] == [r["reward_mean"] for r in runs[1]]


def write_pairs(root: Path, size: int, channels: int = 3, n: int = 3, scores: bool = True,
                prompts: tuple[str, str] = ("a red dog", "a photo of a cat")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        files = [f"{i}_{j}.png" for j in range(2)]
        for f in files:
            save_image(torch.rand(channels, size, size, generator=gen), root / f)
        line = {"prompt": prompts[i % 2], "images": files, "preferred": i % 2}
        if scores:
            line["scores"] = {"brightness": [0.6, 0.4] if i % 2 == 0 else [0.3, 0.5]}
        lines.append(json.dumps(line))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("name", ["diffusion-dpo", "rankdpo", "smpo"])
def test_tiny_stable_diffusion_trains_from_a_dataset_on_disk_and_its_lora_loads(tmp_path, name, kind):
    from diffusers import DiffusionPipeline

    from diffalign.models.tiny_sd import tiny_sdxl_pipeline, tiny_stable_diffusion_pipeline

    build = {"sd": lambda: tiny_stable_diffusion_pipeline(seed=0, sample_size=8), "sdxl": tiny_sdxl_pipeline}[kind]
    build().save_pretrained(tmp_path / "sd")
    size = Policy(diffalign.load_pipeline(str(tmp_path / "sd"))).image_shape[1]
    data = write_pairs(tmp_path / "pairs", size)
    extra = {"inversion_steps": 1, "score_low": 0.0, "score_high": 1.0} if name == "smpo" else {}
    cfg = config_for(name, overrides={"model": str(tmp_path / "sd"), "data": str(data), "max_steps": 2,
                                      "prompts_per_step": 2, "lr": 1e-2, "checkpoint_every": 0, **extra})
    result = train(name, cfg, tmp_path / "run", progress=False)
    assert result.policy.kind == kind and len(result.metrics) == 2

    def sample(pipe):
        return pipe(prompt="a red dog", num_inference_steps=3, guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "sd")
    before = sample(pipe)
    pipe.load_lora_weights(tmp_path / "run")
    assert not torch.allclose(before, sample(pipe), atol=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_regression_target_of_each_prediction_type_is_what_the_policy_reads_back(kind):
    from diffalign.align.methods.preference import training_target

    pipe = diffalign.load_pipeline("builtin:digits")
    pipe.scheduler.register_to_config(prediction_type=kind)
    policy, gen = Policy(pipe), torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    t = torch.tensor([10, 400, 990])
    a = policy.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    got_x0, got_eps = policy.split_prediction(training_target(kind, x0, eps, a), x_t, t)
    torch.testing.assert_close(got_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_eps, eps, rtol=1e-4, atol=2e-3 if kind == "sample" else 1e-4)


def test_a_v_prediction_stable_diffusion_pipeline_trains_with_d3po_and_diffusion_dpo(tmp_path):
    from diffalign.models.tiny_sd import tiny_stable_diffusion_pipeline

    pipe = tiny_stable_diffusion_pipeline(seed=0, sample_size=8)
    pipe.scheduler.register_to_config(prediction_type="v_prediction")  # as Stable Diffusion 2.x (768-v)
    pipe.save_pretrained(tmp_path / "sd2")
    common = {"model": str(tmp_path / "sd2"), "max_steps": 2, "lr": 1e-2, "checkpoint_every": 0}
    d3po = train("d3po", config_for("d3po", overrides={
        **common, "reward": "brightness", "prompts": ["a red dog", "a photo of a cat"], "num_steps": 4,
        "pairs_per_step": 2}), tmp_path / "d3po", progress=False)
    data = write_pairs(tmp_path / "pairs", d3po.policy.image_shape[1])
    dpo = train("diffusion-dpo", config_for("diffusion-dpo", overrides={**common, "data": str(data),
                                                                        "prompts_per_step": 2}),
                tmp_path / "dpo", progress=False)
    for result in (d3po, dpo):
        assert result.policy.prediction_type == "v_prediction" and len(result.metrics) == 2
        assert all(math.isfinite(row["loss"]) for row in result.metrics)
        assert any(v.abs().max() > 0 for k, v in result.policy.trainable_state_dict().items() if "lora_B" in k)


# ---------------------------------------------------------------------- datasets
def test_pickapic_style_dataset_loads_and_trains(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    def jpeg(seed: int) -> bytes:
        arr = (torch.rand(8, 8, generator=torch.Generator().manual_seed(seed)) * 255).byte().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).convert("RGB").save(buf, format="JPEG")
        return buf.getvalue()

    ds = datasets.Dataset.from_dict({"caption": ["3", "7", "1", "0"], "jpg_0": [jpeg(i) for i in range(4)],
                                     "jpg_1": [jpeg(10 + i) for i in range(4)], "label_0": [1.0, 0.0, 0.5, 1.0],
                                     "best_image_uid": ["a", "b", "c", "d"]})
    data = load_preferences(ds)
    assert len(data) == 4 and data.decided() == [0, 1, 3]
    assert torch.equal(data.phi[1], torch.tensor([0.0, 1.0]))
    images = data.images([0], (8, 8), 1)
    assert images.shape == (1, 2, 1, 8, 8)
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = config_for("diffusion-dpo", overrides={"model": "builtin:digits", "data": str(tmp_path / "saved"),
                                                 "max_steps": 2, "prompts_per_step": 2, "checkpoint_every": 0})
    assert len(train("diffusion-dpo", cfg, tmp_path / "run", progress=False).metrics) == 2
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"DatasetDict \(splits: train\); give the directory of one split"):
        load_preferences(tmp_path / "splits")
    assert len(load_preferences(tmp_path / "splits" / "train")) == 4
    with pytest.raises(ValueError, match="lacks the Pick-a-Pic columns caption"):
        load_preferences(ds.rename_column("caption", "text"))
    assert len(load_preferences(ds.rename_column("caption", "text"), columns={"caption": "text"})) == 4
    ds.rename_column("caption", "text").save_to_disk(str(tmp_path / "renamed"))  # a saved one takes both options
    assert len(load_preferences(tmp_path / "renamed", columns={"caption": "text"}, drop_ties=True)) == 3


def test_16_bit_images_load_scaled_and_soft_labels_outside_0_1_are_refused(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "d"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(root / "grey16.png")  # mid grey, 16 bit
    Image.new("L", (8, 8), 255).save(root / "white.png")
    (root / "pairs.jsonl").write_text('{"prompt": "3", "images": ["grey16.png", "white.png"], "preferred": 0}\n')
    images = load_preferences(root).images([0], (8, 8), 1)
    assert images[0, 0].flatten().unique().tolist() == pytest.approx([128 / 255]) and images[0, 1].min() == 1.0
    (root / "pairs.jsonl").write_text('{"prompt": "3", "images": ["grey16.png", "white.png"], "phi": [1.5, 0]}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:1.*numbers in \[0, 1\]"):
        load_preferences(root)
    # scores closer than float32 resolves: the label from the stored scores and from the loaded ones agree
    (root / "pairs.jsonl").write_text('{"prompt": "3", "images": ["grey16.png", "white.png"], '
                                      '"scores": {"r": [100000001.0, 100000000.0]}}\n')
    data = load_preferences(root)
    assert data.phi.tolist() == [[1.0, 0.0]] and data.ranked_by("r").decided() == [0]


def test_synth_resumes_to_the_same_dataset(tmp_path):
    kwargs = dict(models=["builtin:digits"], rewards=["brightness"], num_prompts=6, k=3, steps=4, batch_prompts=2,
                  progress=False)
    whole = synthesize(tmp_path / "whole", **kwargs)
    part = tmp_path / "part"
    synthesize(part, **{**kwargs, "num_prompts": 6})
    lines = (part / "rankings.jsonl").read_text().splitlines()
    (part / "rankings.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed mid-write
    synthesize(part, **kwargs)
    assert (part / "rankings.jsonl").read_text() == (whole / "rankings.jsonl").read_text()
    row = json.loads(lines[0])
    assert set(row["scores"]) == {"brightness"} and len(row["images"]) == 3 and len(row["sources"]) == 3
    with pytest.raises(FileExistsError, match="other settings"):
        synthesize(part, **{**kwargs, "k": 4})


def test_several_models_and_samplers_feed_one_ranking(tmp_path):
    out = synthesize(tmp_path / "d", ["builtin:digits"], ["brightness", "jpeg_compressibility"],
                     samplers=["dpm-solver++", "ddim"], num_prompts=2, k=4, steps=4, progress=False)
    row = json.loads((out / "rankings.jsonl").read_text().splitlines()[0])
    assert [s["sampler"] for s in row["sources"]] == ["dpm-solver++", "ddim", "dpm-solver++", "ddim"]
    assert set(row["scores"]) == {"brightness", "jpeg_compressibility"}
    assert sum(row["phi"]) == pytest.approx(2.0)  # k / 2: each comparison gives one win (no ties here)


# ---------------------------------------------------------------------- bad input
def dpo_cfg(data, name="diffusion-dpo", **overrides):
    return config_for(name, overrides={"model": "builtin:digits", "data": str(data), "max_steps": 1,
                                       "checkpoint_every": 0, **overrides})


@pytest.mark.parametrize("mutate, error, match", [
    (lambda root: (root / "1_0.png").unlink(), FileNotFoundError, r"pairs.jsonl:2: image .*1_0.png not found"),
    (lambda root: (root / "pairs.jsonl").write_text('{"prompt": "3", "images": ["0_0.png"]}\n'), ValueError,
     r"pairs.jsonl:1: 1 image\(s\); a preference needs k >= 2"),
    (lambda root: (root / "pairs.jsonl").write_text("{not json\n"), ValueError, r"pairs.jsonl:1: not valid JSON"),
    (lambda root: (root / "pairs.jsonl").write_text(
        '{"prompt": "3", "images": ["0_0.png", "0_1.png"], "preferred": null}\n'), ValueError, "every row .* tie"),
])
def test_bad_datasets_are_refused_naming_the_line_and_nothing_is_written(tmp_path, mutate, error, match):
    root = write_pairs(tmp_path / "data", 8, channels=1, prompts=("3", "7"))
    mutate(root)
    with pytest.raises(error, match=match):
        train("diffusion-dpo", dpo_cfg(root), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_images_of_another_size_are_refused_or_resized(tmp_path):
    root = write_pairs(tmp_path / "data", 12, channels=1, prompts=("3", "7"))
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: the images are 12x12 but the model makes 8x8.*resize=true"):
        train("diffusion-dpo", dpo_cfg(root), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert len(train("diffusion-dpo", dpo_cfg(root, resize=True), tmp_path / "run", progress=False).metrics) == 1


def test_smpo_needs_scores(tmp_path):
    root = write_pairs(tmp_path / "data", 8, channels=1, prompts=("3", "7"), scores=False)
    with pytest.raises(ValueError, match="smpo needs reward scores"):
        train("smpo", dpo_cfg(root, "smpo"), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="no scores for reward 'jpeg_compressibility'"):
        scored = write_pairs(tmp_path / "d2", 8, channels=1, prompts=("3", "7"))
        train("smpo", dpo_cfg(scored, "smpo", reward="jpeg_compressibility"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_k_below_two_and_missing_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="k must be >= 2"):
        synthesize(tmp_path / "s", ["builtin:digits"], ["brightness"], k=1, progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="k must be >= 2"):
        config_for("rankdpo", overrides={"reward": "brightness", "k": 1}).check()
    with pytest.raises(ValueError, match="give a preference dataset"):
        config_for("diffusion-dpo").check()


def test_cli_synth_and_train(tmp_path, capsys):
    from diffalign.cli import main

    assert main(["data", "synth", "--rewards", "brightness", "--num-prompts", "4", "--k", "2", "--steps", "4",
                 "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert main(["train", "diffusion-dpo", "--data", str(tmp_path / "d"), "--model", "builtin:digits",
                 "--max-steps", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["data", "synth", "--rewards", "brightness", "--k", "1", "--out", str(tmp_path / "e"),
                 "--quiet"]) == 2
    assert "k must be >= 2" in capsys.readouterr().err


def test_real_rankings_writes_a_loadable_dataset_of_training_images(tmp_path):
    """benchmarks/real_rankings.py: rows cycle through the classes, each holding k distinct training images of its
    class, with the stored scores those images get and phi from them."""
    import importlib.util

    import numpy as np

    from diffalign.align.data import load_directory
    from diffalign.align.rewarding import build_reward, score
    from diffalign.models.builtin import builtin_spec, load_builtin_data

    spec = importlib.util.spec_from_file_location("real_rankings",
                                                  Path(__file__).parents[1] / "benchmarks" / "real_rankings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--model", "builtin:digits", "--rewards", "prompt_following,contrast", "--num-prompts", "12",
                       "--k", "3", "--out", str(tmp_path / "real")])
    data = load_directory(out)
    classes = builtin_spec("builtin:digits").class_names
    assert data.prompts == [classes[i % 10] for i in range(12)]
    assert torch.allclose(data.phi, phi_from_scores(data.scores), atol=1e-6)
    x, y = load_builtin_data("builtin:digits", "train")
    lines = (out / "rankings.jsonl").read_text().splitlines()
    for i in (0, 11):
        idx = [s["index"] for s in json.loads(lines[i])["sources"]]
        assert len(set(idx)) == 3 and all(int(y[t]) == i % 10 for t in idx)
        images = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).reshape(x.shape[1:])
                              for im in data.loader(i)])
        assert torch.allclose(images, (x[idx] + 1) / 2, atol=1 / 255)
        expected = score(build_reward("contrast", "builtin:digits"), images, [data.prompts[i]] * 3)[:, 0]
        assert torch.allclose(data.scores["contrast"][i].float(), expected, atol=1e-3)
    with pytest.raises(SystemExit, match="not empty"):
        module.main(["--rewards", "contrast", "--out", str(out)])

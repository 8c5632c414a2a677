"""The tilted-base frontier of ``benchmarks/align_frontier.py`` against the Gaussian closed form."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.spec_from_file_location("align_frontier",
                                              Path(__file__).parents[1] / "benchmarks" / "align_frontier.py")
frontier_module = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(frontier_module)


def test_gaussian_tilt_matches_closed_form():
    """Rewards N(0, 1) tilted by exp(r / beta): mean 1 / beta, KL 1 / (2 beta^2), and the Frechet distance to
    N(0, I) of features whose first is the reward 1 / beta^2; the base row is the base."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(40000, generator=gen, dtype=torch.float64)
    groups = torch.arange(40000) % 2
    features = torch.randn(40000, 3, generator=gen, dtype=torch.float64)
    features[:, 0] = rewards  # one feature is the reward: the tilt moves its mean by 1 / beta, keeps its variance
    ref = {"mean": torch.zeros(3), "cov": torch.eye(3)}
    rows = frontier_module.frontier(rewards, groups, features, ref, [math.inf, 2.0, 1.0], resamples=2,
                                    per_group=500, seed=0)
    assert rows[0]["gain_base_sd"] == pytest.approx(0.0, abs=1e-12) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert rows[0]["min_ess"] == pytest.approx(20000) and rows[0]["fid_inf"] < 0.01
    for row, beta in zip(rows[1:], (2.0, 1.0), strict=True):
        assert row["gain_base_sd"] == pytest.approx(1.0 / beta, rel=0.05)
        assert row["kl"] == pytest.approx(1.0 / (2.0 * beta**2), rel=0.1)
        assert row["fid_inf"] == pytest.approx(1.0 / beta**2, rel=0.1, abs=0.02)
        assert row["fid_resampled"] == pytest.approx(1.0 / beta**2, rel=0.15, abs=0.05)


def test_gain_at_bound_interpolates():
    rows = [{"gain_base_sd": 0.0, "r": 1.0}, {"gain_base_sd": 0.5, "r": 1.5}, {"gain_base_sd": 1.0, "r": 2.5}]
    assert frontier_module.gain_at_bound(rows, "r", 2.0) == pytest.approx(0.75)
    assert frontier_module.gain_at_bound(rows, "r", 3.0) == pytest.approx(1.0)


def gaussian_pool(n: int, reward_seen: bool):
    """Rewards x1 + x2 of N(0, I) samples. Features (x1, x3) against a reference N((0, 0.5), I), or (reward / sqrt 2,
    x3) against N((-0.5, 0), I): the base FID is 0.25 either way."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    rewards = x[:, 0] + x[:, 1]
    if reward_seen:
        return rewards, torch.arange(n) % 2, torch.stack([rewards / math.sqrt(2), x[:, 2]], 1), \
            {"mean": torch.tensor([-0.5, 0.0]), "cov": torch.eye(2)}
    return rewards, torch.arange(n) % 2, x[:, [0, 2]], {"mean": torch.tensor([0.0, 0.5]), "cov": torch.eye(2)}


def test_feature_tilt_finds_the_reward_the_features_do_not_see():
    """Half of the reward (x2) is invisible to the features. Tilting by the reward moves x1 by a (FID 0.25 + a^2,
    gain sqrt(2) a sd: 0.71 sd at 2x); the feature tilt can hold x1 still, and gains far more, on held-out images."""
    rewards, groups, features, ref = gaussian_pool(4000, reward_seen=False)
    sd = float(rewards.std())
    tilt = frontier_module.frontier(rewards, groups, features, ref, [math.inf, *[b * sd for b in (4, 2, 1, 0.5)]],
                                    resamples=1, per_group=500, seed=0)
    rows = frontier_module.feature_tilt(rewards, groups, features, ref, [4.0, 1.0], resamples=1, per_group=500,
                                        seed=0)
    assert rows[0]["gain_base_sd"] == pytest.approx(0.0, abs=0.05)
    assert rows[0]["fid_inf"] == pytest.approx(0.25, abs=0.05)
    plain = frontier_module.gain_at_bound(tilt, "fid_inf_ratio", 2.0)
    assert plain == pytest.approx(math.sqrt(0.5), abs=0.1)
    assert frontier_module.gain_at_bound(rows, "fid_inf_ratio", 2.0) > 1.5 * plain
    assert all(abs(r["gain_base_sd"] - r["gain_fit_base_sd"]) < 0.15 for r in rows)


def test_feature_tilt_gains_nothing_when_the_features_see_the_reward():
    """With the reward itself a feature (FID (0.5 + g)^2 at gain g sd), no reweighting beats the tilt: both reach
    about 0.21 sd within 2x, held out."""
    rewards, groups, features, ref = gaussian_pool(4000, reward_seen=True)
    sd = float(rewards.std())
    tilt = frontier_module.frontier(rewards, groups, features, ref, [math.inf, *[b * sd for b in (8, 4, 2, 1)]],
                                    resamples=1, per_group=500, seed=0)
    rows = frontier_module.feature_tilt(rewards, groups, features, ref, [0.25, 0.2, 0.15], resamples=1,
                                        per_group=500, seed=0, iters=150)
    plain = frontier_module.gain_at_bound(tilt, "fid_inf_ratio", 2.0)
    aware = frontier_module.gain_at_bound(rows, "fid_inf_ratio", 2.0)
    assert plain == pytest.approx(math.sqrt(0.5) - 0.5, abs=0.05)
    assert aware == pytest.approx(plain, abs=0.05)


def test_feature_tilt_needs_images_to_hold_out():
    rewards, groups, features, ref = gaussian_pool(4, reward_seen=True)
    with pytest.raises(ValueError, match="at least 4 pool images per prompt"):
        frontier_module.feature_tilt(rewards, groups, features, ref, [1.0], resamples=1, per_group=2, seed=0)


def test_feature_tilt_through_other_features_gains_only_what_they_see():
    """``tilt_features``: the same features give the same rows; features blind to x1 (independent noise) cannot
    hold x1 still, so the reweighting does no better than the plain tilt (0.71 sd at 2x; it gets 0.49 sd, paying for
    weights fitted to noise)."""
    rewards, groups, features, ref = gaussian_pool(4000, reward_seen=False)
    kwargs = {"resamples": 1, "per_group": 500, "seed": 0}
    same = frontier_module.feature_tilt(rewards, groups, features, ref, [1.0], **kwargs)
    again = frontier_module.feature_tilt(rewards, groups, features, ref, [1.0], tilt_features=features,
                                         tilt_ref=ref, **kwargs)
    assert [r["gain_base_sd"] for r in again] == pytest.approx([r["gain_base_sd"] for r in same], abs=1e-9)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    blind = frontier_module.feature_tilt(rewards, groups, features, ref, [4.0, 1.0, 0.25, 0.0625],
                                         tilt_features=noise, tilt_ref={"mean": torch.zeros(2), "cov": torch.eye(2)},
                                         **kwargs)
    assert 0.3 < frontier_module.gain_at_bound(blind, "fid_inf_ratio", 2.0) < math.sqrt(0.5) + 0.1


def test_real_tilt_is_in_the_base_models_units():
    """Real rewards N(0.5, 1) against a base of mean 0 and sd 2: untilted, the gain is 0.25 base sd and the FID
    ratio is the real FID over the base's; tilting raises the gain by 1 / beta in real sd, i.e. half that in base sd."""
    gen = torch.Generator().manual_seed(2)
    rewards = 0.5 + torch.randn(40000, generator=gen, dtype=torch.float64)
    features = torch.randn(40000, 2, generator=gen, dtype=torch.float64)
    features[:, 0] = rewards - 0.5
    ref = {"mean": torch.zeros(2), "cov": torch.eye(2)}
    base_row = {"reward_mean": 0.0, "base_sd": 2.0, "fid_inf": 0.5, "fid_resampled": 0.5}
    rows = frontier_module.real_tilt(rewards, torch.arange(40000) % 2, features, ref, [math.inf, 1.0], resamples=2,
                                     per_group=500, seed=0, base_row=base_row)
    assert rows[0]["gain_base_sd"] == pytest.approx(0.25, abs=0.02)
    assert rows[0]["fid_inf_ratio"] == pytest.approx(rows[0]["fid_inf"] / 0.5)
    assert rows[1]["gain_base_sd"] == pytest.approx(0.75, abs=0.05)
    assert rows[1]["gain_real_sd"] == pytest.approx(1.0, abs=0.05)
    assert rows[1]["fid_inf_ratio"] == pytest.approx(2.0, rel=0.1)  # the feature's mean moved by 1: FID 1 = 2x 0.5

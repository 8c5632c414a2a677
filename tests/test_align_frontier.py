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

"""The Gaussian teleport of ``benchmarks/teleport.py``: the closed-form flow against RK4 and against the marginals."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

SPEC = importlib.util.spec_from_file_location("teleport", Path(__file__).parents[1] / "benchmarks" / "teleport.py")
teleport_module = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(teleport_module)
Gaussian, teleport = teleport_module.Gaussian, teleport_module.teleport


def _gaussian(dim: int, seed: int) -> Gaussian:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return Gaussian.fit(torch.randn(4000, dim, generator=gen, dtype=torch.float64) @ a + 2.0)


def test_closed_form_flow_matches_rk4():
    """With both Gaussians equal, the guided path (RK4) is the single Gaussian's: it must equal the closed form."""
    g = _gaussian(6, 0)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.zeros(32, dtype=torch.long)
    closed = teleport(x, 80.0, 3.0, g, [g], labels, guidance=1.0)
    rk4 = teleport(x, 80.0, 3.0, g, [g], labels, guidance=4.0)
    assert torch.allclose(closed, rk4, atol=1e-7)
    assert not torch.allclose(closed, x * math.sqrt(1 + 80.0**2) / math.sqrt(1 + 3.0**2), atol=1e-2)


def test_flow_keeps_the_noisy_marginals():
    """z ~ N(mu, C + sigma_a^2 I) carried to sigma_b is N(mu, C + sigma_b^2 I): the ODE's defining property."""
    g = _gaussian(3, 2)
    gen = torch.Generator().manual_seed(3)
    cov = g.U @ torch.diag(g.lam) @ g.U.T
    z_a = g.mu + torch.randn(200000, 3, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(
        cov + 50.0**2 * torch.eye(3, dtype=torch.float64)).T
    z_b = g.flow(z_a, 50.0, 1.5)
    assert torch.allclose(z_b.mean(0), g.mu, atol=0.3)
    assert torch.allclose(torch.cov(z_b.T), cov + 1.5**2 * torch.eye(3, dtype=torch.float64), rtol=0.03, atol=0.1)


def test_guided_path_mixes_the_two_gaussians():
    """Guidance g extrapolates from the unconditional toward the class Gaussian: at g = 0 the path is the
    unconditional one, and a larger g ends farther from it."""
    u, c = _gaussian(4, 4), _gaussian(4, 5)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    labels = torch.zeros(8, dtype=torch.long)
    plain = teleport(x, 60.0, 2.0, u)
    assert torch.allclose(teleport(x, 60.0, 2.0, u, [c], labels, guidance=0.0), plain, atol=1e-7)
    gaps = [float((teleport(x, 60.0, 2.0, u, [c], labels, guidance=w) - plain).norm()) for w in (2.0, 5.0)]
    assert 0 < gaps[0] < gaps[1]
    at_one = teleport(x, 60.0, 2.0, u, [c], labels, 1.0)  # the class Gaussian's closed form
    assert torch.allclose(teleport(x, 60.0, 2.0, u, [c], labels, 1.0 + 1e-9), at_one, atol=1e-6)

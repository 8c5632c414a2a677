"""The Gaussian exponential integrator: its reductions (DDIM, exactness on Gaussian data), its order with statistics,
and its refusals."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.models import digits_reference_model
from diffalign.models.sampler_data import teleport_file
from diffalign.samplers import GaussianEIScheduler, make_scheduler, sample, trajectory
from diffalign.samplers.teleport import GaussianTeleport, LowRankGaussian

GRID = [157.4, 20.0, 4.0, 1.0, 0.2]


def _gaussian(dim: int = 16, rank: int = 3) -> LowRankGaussian:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return LowRankGaussian(0.3 * torch.randn(dim, generator=gen, dtype=torch.float64), q[:, :rank],
                           torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64))


def test_first_order_without_statistics_is_ddim():
    model = digits_reference_model({})
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = sample(make_scheduler("gaussian-ei", solver_order=1), model, x_T, sigmas=GRID)
    ddim = sample(make_scheduler("ddim"), model, x_T, sigmas=GRID)
    torch.testing.assert_close(ours, ddim, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_every_step_is_exact_on_gaussian_data(order, tmp_path):
    """With the data's own Gaussian the remainder R is 0: the states at every grid point are the exact flow's."""
    g = _gaussian()
    path = GaussianTeleport(g, None, (1, 4, 4)).save(tmp_path / "g.safetensors")
    sched = make_scheduler("gaussian-ei", solver_order=order, gaussian_path=str(path))

    def model(x, t):  # the exact noise prediction of N(mu, C) data
        sigma = sched.sigma_at_time([float(t)])[0]
        alpha = 1.0 / math.sqrt(1.0 + sigma**2)
        z = x.flatten(1) / alpha
        return ((x.flatten(1) - alpha * g.denoise(z, sigma)) / (sigma * alpha)).reshape(x.shape)

    x_T = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    states = list(trajectory(sched, model, x_T, sigmas=GRID))
    z_T = x_T.flatten(1) * math.sqrt(1.0 + GRID[0] ** 2)
    for sigma, x in zip(GRID[1:], states, strict=False):
        exact = g.flow(z_T, GRID[0], sigma) / math.sqrt(1.0 + sigma**2)
        torch.testing.assert_close(x.flatten(1), exact, rtol=1e-6, atol=1e-7)
    # the last step returns the data prediction at the last grid point
    torch.testing.assert_close(states[-1].flatten(1), g.denoise(g.flow(z_T, GRID[0], GRID[-1]), GRID[-1]),
                               rtol=1e-6, atol=1e-7)
    plain = sample(make_scheduler("gaussian-ei", solver_order=order), model, x_T, sigmas=GRID)
    assert (plain - states[-1]).abs().max() > 1e-3  # without the statistics the steps are not exact


def test_third_order_with_the_data_statistics_on_the_closed_form_model():
    from test_convergence import observed_order

    path = str(teleport_file("reference:digits"))
    slope = observed_order(lambda: make_scheduler("gaussian-ei", {"use_lu_lambdas": True}, gaussian_path=path),
                           (80, 160, 320))
    assert slope >= 3 - 0.3, f"observed order {slope:.2f}"


def test_the_statistics_lower_a_few_step_error_on_the_closed_form_model():
    model = digits_reference_model({})
    x_T = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    from diffalign.models import solve_reference

    exact = solve_reference(model, x_T, GRID[0], 0.0)
    plain = sample(make_scheduler("gaussian-ei"), model, x_T, sigmas=GRID)
    gaussian = sample(make_scheduler("gaussian-ei", gaussian_path=str(teleport_file("reference:digits"))), model,
                      x_T, sigmas=GRID)
    assert torch.mean((gaussian - exact) ** 2) < 0.5 * torch.mean((plain - exact) ** 2)


def test_config_round_trip_and_bad_input(tmp_path):
    path = str(teleport_file("reference:digits"))
    sched = make_scheduler("gaussian-ei", gaussian_path=path)
    sched.save_config(tmp_path)
    assert GaussianEIScheduler.from_pretrained(tmp_path).config.gaussian_path == path
    with pytest.raises(ValueError, match="solver_order"):
        make_scheduler("gaussian-ei", solver_order=4)
    with pytest.raises(FileNotFoundError, match="calibrate teleport"):
        make_scheduler("gaussian-ei", gaussian_path=str(tmp_path / "missing.safetensors"))
    sched.set_timesteps(sigmas=GRID)
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="calibrate teleport"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x)

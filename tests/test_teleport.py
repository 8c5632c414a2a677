"""The Gaussian teleport: exact flow of a Gaussian, its low-rank statistics, and sampling with it."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.samplers import make_scheduler
from diffalign.samplers.teleport import GaussianTeleport, LowRankGaussian, teleport_grid


def _gaussian(dim: int = 12, rank: int = 4, seed: int = 0) -> LowRankGaussian:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    lam = torch.linspace(3.0, 0.5, rank, dtype=torch.float64)
    return LowRankGaussian(torch.randn(dim, generator=gen, dtype=torch.float64), q[:, :rank], lam,
                           torch.tensor(0.1, dtype=torch.float64))


def _dense(g: LowRankGaussian) -> torch.Tensor:
    dim = len(g.mu)
    return g.U @ torch.diag(g.lam) @ g.U.T + g.rho * (torch.eye(dim, dtype=torch.float64) - g.U @ g.U.T)


def _sqrtm(c: torch.Tensor, power: float) -> torch.Tensor:
    w, v = torch.linalg.eigh(c)
    return v @ torch.diag(w**power) @ v.T


def test_flow_and_denoiser_match_the_dense_gaussian_formulas():
    g = _gaussian()
    c, eye = _dense(g), torch.eye(len(g.mu), dtype=torch.float64)
    z = torch.randn(5, len(g.mu), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 9
    for a, b in ((80.0, 3.0), (5.0, 0.2)):
        # z(b) = mu + (C + b^2)^(1/2) (C + a^2)^(-1/2) (z(a) - mu)
        expected = g.mu + (z - g.mu) @ (_sqrtm(c + b**2 * eye, 0.5) @ _sqrtm(c + a**2 * eye, -0.5)).T
        torch.testing.assert_close(g.flow(z, a, b), expected, rtol=1e-10, atol=1e-10)
        # D(z, s) = mu + C (C + s^2)^-1 (z - mu)
        expected = g.mu + (z - g.mu) @ (c @ torch.linalg.inv(c + a**2 * eye)).T
        torch.testing.assert_close(g.denoise(z, a), expected, rtol=1e-10, atol=1e-10)


def test_the_flow_solves_the_probability_flow_ode():
    """dz / d sigma = (z - D(z, sigma)) / sigma, checked by a central difference of the closed form."""
    g = _gaussian(seed=2)
    z = torch.randn(3, len(g.mu), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    a, s, h = 4.0, 1.5, 1e-5
    z_s = g.flow(z, a, s)
    derivative = (g.flow(z, a, s + h) - g.flow(z, a, s - h)) / (2 * h)
    torch.testing.assert_close(derivative, (z_s - g.denoise(z_s, s)) / s, rtol=1e-6, atol=1e-7)


def test_flow_keeps_the_noisy_marginals():
    """z ~ N(mu, C + sigma_a^2 I) carried to sigma_b is N(mu, C + sigma_b^2 I): the ODE's defining property."""
    g = _gaussian(dim=3, rank=2, seed=2)
    c, eye = _dense(g), torch.eye(3, dtype=torch.float64)
    z_a = g.mu + torch.randn(200000, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) @ (
        torch.linalg.cholesky(c + 50.0**2 * eye).T)
    z_b = g.flow(z_a, 50.0, 1.5)
    torch.testing.assert_close(z_b.mean(0), g.mu, atol=0.3, rtol=0)
    torch.testing.assert_close(torch.cov(z_b.T), c + 1.5**2 * eye, rtol=0.03, atol=0.1)


def test_guided_rk4_path_reduces_to_the_closed_form():
    """The guided denoiser D_u + g (D_c - D_u) is D_c when the class Gaussian is the unconditional one, and D_u at
    g = 0: both paths then have a closed form, which the RK4 integration must reproduce."""
    u, c = _gaussian(seed=4), _gaussian(seed=5)
    x = torch.randn(4, 1, 3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    same = GaussianTeleport(u, [u, u], (1, 3, 4))
    torch.testing.assert_close(same(x, 30.0, 0.8, labels, guidance=7.5), same(x, 30.0, 0.8, labels, guidance=1.0),
                               rtol=1e-7, atol=1e-7)
    mixed = GaussianTeleport(u, [c, c], (1, 3, 4))
    torch.testing.assert_close(mixed(x, 30.0, 0.8, labels, guidance=0.0), mixed(x, 30.0, 0.8), rtol=1e-7, atol=1e-7)
    # guidance extrapolates from the unconditional path: a larger g ends farther from it
    gaps = [float((mixed(x, 30.0, 0.8, labels, guidance=w) - mixed(x, 30.0, 0.8)).norm()) for w in (2.0, 5.0)]
    assert 0 < gaps[0] < gaps[1]


def test_fit_keeps_the_top_eigenpairs_and_the_trace():
    gen = torch.Generator().manual_seed(7)
    data = torch.randn(500, 10, generator=gen, dtype=torch.float64) @ torch.randn(10, 10, generator=gen,
                                                                                   dtype=torch.float64)
    cov = torch.cov(data.T)
    full, low = LowRankGaussian.fit(data), LowRankGaussian.fit(data, rank=3)
    torch.testing.assert_close(_dense(full), cov)
    torch.testing.assert_close(low.lam, torch.linalg.eigvalsh(cov).flip(0)[:3])
    torch.testing.assert_close(torch.trace(_dense(low)), torch.trace(cov))
    torch.testing.assert_close(low.U.T @ low.U, torch.eye(3, dtype=torch.float64))


def test_save_and_load_round_trip(tmp_path):
    data = torch.randn(200, 1, 4, 4, generator=torch.Generator().manual_seed(8))
    labels = torch.arange(200) % 3
    tp = GaussianTeleport.fit(data, labels, rank=5)
    path = tp.save(tmp_path / "t.safetensors", model="test")
    back = GaussianTeleport.load(path)
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    assert back.shape == (1, 4, 4) and len(back.classes) == 3 and back.rank == 5
    torch.testing.assert_close(back(x, 50.0, 2.0, labels[:6], 4.0), tp(x, 50.0, 2.0, labels[:6], 4.0),
                               rtol=1e-4, atol=1e-5)


def test_bad_input_gets_a_clear_error(tmp_path):
    tp = GaussianTeleport.fit(torch.randn(50, 1, 2, 2), rank=None)
    with pytest.raises(ValueError, match="shape"):
        tp(torch.randn(2, 1, 3, 3), 10.0, 1.0)
    with pytest.raises(ValueError, match="high to low"):
        tp(torch.randn(2, 1, 2, 2), 1.0, 10.0)
    with pytest.raises(ValueError, match="no class Gaussians"):
        tp(torch.randn(2, 1, 2, 2), 10.0, 1.0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        GaussianTeleport.fit(torch.randn(5, 4), torch.tensor([0, 0, 0, 0, 1]))
    with pytest.raises(FileNotFoundError, match="calibrate teleport"):
        GaussianTeleport.load(tmp_path / "missing.safetensors")
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    with pytest.raises(ValueError, match="multistep"):
        teleport_grid(make_scheduler("pndm", config), 4)  # a warm-up: more evaluations than grid points
    with pytest.raises(ValueError, match="explicit sigmas"):
        teleport_grid(make_scheduler("dpm-solver", config), 4)  # singlestep: adds its own intermediate points
    with pytest.raises(ValueError, match="init_noise_sigma"):
        teleport_grid(make_scheduler("diffusers:EulerDiscreteScheduler", config), 4)


def test_statistics_files_are_read_once_per_version(tmp_path):
    import os

    from diffalign.models.sampler_data import load_teleport

    data = torch.randn(50, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    path = GaussianTeleport.fit(data, rank=2).save(tmp_path / "t.safetensors")
    first = load_teleport("any", str(path))
    assert load_teleport("any", path) is first  # a pipeline called in a loop does not re-read the file
    GaussianTeleport.fit(data + 1.0, rank=2).save(path)
    os.utime(path, ns=(1, first_mtime := os.stat(path).st_mtime_ns + 10**9))
    again = load_teleport("any", path)
    assert again is not first and os.stat(path).st_mtime_ns == first_mtime
    torch.testing.assert_close(again.uncond.mu, first.uncond.mu + 1.0)
    with pytest.raises(FileNotFoundError, match="calibrate teleport"):
        load_teleport("any", tmp_path / "missing.safetensors")
    from diffalign.samplers import GaussianEIScheduler

    # the Gaussian integrator built in a loop shares the statistics too
    assert GaussianEIScheduler(gaussian_path=str(path))._gaussian is again


def test_start_is_the_grid_then_the_teleport():
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    tp = GaussianTeleport.fit(torch.randn(80, 1, 2, 2, generator=torch.Generator().manual_seed(4)), rank=None)
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    sched = make_scheduler("dc-solver", config)
    out, sigmas = tp.start(sched, x, 4)
    grid = teleport_grid(make_scheduler("dc-solver", config), 4)
    assert sigmas == grid[1:] and len(sigmas) == 4
    torch.testing.assert_close(out, tp(x, grid[0], grid[1]))


def test_teleport_grid_is_the_next_longer_default_grid():
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    sched = make_scheduler("dpm-solver++", config)
    grid = teleport_grid(sched, 5)
    sched.set_timesteps(6)
    assert grid == [float(s) for s in sched.sigmas[:-1]] and len(grid) == 6
    assert math.isclose(grid[0], max(grid))


def test_teleport_lowers_a_few_step_samplers_error_on_the_closed_form_model():
    """On the exact model the only errors are the sampler's: the teleport takes the first, high-noise step exactly
    (up to the data's non-Gaussianity there), so NFE 5 after it beats NFE 5 from the noise."""
    from diffalign.eval.sampler_bench import bench_samplers
    from diffalign.models.registry import load_model
    from diffalign.samplers.teleport import fit_model_teleport

    named = load_model("reference:digits")
    tp = fit_model_teleport(named, 4000, rank=None, progress=False)
    for guidance in (1.0, 3.0):
        mse = {r.sampler: r.mse for r in bench_samplers(named, ["dpm-solver++", "unipc"], [5], guidance, num_images=8,
                                                         grids=("default", "teleport"), teleport=tp, progress=False)}
        for name in ("dpm-solver++", "unipc"):
            assert mse[f"{name}@teleport"] < 0.9 * mse[name], (guidance, mse)


def test_the_command_line_fits_samples_and_benchmarks_with_the_teleport(tmp_path, capsys):
    from diffalign.cli import main

    stats = tmp_path / "tp.safetensors"
    assert main(["calibrate", "teleport", "--model", "reference:digits", "--num-datapoints", "500", "--rank", "8",
                 "--out", str(stats), "--quiet"]) == 0
    back = GaussianTeleport.load(stats)
    assert back.rank == 8 and len(back.classes) == 10 and back.shape == (1, 8, 8)
    assert main(["sample", "--model", "reference:digits", "--steps", "4", "--num-images", "2", "--prompt", "3",
                 "--guidance", "2", "--teleport", str(stats), "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["bench", "samplers", "--model", "reference:digits", "--samplers", "dpm-solver++", "--nfe", "4",
                 "--num-images", "2", "--grids", "default,teleport", "--teleport", str(stats), "--quiet"]) == 0
    assert "dpm-solver++@teleport" in capsys.readouterr().out
    assert main(["calibrate", "teleport", "--model", "reference:digits", "--rank", "-1", "--out", str(stats)]) == 2
    assert "--rank must be >= 0" in capsys.readouterr().err
    assert main(["eval", "fid", "--images", str(tmp_path), "--features", "classifier:builtin:digits",
                 "--teleport"]) == 2
    assert "--teleport samples a registry model" in capsys.readouterr().err


def test_sampling_with_the_teleport_spends_steps_evaluations(monkeypatch):
    from diffalign.models.registry import load_model
    from diffalign.models.sampler_data import load_teleport
    from diffalign.sampling import sample_images

    named = load_model("reference:digits")
    calls = []
    predict = named.predict
    monkeypatch.setattr(named, "predict", lambda *a: calls.append(1) or predict(*a))
    tp = GaussianTeleport.fit(named.model.denoiser.data, named.model.denoiser.labels, rank=16)
    with_tp = sample_images(named, "dpm-solver++", 4, 3, label=2, guidance=2.0, progress=False, teleport=tp)
    assert len(calls) == 4 and with_tp.shape == (3, 1, 8, 8)
    plain = sample_images(named, "dpm-solver++", 4, 3, label=2, guidance=2.0, progress=False)
    assert not torch.allclose(with_tp, plain)
    with pytest.raises(FileNotFoundError, match="calibrate teleport"):
        load_teleport("builtin:nothing", True)


def test_the_pipeline_teleports_as_sample_images_does():
    from diffalign.models.registry import load_model
    from diffalign.pipelines.class_conditional import builtin_pipeline
    from diffalign.sampling import initial_noise, sample_images

    pipe = builtin_pipeline("builtin:digits")
    noise = initial_noise((1, 8, 8), [0, 1, 2])
    kwargs = {"class_labels": [3], "num_images_per_prompt": 3, "guidance_scale": 2.0, "num_inference_steps": 5,
              "latents": noise, "output_type": "pt", "shipped_sampler_data": False}
    teleported = pipe(**kwargs, teleport=True).images
    expected = sample_images(load_model("builtin:digits"), "dpm-solver++", 5, 3, label=3, guidance=2.0,
                             progress=False, teleport=True)
    torch.testing.assert_close(teleported, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(teleported, pipe(**kwargs).images, atol=1e-3)
    pipe.register_to_config(model_name=None)
    with pytest.raises(ValueError, match="model_name"):
        pipe(**kwargs, teleport=True)


def test_grids_searched_with_the_teleport_are_written_read_and_benchmarked(tmp_path, capsys, monkeypatch):
    """`calibrate timesteps --teleport` searches NFE + 1 points with the teleport over the first stretch; the file
    is what teleported sampling and `bench samplers --grids teleport-searched` read."""
    import json

    from diffalign.cli import main
    from diffalign.models import sampler_data
    from diffalign.models.registry import load_model
    from diffalign.sampling import sample_images

    out = tmp_path / "gaussian-ei_g1_teleport.json"
    assert main(["calibrate", "timesteps", "--model", "reference:digits", "--sampler", "gaussian-ei", "--nfe", "3",
                 "--teleport", "--max-evaluations", "12", "--num-noises", "4", "--out", str(out), "--quiet"]) == 0
    assert "4 grid points, teleported" in capsys.readouterr().out
    entry = json.loads(out.read_text())["entries"][0]
    assert entry["steps"] == 4 and entry["nfe"] == 3 and entry["teleport"] is True
    assert entry["mse"] <= entry["mse_default"]
    # teleport_grid reads the searched grid for 3 evaluations
    sched = make_scheduler("gaussian-ei", timesteps_path=str(out))
    assert teleport_grid(sched, 3) == pytest.approx(entry["sigmas"], rel=1e-6)
    # shipped beside the model, sampling with the teleport uses it, and sampling without does not
    monkeypatch.setattr(sampler_data, "SCHEDULES", tmp_path / "schedules")
    shipped = sampler_data.schedule_file("reference:digits", "gaussian-ei", 1.0, teleport=True)
    shipped.parent.mkdir(parents=True)
    shipped.write_text(out.read_text())
    named = load_model("reference:digits")
    assert sampler_data.sampler_overrides(named, "gaussian-ei", 1.0, teleport=True)["timesteps_path"] == str(shipped)
    assert "timesteps_path" not in sampler_data.sampler_overrides(named, "gaussian-ei", 1.0)
    searched = sample_images(named, "gaussian-ei", 3, 2, progress=False, teleport=True)
    default = sample_images(named, "gaussian-ei", 3, 2, progress=False, teleport=True, searched=False)
    assert not torch.allclose(searched, default)
    assert main(["bench", "samplers", "--model", "reference:digits", "--samplers", "gaussian-ei", "--nfe", "3,4",
                 "--num-images", "2", "--grids", "default,teleport,teleport-searched", "--schedules", str(tmp_path),
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "gaussian-ei@teleport-searched" in table and "gaussian-ei@teleport " in table

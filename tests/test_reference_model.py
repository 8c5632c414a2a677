"""Tests of the closed-form Gaussian-mixture reference model and its ground-truth ODE solver."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from diffalign.models import (
    GaussianMixtureDenoiser,
    NoiseSchedule,
    ReferenceModel,
    digits_reference_model,
    flow_alpha,
    load_digits_tensor,
    solve_probability_flow,
    solve_reference,
    vp_alpha,
)

SCHEDULE_CONFIGS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.fixture(scope="module")
def digits_model() -> ReferenceModel:
    return digits_reference_model()


def brute_force_posterior(data, x, alpha, sigma, s0, labels=None, class_labels=None):
    """Direct float64 transcription of the mixture formulas, one batch element at a time."""
    y = data.reshape(data.shape[0], -1).double()
    xs = x.reshape(x.shape[0], -1).double()
    x0s, epss = [], []
    for b in range(xs.shape[0]):
        a, s = float(alpha[b]), float(sigma[b])
        yy = y if class_labels is None else y[labels == class_labels[b]]
        v = a * a * s0 * s0 + s * s
        diff = xs[b] - a * yy  # [N, D]
        w = torch.softmax(-(diff**2).sum(1) / (2 * v), dim=0)[:, None]
        x0s.append((w * (yy + a * s0 * s0 / v * diff)).sum(0))
        epss.append(s * (w * diff).sum(0) / v)
    return torch.stack(x0s).reshape(x.shape), torch.stack(epss).reshape(x.shape)


# ------------------------------------------------------------------------------------------------ data


def test_load_digits_tensor_has_expected_shapes_range_and_labels():
    images, labels = load_digits_tensor()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert set(labels.tolist()) == set(range(10))
    images64, _ = load_digits_tensor(torch.float64)
    assert images64.dtype == torch.float64
    # grey levels 0..16 map onto the grid -1 + k/8 exactly
    assert torch.equal(images64, torch.round((images64 + 1) * 8) / 8 - 1)


# ----------------------------------------------------------------------------------------- posterior


@pytest.mark.parametrize("conditional", [False, True])
def test_posterior_matches_brute_force_formulas_in_float64(conditional):
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(50, 2, 3, 3, generator=gen, dtype=torch.float64)
    labels = torch.arange(50) % 3
    s0 = 0.4
    den = GaussianMixtureDenoiser(data, labels, component_std=s0, chunk_size=7)  # several chunks
    alpha = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.99, 0.7], dtype=torch.float64)
    sigma = torch.tensor([0.0, 0.3, 0.8, 0.99, 0.05, 2.0], dtype=torch.float64)
    x0_true = data[torch.randint(0, 50, (6,), generator=gen)]
    x = alpha.view(-1, 1, 1, 1) * x0_true + sigma.view(-1, 1, 1, 1) * torch.randn(
        x0_true.shape, generator=gen, dtype=torch.float64
    )
    cls = torch.tensor([0, 1, 2, 2, 1, 0]) if conditional else None
    x0, eps = den.posterior(x, alpha, sigma, class_labels=cls)
    x0_bf, eps_bf = brute_force_posterior(data, x, alpha, sigma, s0, labels, cls)
    torch.testing.assert_close(x0, x0_bf, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(eps, eps_bf, rtol=1e-11, atol=1e-11)
    # one chunk gives the same result as many
    den_one = GaussianMixtureDenoiser(data, labels, component_std=s0, chunk_size=4096)
    x0_one, eps_one = den_one.posterior(x, alpha, sigma, class_labels=cls)
    torch.testing.assert_close(x0_one, x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_one, eps, rtol=1e-12, atol=1e-12)


def test_posterior_pair_satisfies_forward_identity(digits_model):
    den = digits_model.denoiser
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 8, 8, generator=gen, dtype=torch.float64)
    alpha = torch.tensor([0.999, 0.8, 0.5, 0.2, 0.01], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    x0, eps = den.posterior(x, alpha, sigma)
    torch.testing.assert_close(
        alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps, x, rtol=0, atol=1e-12
    )


def test_posterior_limits_sigma_zero_and_alpha_zero(digits_model):
    den = digits_model.denoiser
    images, labels = load_digits_tensor(torch.float64)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    # sigma = 0: noiseless, eps = 0 and x0 = x / alpha
    x0, eps = den.posterior(x, 0.7, 0.0)
    assert torch.all(eps == 0)
    torch.testing.assert_close(x0, x / 0.7, rtol=1e-14, atol=1e-14)
    # at a data point with sigma = 0 the posterior mean is that point
    x0, eps = den.posterior(images[:3], 1.0, 0.0)
    torch.testing.assert_close(x0, images[:3], rtol=0, atol=1e-14)
    # alpha = 0: pure noise, x0 = (class) data mean and eps = x / sigma
    x0, eps = den.posterior(x, 0.0, 1.5)
    torch.testing.assert_close(x0, images.mean(0, keepdim=True).expand_as(x), rtol=0, atol=1e-13)
    torch.testing.assert_close(eps, x / 1.5, rtol=1e-14, atol=1e-14)
    cls = torch.tensor([3, 7, 7])
    x0, _ = den.posterior(x, 0.0, 1.0, class_labels=cls)
    for b in range(3):
        torch.testing.assert_close(x0[b], images[labels == cls[b]].mean(0), rtol=0, atol=1e-13)


def test_posterior_in_float32_is_close_to_float64():
    images, labels = load_digits_tensor(torch.float64)
    den64 = GaussianMixtureDenoiser(images, labels)
    den32 = GaussianMixtureDenoiser(images.float(), labels)
    gen = torch.Generator().manual_seed(3)
    x = images[:6] * 0.8 + 0.6 * torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    x0_64, eps_64 = den64.posterior(x, 0.8, 0.6)
    x0_32, eps_32 = den32.posterior(x.float(), 0.8, 0.6)
    assert x0_32.dtype == torch.float32 and eps_32.dtype == torch.float32
    torch.testing.assert_close(x0_32.double(), x0_64, rtol=0, atol=1e-4)
    torch.testing.assert_close(eps_32.double(), eps_64, rtol=0, atol=1e-4)
    # a float32 input to a float64 model is computed in float64 and returned in float32
    x0_mixed, _ = den64.posterior(x.float(), 0.8, 0.6)
    assert x0_mixed.dtype == torch.float32
    torch.testing.assert_close(
        x0_mixed.double(), den64.posterior(x.float().double(), 0.8, 0.6)[0], rtol=0, atol=1e-6
    )


def test_posterior_rejects_classes_without_points(digits_model):
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError):
        digits_model.denoiser.posterior(x, 0.5, 0.5, class_labels=torch.tensor([11]))


# ------------------------------------------------------------------------------------------- model


def test_prediction_types_are_mutually_consistent():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([999.0, 500.25, 37.5, 0.0], dtype=torch.float64)
    outs = {
        p: digits_reference_model(prediction_type=p)(x, t)
        for p in ("epsilon", "sample", "v_prediction", "flow_prediction")
    }
    schedule = NoiseSchedule.from_config({})
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
    eps, x0 = outs["epsilon"], outs["sample"]
    torch.testing.assert_close(alpha * x0 + sigma * eps, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(outs["v_prediction"], alpha * eps - sigma * x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(outs["flow_prediction"], eps - x0, rtol=0, atol=1e-12)
    # x0 recovered from v: x0 = alpha x - sigma v
    torch.testing.assert_close(alpha * x - sigma * outs["v_prediction"], x0, rtol=0, atol=1e-12)


def test_model_accepts_scalar_python_and_per_element_timesteps(digits_model):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    a = digits_model(x, 250)
    b = digits_model(x, torch.tensor(250))
    c = digits_model(x, torch.full((3,), 250.0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    alpha, sigma = digits_model.schedule.alpha_sigma(torch.tensor(250.0))
    torch.testing.assert_close(a, digits_model.denoiser.posterior(x, alpha, sigma)[1], rtol=0, atol=0)
    out32 = digits_model(x.float(), 250)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), a, rtol=0, atol=1e-5)


def test_guided_prediction_is_linear_in_guidance_scale():
    model = digits_reference_model(prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor(600.0)
    cls = torch.tensor([0, 1, 2, 3])
    uncond, cond = model(x, t), model(x, t, class_labels=cls)
    torch.testing.assert_close(model.guided(x, t, cls, 1.0), cond, rtol=0, atol=1e-13)
    torch.testing.assert_close(model.guided(x, t, cls, 0.0), uncond, rtol=0, atol=1e-13)
    torch.testing.assert_close(
        model.guided(x, t, cls, 4.0), uncond + 4.0 * (cond - uncond), rtol=0, atol=1e-12
    )
    assert (cond - uncond).abs().max() > 1e-3  # the conditioning actually matters


# ---------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("name", list(SCHEDULE_CONFIGS))
def test_noise_schedule_alphas_cumprod_equals_diffusers(name):
    cfg = SCHEDULE_CONFIGS[name]
    ddpm = DDPMScheduler(**cfg)
    schedule = NoiseSchedule.from_config(ddpm.config)
    assert schedule.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(schedule.alphas_cumprod, ddpm.alphas_cumprod.double(), rtol=0, atol=0)
    sigmas = ((1 - ddpm.alphas_cumprod.double()) / ddpm.alphas_cumprod.double()).sqrt()
    torch.testing.assert_close(schedule.sigma_hat(torch.arange(1000)), sigmas, rtol=1e-12, atol=0)


def test_zero_terminal_snr_schedule_matches_dpmsolver():
    sched = DPMSolverMultistepScheduler(rescale_betas_zero_snr=True)
    schedule = NoiseSchedule.from_config(sched.config)
    torch.testing.assert_close(schedule.alphas_cumprod, sched.alphas_cumprod.double(), rtol=0, atol=0)
    assert schedule.sigma_hat(999.0).item() == pytest.approx(math.sqrt(2.0**24 - 1), rel=1e-12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", list(SCHEDULE_CONFIGS))
def test_sigma_hat_inverts_dpmsolver_sigma_to_t(name):
    sched = DPMSolverMultistepScheduler(**SCHEDULE_CONFIGS[name], use_karras_sigmas=True)
    sched.set_timesteps(25)
    schedule = NoiseSchedule.from_config(sched.config)
    abar = sched.alphas_cumprod.numpy()
    log_sigmas = np.log(((1 - abar) / abar) ** 0.5)
    sigmas = sched.sigmas.numpy().astype(np.float64)[:-1]  # drop the final zero
    t = np.array([sched._sigma_to_t(s, log_sigmas) for s in sigmas], dtype=np.float64)
    assert np.any(np.abs(t - np.round(t)) > 1e-3)  # genuinely fractional timesteps
    sh = schedule.sigma_hat(torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(sh, sigmas, rtol=1e-6)


def test_flow_matching_schedule():
    schedule = NoiseSchedule.from_config({"use_flow_sigmas": True})
    t = torch.tensor([0.0, 250.0, 999.5, 1000.0])
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(sigma, t.double() / 1000)
    torch.testing.assert_close(alpha, 1 - t.double() / 1000)
    torch.testing.assert_close(schedule.sigma_hat(t[:3]), (sigma / alpha)[:3])
    assert NoiseSchedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler"}).use_flow_sigmas
    # pure noise at t = N: the model returns eps = x and x0 = data mean
    model = digits_reference_model({"use_flow_sigmas": True}, prediction_type="flow_prediction")
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    mean = model.denoiser.data.mean(0, keepdim=True)
    torch.testing.assert_close(model(x, 1000.0), x - mean, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------- ODE solve


def single_gaussian_oracle(mu, x_tilde_T, s0, sh_T, sh):
    return mu + (x_tilde_T - mu) * math.sqrt((s0**2 + sh**2) / (s0**2 + sh_T**2))


@pytest.mark.parametrize("sigma_hat_end", [0.0, 0.7])
@pytest.mark.parametrize("flow", [False, True])
def test_solve_probability_flow_matches_single_gaussian_oracle(sigma_hat_end, flow):
    s0, sh_T = 0.3, 150.0
    gen = torch.Generator().manual_seed(7)
    mu = torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64)
    den = GaussianMixtureDenoiser(mu, component_std=s0)
    x_tilde_T = mu + sh_T * torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    alpha_map = flow_alpha if flow else vp_alpha

    calls = []

    def eps_fn(x, alpha, sigma):
        calls.append((alpha, sigma))
        return den.posterior(x, alpha, sigma)[1]

    x_end = solve_probability_flow(
        eps_fn, alpha_map(sh_T) * x_tilde_T, sh_T, sigma_hat_end, alpha_of_sigma_hat=alpha_map
    )
    expected = alpha_map(sigma_hat_end) * single_gaussian_oracle(mu, x_tilde_T, s0, sh_T, sigma_hat_end)
    assert (x_end - expected).abs().max().item() < 1e-8
    # eps_fn sees the requested scaling
    for alpha, sigma in calls[:5]:
        sh = sigma / alpha
        assert alpha == pytest.approx(alpha_map(sh), rel=1e-14)


def test_solve_reference_to_zero_is_finite_and_accepts_float32(digits_model):
    gen = torch.Generator().manual_seed(8)
    sh_T = float(digits_model.schedule.sigma_hat(999))
    x_T = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    x64 = solve_reference(digits_model, x_T, sh_T, 0.0)
    assert x64.dtype == torch.float64 and torch.isfinite(x64).all()
    # the end point is a denoised sample: within a few component stds of a data point
    data = digits_model.denoiser.data.reshape(1797, -1)
    dist = torch.cdist(x64.reshape(4, -1), data).min(1).values
    assert (dist < 5 * 0.3 * 8).all()
    x32 = solve_reference(digits_model, x_T.float(), sh_T, 0.0)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.double(), x64, rtol=0, atol=1e-5)


def test_solve_reference_guidance_one_equals_conditional_solution(digits_model):
    gen = torch.Generator().manual_seed(9)
    x_T = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    cls = torch.tensor([1, 4, 8])
    den = digits_model.denoiser

    def cond_eps(x, alpha, sigma):
        return den.posterior(x, alpha, sigma, cls)[1]

    expected = solve_probability_flow(cond_eps, x_T, 40.0, 0.0)
    guided_one = solve_reference(digits_model, x_T, 40.0, 0.0, class_labels=cls, guidance_scale=1.0)
    torch.testing.assert_close(guided_one, expected, rtol=0, atol=0)
    uncond = solve_reference(digits_model, x_T, 40.0, 0.0)
    assert (uncond - expected).abs().max() > 1e-2
    with pytest.raises(ValueError):
        solve_reference(digits_model, x_T, 40.0, 0.0, guidance_scale=2.0)


def test_solve_reference_flow_matching_agrees_with_vp_in_ve_coordinates():
    """The ODE in (x / alpha, sigma_hat) is schedule independent, so VP and flow solutions coincide."""
    vp = digits_reference_model()
    fm = digits_reference_model({"use_flow_sigmas": True}, prediction_type="flow_prediction")
    gen = torch.Generator().manual_seed(10)
    sh_T = 20.0
    x_tilde_T = sh_T * torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_vp = solve_reference(vp, vp_alpha(sh_T) * x_tilde_T, sh_T, 0.5)
    x_fm = solve_reference(fm, flow_alpha(sh_T) * x_tilde_T, sh_T, 0.5)
    torch.testing.assert_close(x_vp / vp_alpha(0.5), x_fm / flow_alpha(0.5), rtol=0, atol=1e-8)

"""PNDM (Liu et al. 2022): diffusers' PNDMScheduler, the authors' S-PNDM rule, convergence orders, config."""

import math

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler as DiffusersPNDM

from diffalign.samplers import DDIMScheduler, PNDMScheduler, sample
from diffalign.samplers.loop import count_evaluations

X_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def linear_model(x, t):
    """diffusers' dummy model."""
    return x * t / (t + 1)


def nonlinear_model(x, t):
    return x * t / (t + 1) + 0.1 * torch.sin(3 * x) * math.cos(float(t) / 300)


def diffusers_float64(**config) -> DiffusersPNDM:
    """diffusers' PNDMScheduler with its alphas in float64, so its formula 9 runs in float64 like ours."""
    sched = DiffusersPNDM(**config)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    return sched


def final_sigmas_type(set_alpha_to_one: bool) -> str:
    """diffusers' PNDM ends at alphabar = 1 (sigma = 0) or at alphabar_0 (our sigma_min)."""
    return "zero" if set_alpha_to_one else "sigma_min"


# ---------------------------------------------------------------------- diffusers
@pytest.mark.parametrize("warmup, skip_prk_steps", [("plms", True), ("f-pndm", False)])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("steps", [10, 20])  # trailing grids where t - 1000 // steps is the next grid point
@pytest.mark.parametrize("model", [linear_model, nonlinear_model])
def test_matches_diffusers_pndm_on_trailing_grids_float64(warmup, skip_prk_steps, set_alpha_to_one, steps,
                                                          model):
    theirs = diffusers_float64(skip_prk_steps=skip_prk_steps, set_alpha_to_one=set_alpha_to_one,
                               timestep_spacing="trailing")
    for discrete in (False, True):  # the Runge-Kutta midpoints are integers on these grids
        ours = PNDMScheduler(warmup=warmup, timestep_spacing="trailing", discrete_timesteps=discrete,
                             final_sigmas_type=final_sigmas_type(set_alpha_to_one))
        got, expected = sample(ours, model, X_T, steps), sample(theirs, model, X_T, steps)
        assert torch.equal(ours.timesteps, theirs.timesteps)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert (got - expected).abs().max() < 1e-6  # same math: only our float32 sigmas (~1e-7) differ


@pytest.mark.parametrize("warmup, skip_prk_steps", [("plms", True), ("f-pndm", False)])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_matches_diffusers_leading_grid_given_as_custom_timesteps(warmup, skip_prk_steps, set_alpha_to_one):
    """diffusers' PNDM "leading" grid (steps_offset=1: 901, 801, ..., 1) is not our "leading" grid (diffusers'
    DPM-Solver convention); passed as custom timesteps it gives the same trajectory."""
    theirs = diffusers_float64(skip_prk_steps=skip_prk_steps, set_alpha_to_one=set_alpha_to_one,
                               steps_offset=1)
    expected = sample(theirs, nonlinear_model, X_T, 10)
    ours = PNDMScheduler(warmup=warmup, final_sigmas_type=final_sigmas_type(set_alpha_to_one))
    ours.set_timesteps(timesteps=list(range(901, 0, -100)))
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x = X_T
    for t in ours.timesteps:
        x = ours.step(nonlinear_model(x, t), t, x).prev_sample
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("warmup, skip_prk_steps", [("plms", True), ("f-pndm", False)])
def test_matches_diffusers_pndm_step_in_float32(warmup, skip_prk_steps):
    theirs = DiffusersPNDM(skip_prk_steps=skip_prk_steps, timestep_spacing="trailing", set_alpha_to_one=True)
    ours = PNDMScheduler(warmup=warmup, timestep_spacing="trailing")
    x_T = X_T.float()
    got, expected = sample(ours, nonlinear_model, x_T, 25), sample(theirs, nonlinear_model, x_T, 25)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_f_pndm_discrete_midpoints_are_diffusers_prk_timesteps():
    """With an odd step ratio (1000 // 40 = 25) the midpoint is diffusers' integer t_next + 25 // 2."""
    theirs = DiffusersPNDM(timestep_spacing="trailing")
    theirs.set_timesteps(40)
    ours = PNDMScheduler(warmup="f-pndm", timestep_spacing="trailing", discrete_timesteps=True)
    ours.set_timesteps(40)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    continuous = PNDMScheduler(warmup="f-pndm", timestep_spacing="trailing")
    continuous.set_timesteps(40)
    assert continuous.timesteps[1].item() == 986.5 and continuous.timesteps.dtype == torch.float32


@pytest.mark.parametrize("warmup, evaluations", [("f-pndm", 10 + 9), ("s-pndm", 10 + 1), ("plms", 10 + 1)])
def test_model_evaluations_per_warmup(warmup, evaluations):
    sched = PNDMScheduler(warmup=warmup)
    assert count_evaluations(sched, 10) == evaluations
    assert sched.num_inference_steps == 10 and len(sched.sigmas) == evaluations + 1


# ---------------------------------------------------------------------- the method
def grid_levels(steps: int, **config):
    """Noise levels of the grid points (DDIM makes one evaluation per grid point on the same grid)."""
    ddim = DDIMScheduler(**config)
    ddim.set_timesteps(steps)
    return ddim.noise_levels


def phi(x, e, s, t):
    """Formula 9 in its DDIM form."""
    return t.alpha * (x - s.sigma * e) / s.alpha + t.sigma * e


@pytest.mark.parametrize("warmup", ["f-pndm", "s-pndm", "plms"])
def test_every_warmup_is_ddim_when_the_model_output_is_constant(warmup):
    """With e2 = e1 (and all outputs equal) every gradient part returns e: PNDM reduces to DDIM."""
    eps = torch.randn(X_T.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    config = {"timestep_spacing": "trailing"}

    def constant(x, t):
        return eps

    ddim = DDIMScheduler(**config)
    ddim.set_timesteps(10)
    first_ddim_step = ddim.step(eps, ddim.timesteps[0], X_T).prev_sample
    pndm = PNDMScheduler(warmup=warmup, **config)
    pndm.set_timesteps(10)
    x = X_T
    for _ in range(4 if warmup == "f-pndm" else 2):  # the evaluations of the first (warm-up) step
        x = pndm.step(eps, pndm.timesteps[pndm.step_index or 0], x).prev_sample
    torch.testing.assert_close(x, first_ddim_step, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample(pndm, constant, X_T, 10), sample(ddim, constant, X_T, 10),
                               rtol=1e-12, atol=1e-12)


def test_s_pndm_is_improved_euler_then_second_order_multistep():
    """The authors' S-PNDM (gen_order_2): e' = (e1 + e2) / 2 with e2 at phi(x, e1, t0, t1); then
    e' = (3 e_t - e_{t-d}) / 2, where the history holds e1, not e2 (a model of t only tells them apart)."""
    config = {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}

    def f(t):
        return torch.full_like(X_T, math.cos(float(t) / 200))

    grid = grid_levels(8, **config)
    times = DDIMScheduler(**config)
    times.set_timesteps(8)
    e = [f(t) for t in times.timesteps]
    x = phi(X_T, (e[0] + e[1]) / 2, grid[0], grid[1])
    for k in range(1, 8):
        x = phi(x, (3 * e[k] - e[k - 1]) / 2, grid[k], grid[k + 1])
    got = sample(PNDMScheduler(warmup="s-pndm", **config), lambda x, t: f(t), X_T, 8)
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("warmup", ["f-pndm", "plms"])
@pytest.mark.parametrize("prediction_type, flow", [("sample", False), ("v_prediction", False)])
def test_prediction_types_give_the_same_trajectory(warmup, prediction_type, flow):
    """The same model expressed as eps, x0, v or flow velocity: outputs are converted to eps at each point."""
    mu, s0 = 0.3, 0.7

    def run(kind):
        sched = PNDMScheduler(warmup=warmup, prediction_type=kind, use_flow_sigmas=flow,
                              timestep_spacing="trailing")
        sched.set_timesteps(12)
        x = X_T
        for t in sched.timesteps:
            lvl = sched.noise_levels[sched.step_index or 0]
            a, s = lvl.alpha, lvl.sigma
            eps = s * (x - a * mu) / (a * a * s0 * s0 + s * s)
            x0 = (x - s * eps) / a
            v, velocity = a * eps - s * x0, eps - x0
            out = {"epsilon": eps, "sample": x0, "v_prediction": v, "flow_prediction": velocity}
            x = sched.step(out[kind], t, x).prev_sample
        return x

    torch.testing.assert_close(run(prediction_type), run("epsilon"), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------- convergence
MU, S0 = 0.5, 0.5


def gaussian_error(sched: PNDMScheduler, steps: int, mu: float, s0: float) -> tuple[int, float]:
    """(model evaluations, max error) on data N(mu, s0^2 I): exact eps, exact probability-flow solution.

    For x = a x0 + s e: eps(x) = s (x - a mu) / (a^2 s0^2 + s^2), and with x~ = x / a, s~ = s / a the ODE
    solution is x~(s~) = mu + (x~_T - mu) sqrt((s0^2 + s~^2) / (s0^2 + s~_T^2)). The model is evaluated at the
    exact noise level the solver assumes.
    """
    sched.set_timesteps(steps)
    levels = sched.noise_levels
    x = X_T.flatten()
    for t in sched.timesteps:
        lvl = levels[sched.step_index or 0]
        a, s = lvl.alpha, lvl.sigma
        x = sched.step(s * (x - a * mu) / (a * a * s0 * s0 + s * s), t, x).prev_sample
    first, last = levels[0], levels[-1]
    sh_T, sh = first.sigma / first.alpha, last.sigma / last.alpha
    exact = mu + (X_T.flatten() / first.alpha - mu) * math.sqrt((s0**2 + sh**2) / (s0**2 + sh_T**2))
    return len(sched.timesteps), (x / last.alpha - exact).abs().max().item()


def slope(make, steps_list, mu=MU, s0=S0) -> float:
    nfe, err = zip(*(gaussian_error(make(), n, mu, s0) for n in steps_list), strict=True)
    return -np.polyfit(np.log(nfe), np.log(err), 1)[0]


LU = {"use_lu_lambdas": True, "final_sigmas_type": "sigma_min", "beta_schedule": "linear"}


@pytest.mark.parametrize("warmup, low, high", [("s-pndm", 1.8, 2.4), ("plms", 1.8, 2.4),
                                               ("f-pndm", 1.8, 3.2)])
def test_second_order_convergence_on_uniform_log_snr_grids(warmup, low, high):
    """Measured vs NFE: s-pndm 2.08, plms 2.22, f-pndm 2.77 (its 9 extra warm-up evaluations steepen the
    slope at small NFE; its local slopes fall to 2.2 by NFE 100). The fixed multistep weights are those of
    equal steps in sigma / alpha, off by O(d^2) on this grid: global order 2 for every warm-up."""
    order = slope(lambda: PNDMScheduler(warmup=warmup, **LU), (16, 24, 32, 48, 64))
    assert low < order < high, order


class UniformSigmaOverAlphaGrid(PNDMScheduler):
    """PNDM on a grid uniform in s~ = sigma / alpha (diffusers' VE sigma), where PNDM's weights are exact."""

    def _base_grid(self, num_inference_steps, device=None, mu=None, timesteps=None):
        super()._base_grid(num_inference_steps, device, mu, timesteps)
        self.sigmas = torch.linspace(self.sigmas[0].item(), self.sigmas[-1].item(), num_inference_steps + 1)
        self.timesteps = self._continuous_timesteps(self.sigmas[:-1])


@pytest.mark.parametrize("warmup, low, high", [("s-pndm", 1.8, 2.3), ("plms", 3.0, 4.5),
                                               ("f-pndm", 3.0, 4.5)])
def test_classical_orders_on_a_grid_uniform_in_sigma_over_alpha(warmup, low, high):
    """There the pseudo linear multistep is Adams-Bashforth for dx~/ds~ = eps: order 4 for formula 12 (order 2
    for S-PNDM), at least 3 overall with the warm-up steps' O(d^3) local errors. Measured: 2.02, 3.83, 4.12.
    (A wide data distribution, s0 = 20, keeps eps smooth on the scale of the s~ steps, s~_T ~ 157.)"""
    order = slope(lambda: UniformSigmaOverAlphaGrid(warmup=warmup, final_sigmas_type="sigma_min"),
                  (64, 96, 128, 192), mu=1.0, s0=20.0)
    assert low < order < high, order


# ---------------------------------------------------------------------- config and errors
@pytest.mark.parametrize("warmup", ["f-pndm", "s-pndm", "plms"])
def test_save_config_from_pretrained_round_trip_gives_identical_outputs(warmup, tmp_path):
    sched = PNDMScheduler(warmup=warmup, use_karras_sigmas=True, prediction_type="v_prediction")
    sched.save_config(tmp_path)
    loaded = PNDMScheduler.from_pretrained(tmp_path)
    assert loaded.config.warmup == warmup
    assert torch.equal(sample(loaded, nonlinear_model, X_T, 12), sample(sched, nonlinear_model, X_T, 12))


@pytest.mark.parametrize("warmup, steps, need", [("f-pndm", 3, 4), ("s-pndm", 1, 2), ("plms", 1, 2)])
def test_too_few_steps_for_the_warmup_raise(warmup, steps, need):
    sched = PNDMScheduler(warmup=warmup)
    with pytest.raises(ValueError, match=f"num_inference_steps >= {need}.*use more steps or"):
        sched.set_timesteps(steps)
    sched.set_timesteps(need)
    if warmup == "f-pndm":
        with pytest.raises(ValueError, match="warmup='s-pndm'"):
            sched.set_timesteps(timesteps=[900, 500, 100])


def test_invalid_warmup_and_misuse_raise():
    with pytest.raises(ValueError, match="warmup"):
        PNDMScheduler(warmup="rk4")
    sched = PNDMScheduler()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(X_T, 999, X_T)
    sched.set_timesteps(5)
    with pytest.raises(FloatingPointError):
        sched.step(torch.full_like(X_T, float("nan")), sched.timesteps[0], X_T)

"""Searched time steps: the schedule file, every sampler reading it, its refusals, and the search itself."""

import json

import numpy as np
import pytest
import torch

from diffalign.models import digits_reference_model
from diffalign.models.registry import load_model
from diffalign.samplers import SAMPLERS, get_scheduler_class, make_scheduler, sample
from diffalign.samplers.timesteps import (
    lambdas_of,
    optimise_grid,
    params_of,
    schedule_fingerprint,
    search_schedule,
    write_entry,
)

SIGMAS = [157.4, 20.0, 4.0, 1.0, 0.2]


def schedule(path, sampler="dpm-solver++", sigmas=SIGMAS, config=None):
    fingerprint = schedule_fingerprint(make_scheduler(sampler, config or {}).config)
    entry = {"steps": len(sigmas), "nfe": len(sigmas), "sigmas": list(sigmas), "mse": 0.0}
    return write_entry(path, "reference:digits", sampler, 1.0, fingerprint, entry)


MULTISTEP = {name: ({"solver_mode": "multistep"} if name.endswith("dpm-solver") else {}) for name in SAMPLERS}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_on_a_searched_grid_and_keeps_it_through_save_and_load(name, tmp_path):
    path = schedule(tmp_path / "s.json", name, config=MULTISTEP[name])
    sched = make_scheduler(name, MULTISTEP[name], timesteps_path=str(path))
    sched.set_timesteps(5)
    grid_points = sorted({round(float(s), 3) for s in sched.sigmas[:-1]}, reverse=True)
    assert grid_points[0] == pytest.approx(157.4, rel=1e-6) and 0.2 in [round(s, 3) for s in grid_points]
    sched.save_config(tmp_path)
    again = get_scheduler_class(name).from_pretrained(tmp_path)
    assert again.config.timesteps_path == str(path)
    model = digits_reference_model({})
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(sample(again, model, x_T, 5), sample(sched, model, x_T, 5))


def test_the_searched_sigmas_are_the_grid(tmp_path):
    sched = make_scheduler("unipc", timesteps_path=str(schedule(tmp_path / "s.json", "unipc")))
    sched.set_timesteps(5)
    np.testing.assert_allclose(sched.sigmas.numpy(), SIGMAS + [0.0], rtol=1e-6)


@pytest.mark.parametrize(("make", "match"), [
    (lambda p: make_scheduler("unipc", timesteps_path=str(schedule(p, "dpm-solver++"))), "searched for sampler"),
    (lambda p: make_scheduler("dpm-solver++", {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                "beta_end": 0.012}, timesteps_path=str(schedule(p))),
     "another noise schedule"),
    (lambda p: make_scheduler("dpm-solver++", timesteps_path=str(schedule(p, sigmas=[157.4, 4.0, 20.0, 1.0, 0.2]))),
     "strictly decreasing"),
])
def test_a_schedule_for_another_sampler_or_model_or_not_decreasing_is_refused(tmp_path, make, match):
    sched = make(tmp_path / "s.json")
    with pytest.raises(ValueError, match=match):
        sched.set_timesteps(5)


def test_a_step_count_without_a_searched_grid_is_refused_or_falls_back_when_asked(tmp_path):
    path = str(schedule(tmp_path / "s.json"))
    with pytest.raises(ValueError, match=r"has searched grids for \[5\] steps, not 8"):
        make_scheduler("dpm-solver++", timesteps_path=path).set_timesteps(8)
    lenient = make_scheduler("dpm-solver++", timesteps_path=path, timesteps_missing="default")
    lenient.set_timesteps(8)
    plain = make_scheduler("dpm-solver++")
    plain.set_timesteps(8)
    assert torch.equal(lenient.sigmas, plain.sigmas)


def test_dc_solver_ratios_of_the_default_grid_are_not_applied_to_a_searched_one(tmp_path):
    named = load_model("reference:digits")
    overrides = named.sampler_overrides["dc-solver"]
    sched = make_scheduler("dc-solver", {**overrides, "timesteps_path": str(schedule(tmp_path / "s.json",
                                                                                        "dc-solver"))})
    with pytest.raises(ValueError, match="belong to the default grid"):
        sched.set_timesteps(5)


def test_the_parametrisation_is_a_strictly_decreasing_grid_and_inverts():
    rng = np.random.default_rng(0)
    for _ in range(20):
        u = rng.uniform(-4, 4, size=5)
        lam = lambdas_of(u, -5.0, 3.0)
        assert lam[0] == -5.0 and np.all(np.diff(lam) > 0) and lam[-1] < 3.0
        np.testing.assert_allclose(lambdas_of(params_of(lam, -5.0, 3.0), -5.0, 3.0), lam, atol=1e-9)
    np.testing.assert_allclose(np.diff(lambdas_of(np.zeros(4), -5.0, 3.0)), 8.0 / 5)  # u = 0: uniform in logSNR



@pytest.mark.parametrize("method", ["powell", "evolution"])
def test_the_optimiser_finds_a_known_grid_and_keeps_its_evaluation_budget(method):
    # a smooth error with its minimum at a known grid: the optimiser gets there from the logSNR-uniform grid
    target = np.array([-5.0, -2.5, -1.0, 0.5, 2.0])
    error = lambda sigmas: float(np.sum((-np.log(sigmas) - target) ** 2))  # noqa: E731
    seen = []
    best = optimise_grid(error, [np.zeros(4)], -5.0, 3.0, deadline=float("inf"), method=method, max_evaluations=3000,
                         callback=lambda value, best: seen.append(value))
    assert best["start_losses"] == [seen[0]] and best["evaluations"] == len(seen) <= 3000
    assert best["loss"] == min(seen) < 1e-3 * seen[0]
    np.testing.assert_allclose(-np.log(best["sigmas"]), target, atol=0.05)
    assert optimise_grid(error, [np.zeros(4)], -5.0, 3.0, deadline=0.0, method=method)["evaluations"] == 1


EVALS = 120


@pytest.mark.parametrize("method", ["evolution", "powell"])
def test_a_short_search_beats_the_default_and_logsnr_grids_on_the_closed_form_model(method, tmp_path):
    named = load_model("reference:digits")
    entry = search_schedule(named, "dpm-solver++", 5, num_noises=8, minutes=10, max_evaluations=EVALS, method=method,
                            progress=False, state_path=tmp_path / "state.json")
    assert entry["evaluations"] == EVALS  # the evaluation budget, not the clock, ended it
    assert entry["mse"] < 0.8 * min(entry["mse_default"], entry["mse_logsnr_uniform"])
    assert json.loads((tmp_path / "state.json").read_text())["loss"] <= entry["mse_default"]
    sched = make_scheduler("dpm-solver++", named.scheduler_config)
    sched.set_timesteps(sigmas=entry["sigmas"])
    assert len(sched.timesteps) == 5


@pytest.mark.parametrize("method", ["powell", "evolution"])
def test_a_spent_budget_stops_the_search_at_the_next_evaluation(method):
    # the budget runs out while the starting grids are evaluated: the result is the best of them, not one more
    # optimiser iteration (Powell used to finish a whole sweep over every coordinate first)
    named = load_model("reference:digits")
    entry = search_schedule(named, "dpm-solver++", 6, num_noises=4, minutes=1e-5, method=method, progress=False)
    assert entry["mse"] == min(entry["mse_default"], entry["mse_logsnr_uniform"], entry["mse_ays"])


def test_the_reference_solution_is_cached_for_other_nfes_and_recomputed_for_other_noises(tmp_path, monkeypatch):
    named, cache = load_model("reference:digits"), tmp_path / "ref.safetensors"
    first = search_schedule(named, "unipc", 4, num_noises=3, minutes=1e-5, progress=False, reference_cache=cache)
    assert cache.is_file()

    def fail(*_args, **_kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr("diffalign.eval.sampler_bench.reference_solution", fail)
    again = search_schedule(named, "unipc", 4, num_noises=3, minutes=1e-5, progress=False, reference_cache=cache)
    assert again["mse_default"] == first["mse_default"]  # the same reference, read back
    search_schedule(named, "dpm-solver++", 6, num_noises=3, minutes=1e-5, progress=False, reference_cache=cache)
    with pytest.raises(AssertionError, match="recomputed"):  # other noises: not the cached reference
        search_schedule(named, "unipc", 4, num_noises=3, seed=2, minutes=1e-5, progress=False, reference_cache=cache)


def test_a_search_whose_budget_ends_before_it_starts_says_so(tmp_path, capsys):
    from diffalign.cli import main

    out = tmp_path / "unipc_g1.json"
    assert main(["calibrate", "timesteps", "--model", "reference:digits", "--sampler", "unipc", "--nfe", "4",
                 "--num-noises", "2", "--minutes", "1e-6", "--quiet", "--out", str(out)]) == 0
    assert "spent before the search began" in capsys.readouterr().err
    assert (tmp_path / ".reference_g1_n2_s1.safetensors").is_file()


def test_an_interrupted_search_resumes_from_its_saved_grid_and_a_fresh_one_from_the_three_starts(tmp_path):
    named, state = load_model("reference:digits"), tmp_path / "state.json"
    fresh = search_schedule(named, "unipc", 5, num_noises=3, minutes=1e-5, progress=False, state_path=state)
    assert fresh["starts"] == 3 and fresh["evaluations"] == 3
    saved = json.loads(state.read_text())
    saved["u"], saved["loss"] = [0.3, -0.2, 0.1, 0.0], 0.0  # a grid none of the starts is
    state.write_text(json.dumps(saved))
    resumed = search_schedule(named, "unipc", 5, num_noises=3, minutes=1e-5, progress=False, state_path=state)
    assert resumed["starts"] == 4 and resumed["evaluations"] == 4
    state.write_text(json.dumps({**saved, "seed": 7}))  # another search's state is not resumed
    assert search_schedule(named, "unipc", 5, num_noises=3, minutes=1e-5, progress=False,
                           state_path=state)["starts"] == 3


def test_search_refuses_what_it_cannot_search():
    named = load_model("reference:digits")
    with pytest.raises(ValueError, match="singlestep"):
        search_schedule(named, "dpm-solver", 6, minutes=0.01, progress=False)
    with pytest.raises(ValueError, match="unknown search method"):
        search_schedule(named, "dpm-solver++", 5, method="grid", progress=False)


def test_ays_timesteps_are_diffusers_at_ten_steps_and_interpolated_otherwise():
    from diffusers.schedulers.scheduling_utils import AysSchedules

    from diffalign.samplers.timesteps import ays_timesteps

    assert ays_timesteps(10) == AysSchedules["StableDiffusionTimesteps"]
    five = ays_timesteps(5)
    assert five[0] == 999 and five[-1] == 24 and all(a > b for a, b in zip(five, five[1:], strict=False))
    with pytest.raises(ValueError, match="unknown AYS schedule"):
        ays_timesteps(5, "StableDiffusionSigmas")


def test_one_benchmark_run_compares_the_default_logsnr_ays_and_searched_grids(tmp_path):
    from diffalign.eval.sampler_bench import bench_samplers

    named = load_model("reference:digits")
    entry = {"steps": 5, "nfe": 5, "sigmas": SIGMAS, "mse": 0.0}
    write_entry(tmp_path / "dpm-solver++_g1.json", "reference:digits", "dpm-solver++", 1.0,
                schedule_fingerprint(make_scheduler("dpm-solver++", named.scheduler_config).config), entry)
    records = bench_samplers(named, ["dpm-solver++"], [5, 6], num_images=2, progress=False,
                             grids=("default", "logsnr", "ays", "searched"), schedules=tmp_path)
    rows = {(r.sampler, r.nfe) for r in records}
    for label in ("dpm-solver++", "dpm-solver++@logsnr", "dpm-solver++@ays"):
        assert {(label, 5), (label, 6)} <= rows
    assert ("dpm-solver++@searched", 5) in rows and ("dpm-solver++@searched", 6) not in rows  # only where searched
    by = {(r.sampler, r.nfe): r.mse for r in records}
    assert by[("dpm-solver++@searched", 5)] != by[("dpm-solver++", 5)]


def test_shipped_digits_grid_is_used_where_searched_and_beats_the_default_on_held_out_noise():
    """builtin:digits ships UniPC grids searched at guidance 1 and 7.5 on 128 noises of seed 1 (NFE 4-10). Sampling
    looks them up for those guidance scales and step counts only, and on the benchmark's own noise (seed 0) the
    NFE-5 grid at guidance 1 beats the default grid (1.17e-2 against 2.32e-2 on 64 images; the check uses 16)."""
    from diffalign.eval.sampler_bench import bench_samplers
    from diffalign.models.sampler_data import sampler_overrides, schedule_file

    named = load_model("builtin:digits")
    overrides = sampler_overrides(named, "unipc", 1.0)
    assert overrides["timesteps_path"] == str(schedule_file("builtin:digits", "unipc", 1.0))
    assert sampler_overrides(named, "unipc", 7.5)["timesteps_path"] == str(schedule_file("builtin:digits", "unipc",
                                                                                         7.5))
    assert "timesteps_path" not in sampler_overrides(named, "unipc", 5.0)
    assert "timesteps_path" not in sampler_overrides(named, "unipc", 1.0, searched=False)
    sched = make_scheduler("unipc", {**named.scheduler_config, **overrides})
    sched.set_timesteps(20)
    default = make_scheduler("unipc", named.scheduler_config)
    default.set_timesteps(20)
    assert torch.equal(sched.sigmas, default.sigmas)  # not searched for 20 steps: the default grid
    sched.set_timesteps(5)
    default.set_timesteps(5)
    assert not torch.allclose(sched.sigmas, default.sigmas)
    records = bench_samplers(named, ["unipc"], [5], num_images=16, progress=False, grids=("default", "searched"),
                             schedules=schedule_file("builtin:digits", "unipc", 1.0).parent)
    by = {r.sampler: r.mse for r in records}
    assert by["unipc@searched"] < 0.75 * by["unipc"]


def test_shipped_fashion_grids_cover_only_the_step_counts_that_won_on_held_out_noise():
    """builtin:fashion ships UniPC grids at guidance 1 for NFE 4 and 8, and at guidance 7.5 for NFE 4, 5 and 10:
    searched on 128 noises at NFE 4, 5, 6, 8 and 10, they beat the default and AYS grids on 64 held-out noises only
    there (benchmarks/results/timesteps_builtin_fashion_128noises_g*.json); the other step counts keep the default
    grid."""
    from diffalign.models.sampler_data import sampler_overrides

    named = load_model("builtin:fashion")
    default = make_scheduler("unipc", named.scheduler_config)
    for guidance, won in ((1.0, {4, 8}), (7.5, {4, 5, 10})):
        searched = make_scheduler("unipc", {**named.scheduler_config, **sampler_overrides(named, "unipc", guidance)})
        for steps in (4, 5, 6, 8, 10, 20):
            searched.set_timesteps(steps)
            default.set_timesteps(steps)
            assert (not torch.equal(searched.sigmas, default.sigmas)) == (steps in won), (guidance, steps)
    assert "timesteps_path" not in sampler_overrides(named, "unipc", 5.0)


def test_a_models_own_schedule_file_wins_over_the_shipped_one(tmp_path):
    from diffalign.models.sampler_data import sampler_overrides, schedule_file

    named = load_model("builtin:fashion")
    assert sampler_overrides(named, "unipc", 7.5)["timesteps_path"] == str(schedule_file("builtin:fashion", "unipc",
                                                                                         7.5))
    named.sampler_overrides = {"unipc": {"timesteps_path": str(tmp_path / "mine.json")}}
    assert sampler_overrides(named, "unipc", 7.5)["timesteps_path"] == str(tmp_path / "mine.json")

"""Diffusers pipelines as models of the sampler commands: bench samplers, calibrate timesteps (and dc-solver, ems
compute) take a pipeline directory or a hub id as well as the registry's names."""

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.models.pipeline_model import DEFAULT_PROMPTS
from diffalign.models.registry import load_model
from diffalign.samplers import make_scheduler


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    from diffalign.models.tiny_sd import tiny_stable_diffusion_pipeline

    path = tmp_path_factory.mktemp("tiny_sd")
    tiny_stable_diffusion_pipeline(sample_size=8).save_pretrained(path)
    return str(path)


def test_a_stable_diffusion_directory_is_a_text_conditioned_latent_model(tiny_sd_dir):
    named = load_model(tiny_sd_dir, prompts=["a red car", "a cat"])
    assert named.class_names == ("a red car", "a cat") and named.sample_shape == (4, 8, 8)
    assert load_model(tiny_sd_dir).class_names == DEFAULT_PROMPTS
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(400)
    with torch.no_grad():
        uncond = named.predict(x, t, None, 1.0)
        car = named.predict(x, t, torch.tensor([0, 0]), 1.0)
        cat = named.predict(x, t, torch.tensor([1, 1]), 1.0)
        mixed = named.predict(x, t, torch.tensor([0, 1]), 1.0)
        guided = named.predict(x, t, torch.tensor([0, 1]), 5.0)
        unet = named.extra["pipeline"].unet
        ids = named.extra["pipeline"].tokenizer(["a red car"], padding="max_length", return_tensors="pt").input_ids
        direct = unet(x, t, encoder_hidden_states=named.extra["pipeline"].text_encoder(ids)[0].expand(2, -1, -1)).sample
    assert uncond.shape == x.shape
    torch.testing.assert_close(car, direct)  # label 0 is the first prompt, through the pipeline's own encoder
    torch.testing.assert_close(mixed, torch.stack([car[0], cat[1]]))
    torch.testing.assert_close(guided, uncond + 5.0 * (mixed - uncond), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(car, cat)


def test_a_class_conditional_directory_is_the_same_model_as_its_registry_name(tmp_path):
    from diffalign.pipelines import builtin_pipeline

    builtin_pipeline("builtin:digits").save_pretrained(tmp_path)
    named, builtin = load_model(str(tmp_path)), load_model("builtin:digits")
    assert len(named.class_names) == len(builtin.class_names) and named.sample_shape == builtin.sample_shape
    assert named.scheduler_config["num_train_timesteps"] == builtin.scheduler_config["num_train_timesteps"]
    x, labels = torch.randn(3, *builtin.sample_shape), torch.tensor([1, 7, 3])
    with torch.no_grad():
        for guidance in (1.0, 3.0):
            torch.testing.assert_close(named.predict(x, torch.tensor(300), labels, guidance),
                                       builtin.predict(x, torch.tensor(300), labels, guidance))
    with pytest.raises(ValueError, match="class names"):
        load_model(str(tmp_path), prompts=["a cat"])


def test_a_name_that_is_neither_a_model_nor_a_pipeline_is_refused_with_the_choices(capsys):
    with pytest.raises(ValueError, match="builtin:fashion, a diffusers pipeline directory or a hub id"):
        load_model("fashion")
    with pytest.raises(ValueError, match="unknown model 'builtin2:x'"):
        load_model("builtin2:x")
    with pytest.raises(ValueError, match="class names"):
        load_model("builtin:digits", prompts=["a cat"])
    assert main(["bench", "samplers", "--model", "no-such-org/no-such-model", "--nfe", "5", "--quiet"]) == 2
    assert "not available offline" in capsys.readouterr().err


def test_time_steps_are_searched_and_benchmarked_on_a_stable_diffusion_directory(tiny_sd_dir, tmp_path, monkeypatch,
                                                                               capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "unipc_g2.json"
    assert main(["calibrate", "timesteps", "--model", tiny_sd_dir, "--prompt", "a cat", "--prompt", "a red car",
                 "--sampler", "unipc", "--nfe", "3", "--guidance", "2", "--num-noises", "2", "--minutes", "0.01",
                 "--reference-steps", "20", "--quiet", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == tiny_sd_dir and data["sampler"] == "unipc"
    (entry,) = data["entries"]
    assert entry["prompts"] == ["a cat", "a red car"] and entry["steps"] == 3 and entry["reference_steps"] == 20
    assert entry["mse"] <= min(entry["mse_default"], entry["mse_logsnr_uniform"], entry["mse_ays"])
    sigmas = entry["sigmas"]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False))
    config = load_model(tiny_sd_dir).scheduler_config
    sched = make_scheduler("unipc", config, timesteps_path=str(out))
    sched.set_timesteps(3)
    torch.testing.assert_close(sched.sigmas[:-1].double(), torch.tensor(sigmas, dtype=torch.float64), rtol=1e-5,
                               atol=0.0)

    capsys.readouterr()
    monkeypatch.setattr("diffalign.eval.sampler_bench.REFERENCE_STEPS", 20)  # the reference's cost, not its role
    record = tmp_path / "bench.json"
    (tmp_path / "unipc_g1.json").write_text(out.read_text())  # the grid searched at guidance 2, benchmarked at 1
    assert main(["bench", "samplers", "--model", tiny_sd_dir, "--samplers", "unipc", "--nfe", "3", "--num-images",
                 "2", "--grids", "default,searched", "--schedules", str(tmp_path), "--quiet", "--json",
                 str(record)]) == 0
    rows = {r["sampler"]: r["mse"] for r in json.loads(record.read_text())}
    assert {"unipc", "unipc@searched", "diffusers:DPMSolverMultistepScheduler"} <= set(rows)
    assert all(v == v and v > 0 for v in rows.values())


def test_a_schedule_whose_first_step_moves_with_the_step_count_is_refused_by_the_search():
    from diffalign.samplers.timesteps import search_schedule

    named = load_model("reference:digits")
    named.scheduler_config = {**named.scheduler_config, "timestep_spacing": "leading", "steps_offset": 1}
    with pytest.raises(ValueError, match="timestep_spacing 'trailing' or 'linspace'"):
        search_schedule(named, "unipc", 4, num_noises=1, minutes=0.01, progress=False)


def test_ems_are_computed_on_a_stable_diffusion_directory(tiny_sd_dir, tmp_path):
    from diffalign.samplers.ems import load_ems

    assert main(["ems", "compute", "--model", tiny_sd_dir, "--datapoints", "samples", "--num-datapoints", "2",
                 "--grid", "2", "--quiet", "--out", str(tmp_path / "ems")]) == 0
    ems = load_ems(tmp_path / "ems")
    assert tuple(ems.sample_shape) == (4, 8, 8) and ems.num_points == 2
    assert all(bool(torch.isfinite(v).all()) for v in (ems.l, ems.s, ems.b))


def test_an_sdxl_pipeline_is_a_text_conditioned_latent_model_with_its_added_inputs():
    from diffalign.models.pipeline_model import named_model_of_pipeline
    from diffalign.models.tiny_sd import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    named = named_model_of_pipeline(pipe, "sdxl", prompts=["a red car", "a cat"])
    assert named.sample_shape == (4, 16, 16) and named.scheduler_config["timestep_spacing"] == "trailing"
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(400)
    with torch.no_grad():
        guided = named.predict(x, t, torch.tensor([0, 1]), 5.0)
        # diffusers' own SDXL call: its prompt encoding, zero negative embeddings, size ids of a 32 x 32 image
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompt=["a red car", "a cat"], device="cpu")
        ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, 32).repeat(4, 1)
        out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, embeds]),
                        added_cond_kwargs={"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": ids})
    uncond, cond = out.sample.chunk(2)
    torch.testing.assert_close(guided, uncond + 5.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_pipelines_the_sampler_commands_cannot_drive_are_refused_by_name():
    from diffalign.models.pipeline_model import named_model_of_pipeline
    from diffalign.models.tiny_sd import tiny_sd3_pipeline

    with pytest.raises(TypeError, match="no UNet"):
        named_model_of_pipeline(tiny_sd3_pipeline(), "sd3")

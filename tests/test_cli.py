"""The command-line contracts of DESIGN.md: sample, bench samplers, eval fid / fid-stats, models list."""

import json

import pytest
from PIL import Image

from diffalign.cli import main


def test_sample_writes_a_png_grid_and_metadata(tmp_path):
    out, meta = tmp_path / "grid.png", tmp_path / "meta.json"
    assert main(["sample", "--model", "builtin:digits", "--sampler", "dpm-solver++", "--steps", "8", "--guidance", "4",
                 "--prompt", "seven", "--num-images", "4", "--seed", "0", "--out", str(out), "--json", str(meta),
                 "--quiet"]) == 0
    assert Image.open(out).size[0] > 16
    records = json.loads(meta.read_text())
    assert len(records) == 4 and records[0]["sampler"] == "dpm-solver++" and records[0]["prompt"] == "seven"


def test_bench_samplers_json_contract_includes_the_diffusers_baselines(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "samplers", "--model", "reference:digits", "--samplers", "ddim,dpm-solver++", "--nfe", "5",
                 "--num-images", "4", "--json", str(out), "--quiet"]) == 0
    records = json.loads(out.read_text())
    assert {r["sampler"] for r in records} >= {"ddim", "dpm-solver++", "diffusers:DPMSolverMultistepScheduler",
                                               "diffusers:UniPCMultistepScheduler"}
    assert all(set(r) >= {"sampler", "nfe", "guidance", "mse", "seconds", "step_overhead_us"} for r in records)
    same = [r["mse"] for r in records if r["sampler"] in ("dpm-solver++", "diffusers:DPMSolverMultistepScheduler")]
    assert abs(same[0] - same[1]) < 1e-6 * same[1]  # same noise, same method


def test_eval_fid_of_a_builtin_model_and_of_an_image_folder(tmp_path, capsys):
    out = tmp_path / "fid.json"
    assert main(["eval", "fid", "--model", "builtin:digits", "--steps", "5", "--num-images", "20", "--json", str(out),
                 "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["fid"] > 0 and result["num_images"] == 20
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(6):
        Image.new("L", (8, 8), color=40 * k).save(folder / f"{k}.png")
    stats = tmp_path / "stats.safetensors"
    assert main(["eval", "fid-stats", "--images", str(folder), "--features", "classifier:builtin:digits",
                 "--out", str(stats)]) == 0
    capsys.readouterr()
    same = tmp_path / "same.json"
    assert main(["eval", "fid", "--images", str(folder), "--features", "classifier:builtin:digits",
                 "--stats", str(stats), "--json", str(same)]) == 0
    assert abs(json.loads(same.read_text())["fid"]) < 1e-4  # against its own statistics (sqrtm of a rank-6 cov)


def test_eval_fid_on_the_evaluation_set_is_what_an_aligned_model_gets(tmp_path):
    from diffalign.align.evaluate import evaluate_fid

    out = tmp_path / "fid.json"
    assert main(["eval", "fid", "--model", "builtin:digits", "--steps", "5", "--num-images", "30", "--eval-set",
                 "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["eval_set"] is True
    assert result["fid"] == pytest.approx(evaluate_fid("builtin:digits", 30, steps=5), rel=1e-9)
    assert main(["eval", "fid", "--model", "builtin:digits", "--eval-set", "--teleport", "--quiet"]) == 2


def test_models_list_and_clear_errors(capsys):
    assert main(["models", "list"]) == 0
    assert "builtin:fashion" in capsys.readouterr().out
    assert main(["sample", "--sampler", "dpm-solver-9", "--quiet", "--steps", "3"]) == 2
    assert "valid names" in capsys.readouterr().err
    assert main(["sample", "--model", "builtin:cats", "--quiet"]) == 2
    assert "builtin:digits" in capsys.readouterr().err


def test_sample_from_a_local_diffusers_pipeline_directory(tmp_path):
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tmp_path / "pipe"), "--sampler", "unipc", "--steps", "4", "--num-images", "2",
                 "--out", str(out), "--quiet"]) == 0
    assert out.exists()


def test_sample_from_a_missing_hub_model_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["sample", "--model", "some-org/some-model", "--quiet", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "some-org/some-model" in err and "offline" in err.lower()
    assert len(err.splitlines()) == 1 and err.endswith(")") and "Traceback" not in err


def test_a_hub_model_without_network_fails_at_once_with_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("diffalign.rewards.hub.hub_reachable", lambda timeout=3.0: False)
    assert main(["sample", "--model", "some-org/some-model", "--quiet", "--out", str(tmp_path / "g.png")]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "some-org/some-model" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--num-images", "0"], "--num-images must be >= 1"),
    (["--out", "{tmp}/missing/grid.png"], "does not exist; create it first"),
    (["--out", "{tmp}/grid.txt"], "the grid is an image"),
    (["--json", "{tmp}/missing/meta.json"], "does not exist; create it first"),
    (["--model", "reference:digits", "--sampler", "dpm-solver++", "--steps", "1000"], "use at most 999 steps"),
    (["--model", "reference:digits", "--sampler", "unipc", "--steps", "1000"], "use at most 999 steps"),
    (["--model", "reference:digits", "--sampler", "ddim", "--steps", "2000"], "use at most 999 steps"),
    (["--model", "builtin:digits", "--sampler", "dpm-solver++", "--steps", "5000"], "use at most 999 steps"),
])
def test_sample_refuses_bad_options_before_working(tmp_path, capsys, args, needle):
    from diffalign.cli import main

    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = ["--out", str(tmp_path / "grid.png")] if "--out" not in args else []
    assert main(["sample", "--num-images", "1", "--quiet", *out, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.rglob("*.png")) and not any(tmp_path.rglob("*.json"))


def test_guidance_without_a_prompt_warns_and_json_names_the_model(tmp_path, capsys):
    from diffalign.cli import main

    assert main(["sample", "--model", "reference:digits", "--guidance", "7.5", "--steps", "4", "--num-images", "2",
                 "--out", str(tmp_path / "g.png"), "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    assert "has no effect without --prompt" in capsys.readouterr().err
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta[0]["model"] == "reference:digits" and meta[0]["guidance"] == 1.0 and meta[1]["index"] == 1


def test_samplers_and_models_list(capsys):
    from diffalign.cli import main

    assert main(["samplers", "list"]) == 0
    assert "dpm-solver-v3" in capsys.readouterr().out
    assert main(["models", "list"]) == 0
    assert "sneaker" in capsys.readouterr().out


def test_each_image_has_its_own_seed_and_file_and_batches_do_not_change_it(tmp_path):
    common = ["sample", "--model", "builtin:digits", "--prompt", "3", "--steps", "6", "--quiet"]
    assert main([*common, "--num-images", "4", "--batch-size", "3", "--out", str(tmp_path / "a.png"),
                 "--out-dir", str(tmp_path / "a"), "--json", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--num-images", "1", "--seed", "2", "--out", str(tmp_path / "b.png"),
                 "--out-dir", str(tmp_path / "b"), "--json", str(tmp_path / "b.json")]) == 0
    meta = json.loads((tmp_path / "a.json").read_text())
    assert [m["seed"] for m in meta] == [0, 1, 2, 3] and all(m["model"] == "builtin:digits" for m in meta)
    alone = json.loads((tmp_path / "b.json").read_text())[0]
    assert alone["seed"] == 2 and "seed2" in alone["file"]
    third = Image.open(meta[2]["file"])
    assert list(third.getdata()) == list(Image.open(alone["file"]).getdata())  # image 2 of 4 = a run with --seed 2
    assert len(list((tmp_path / "a").glob("*.png"))) == 4


@pytest.mark.parametrize("argv, needle", [
    (["bench", "samplers", "--samplers", "nope", "--nfe", "5"], "unknown sampler 'nope'"),
    (["bench", "samplers", "--nfe", "0"], "--nfe"),
    (["bench", "samplers", "--nfe", "five"], "--nfe"),
    (["bench", "samplers", "--model", "nope:x"], "unknown model"),
    (["bench", "samplers", "--json", "{tmp}/missing/b.json"], "does not exist"),
    (["eval", "fid", "--model", "builtin:digits", "--num-images", "0"], "--num-images must be >= 1"),
    (["eval", "fid", "--model", "builtin:digits", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["eval", "fid", "--model", "builtin:digits", "--sampler", "nope"], "unknown sampler 'nope'"),
    (["eval", "reward", "--model", "builtin:digits", "--reward", "nope"], "nope"),
    (["ems", "compute", "--model", "nope:x", "--out", "{tmp}/ems"], "unknown model"),
    (["ems", "compute", "--num-datapoints", "0", "--out", "{tmp}/ems"], "--num-datapoints must be >= 1"),
    (["calibrate", "dc-solver", "--steps", "0", "--out", "{tmp}/r.json"], "--steps must be >= 1"),
    (["calibrate", "dc-solver", "--steps", "5", "--guidance", "-2", "--out", "{tmp}/r.json"], "--guidance"),
    (["train", "d3po", "--model", "builtin:digits", "--reward", "nope", "--out", "{tmp}/run"], "nope"),
    (["train", "d3po", "--model", "nope:x", "--reward", "brightness", "--out", "{tmp}/run"], "nope:x"),
    (["train", "d3po", "--model", "builtin:digits", "--reward", "brightness", "--max-steps", "0",
      "--out", "{tmp}/run"], "--max-steps must be >= 1"),
    (["sample", "--sampler", "nope", "--out", "{tmp}/g.png"], "unknown sampler 'nope'"),
    (["sample", "--model", "builtin:digits", "--prompt", "zebra", "--out", "{tmp}/g.png"], "zebra"),
    (["sample", "--batch-size", "0", "--out", "{tmp}/g.png"], "--batch-size must be >= 1"),
    (["sample", "--out", "{tmp}/g.png", "--out-dir", "{tmp}/file.txt"], "is a file"),
])
def test_every_command_refuses_bad_input_with_one_line_and_no_output(tmp_path, capsys, argv, needle):
    (tmp_path / "file.txt").write_text("x")
    before = set(tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert set(tmp_path.rglob("*")) == before  # nothing written, not even an empty directory

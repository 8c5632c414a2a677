"""Every command shown in README.md and docs/ runs (slow: ``python -m pytest -m slow``; CI runs it in its own step).

Each page's commands run in order in one scratch directory, as a reader would type them, so that a command finds
what an earlier one wrote (a dataset, a run directory, statistics). Only their sizes change: the options in
``SHRINK`` and the ``EXTRA`` ones appended per command make a 15-minute benchmark a seconds-long one, and nothing
else is rewritten, except that the benchmarks' 500-step reference solutions take 50 steps here. Set-up commands
(``pip install``, the test command) are checked against what ``.ci/run`` runs. ``-s`` prints each command's time.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_readme import FENCE, PAGES, ROOT, SHELL_FENCES, _name

PROGRAMS = ("diffalign ", "python benchmarks/", "bash benchmarks/", "accelerate ", "pip ", "python -m pytest",
            "python3 -m venv")
# option -> its value at test size (a callable rewrites a list)
SHRINK = {
    "--minutes": "0.05", "--max-minutes": "0.05", "--max-steps": "2", "--num-images": "2", "--num-datapoints": "32",
    "--grid": "20", "--num-prompts": "2", "--num-pairs": "2", "--repeats": "1", "--fid-images": "20",
    "--eval-images": "4", "--nfe": lambda v: ",".join(v.split(",")[:2]), "--bases": lambda v: v.split(",")[0],
    "--samplers": lambda v: ",".join(v.split(",")[:2]), "--teacher-steps": lambda v: v.split(",")[0],
    "--search-minutes": "0.02", "--search-noises": "2", "--dc-calibrate": "2",
}
# options set (replacing the written value, or appended) per command, keyed by the command's first words
EXTRA = {
    "diffalign sample": ["--num-images", "2"],
    "diffalign bench samplers": ["--num-images", "2"],
    "diffalign eval fid": ["--num-images", "20"],
    "diffalign eval fid-stats": ["--num-images", "20"],
    "diffalign eval reward": ["--num-images", "4"],
    "diffalign calibrate dc-solver": ["--num-datapoints", "2", "--iters", "2"],
    "diffalign calibrate timesteps": ["--num-noises", "4", "--minutes", "0.05", "--reference-steps", "50"],
    "diffalign calibrate teleport": ["--num-datapoints", "300"],  # a few per class
    "diffalign ems compute": ["--num-datapoints", "8", "--grid", "40"],  # 4 datapoints give NaN statistics
    "diffalign data synth": ["--num-prompts", "2", "--k", "2", "--steps", "4"],
    "diffalign align export-pairs": ["--num-pairs", "2", "--steps", "4"],
    "diffalign train": ["--max-steps", "2", "--set", "checkpoint_every=1"],
    "python benchmarks/align.py": ["--fid-images", "20", "--eval-images", "4", "--kl-images", "2",
                                   "--checkpoint-every", "1", "--fid-every", "0"],
    "python benchmarks/align_dpo.py": ["--fid-images", "20", "--eval-images", "4", "--kl-images", "2",
                                       "--checkpoint-minutes", "0.02", "--rewards", "jpeg_compressibility"],
    "python benchmarks/distill_dpo.py": ["--fid-images", "20", "--eval-images", "4", "--samplers", "ddim",
                                        "--teacher-steps", "4", "--checkpoint-minutes", "0.02"],
    "python benchmarks/dualfast_variants.py": ["--num-images", "2", "--nfe", "5"],
    "python benchmarks/align_frontier.py": ["--pool", "40", "--chunk", "40", "--steps", "4", "--resamples", "1",
                                           "--real-pool", "40"],
    "python benchmarks/align_gate.py": ["--eval-images", "4", "--fid-images", "20", "--steps", "4",
                                        "--splits", "early:2,late:2"],
    "python benchmarks/align_memory.py": ["--max-steps", "1", "--pairs-per-step", "1", "--num-steps", "4",
                                          "--models", "tiny-sd"],
    "python benchmarks/pipeline_speed.py": ["--model", "tiny-sd", "--device", "cpu", "--steps", "4"],
    "python benchmarks/ems_variants.py": ["--num-images", "2", "--nfe", "5"],
    "python benchmarks/inversion.py": ["--num-images", "2", "--steps", "5", "--renoise", "0,1"],
    "python benchmarks/step_overhead.py": ["--steps", "5"],
    "python benchmarks/teleport.py": ["--num-images", "2", "--samplers", "dc-solver", "--nfe", "5",
                                      "--search-noises", "2"],
    "python benchmarks/timesteps_fid.py": ["--num-images", "20"],
}
# positional arguments and environment at test size
POSITIONAL = {"bash benchmarks/search_timesteps.sh": {3: "0.05"}}
ENV = {"bash benchmarks/search_timesteps.sh": {"SEARCH_GUIDANCES": "1", "SEARCH_SAMPLERS": "unipc",
                                               "SEARCH_NFES": "5", "SEARCH_NOISES": "4"}}
# commands run elsewhere, with where
ELSEWHERE = {
    "bash benchmarks/gpu.sh": "a CUDA machine (its parts run here through pipeline_speed.py and align_memory.py)",
    "accelerate launch": "tests/test_align.py::test_two_processes_finish_with_identical_weights",
    "python -m pytest -q tests/": "the README's test command (the whole suite)",
    "python -m pytest -q -m slow -n auto": ".ci/run's last step (this file)",
}


@functools.cache
def _parser():
    from diffalign.cli import build_parser

    return build_parser()


def _is_command(span: str) -> bool:
    """An inline `diffalign ...` span is a command (not a mention) when it is complete: it parses, and it names no
    placeholder (DIR, NAME, ...)."""
    argv = shlex.split(span)[1:]
    if any(re.fullmatch(r"[A-Z_]+|\.\.\.", a) for a in argv):
        return False
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _parser().parse_args(argv)
    except SystemExit:
        return False
    return "--" in span or argv[-1] == "list"


def commands(page: Path) -> list[str]:
    """The commands of ``page`` in the order a reader meets them: shell-block lines (continuations joined, `&&`
    chains split, comments dropped), indented code blocks, and complete inline spans."""
    text = page.read_text()
    found: list[tuple[int, str]] = []
    for m in FENCE.finditer(text):
        if m["info"].strip() not in SHELL_FENCES:
            continue
        for line in re.sub(r"\\\n\s*", " ", m["body"]).splitlines():
            for part in line.strip().removeprefix("$ ").split("&&"):
                part = part.split("  #")[0].strip()
                if re.sub(r"^(?:[A-Z_][A-Z0-9_]*=(?:\"[^\"]*\"|\S*)\s+)+", "", part).startswith(PROGRAMS):
                    found.append((m.start(), part))
    for m in re.finditer(r"^ {4}(python benchmarks/.*?)(?:\n\n|\Z)", text, re.S | re.M):  # indented code blocks
        found.append((m.start(), " ".join(re.sub(r"\\\n", " ", m[1]).split())))
    for m in re.finditer(r"(?<!`)`((?:python|bash) benchmarks/[^`]+|diffalign [^`]+)`", text):
        span = " ".join(m[1].split())
        if not span.startswith("diffalign") or _is_command(span):
            found.append((m.start(), span))
    return [c for _, c in sorted(found, key=lambda f: f[0])]  # stable: a block's lines keep their order


def split_env(command: str) -> tuple[dict[str, str], list[str]]:
    """(leading ``NAME=value`` assignments, the command's argv)."""
    argv = shlex.split(command, comments=True)
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        name, value = argv.pop(0).split("=", 1)
        env[name] = value
    return env, argv


def _key(argv: list[str], table: dict):
    line = " ".join(argv)
    return next((k for k in table if line == k or line.startswith(k + " ")), None)


def shrink(argv: list[str]) -> list[str]:
    """``argv`` at test size: SHRINK's and then EXTRA's values replace the written ones; EXTRA's options that are
    not written are appended."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        rule = SHRINK.get(arg)
        if rule is not None:
            out[i + 1] = rule(out[i + 1]) if callable(rule) else rule
    extra = EXTRA.get(_key(argv, EXTRA), [])
    for j in range(0, len(extra), 2):
        option, value = extra[j], extra[j + 1]
        if option in out and option != "--set":
            out[out.index(option) + 1] = value
        else:
            out += [option, value]
    for index, value in POSITIONAL.get(_key(argv, POSITIONAL), {}).items():
        out[index] = value
    return out


def prepare(command: str, cwd: Path) -> None:
    """What a reader provides by hand before some commands: their own images, their labels."""
    from PIL import Image

    for folder in re.findall(r"--images (\S+)", command):
        target = cwd / folder
        if not target.exists():
            target.mkdir(parents=True)
            import numpy as np

            rng = np.random.default_rng(0)
            for i in range(24):
                Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(target / f"{i}.png")
    for folder in re.findall(r"--schedules (\S+)", command):  # searched time steps the docs' tables used
        if not (cwd / folder).exists() and (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, cwd / folder)
    m = re.search(r"--records((?: [^-]\S*)+)", command)  # earlier runs' records, shipped with the project
    for record in m[1].split() if m else ():
        if not (cwd / record).exists():
            shutil.copy(ROOT / record, cwd / record)
    m = re.search(r"train d3po .*--data (\S+)", command)
    if m and not (cwd / m[1] / "labels.jsonl").exists():
        import json

        meta = json.loads((cwd / m[1] / "pairs.json").read_text())
        lines = [json.dumps({"pair": p["pair"], "preferred": p["pair"] % 2}) for p in meta["pairs"]]
        (cwd / m[1] / "labels.jsonl").write_text("\n".join(lines) + "\n")


def run(command: str, cwd: Path) -> None:
    doc_env, written = split_env(command)
    argv = shrink(written)
    prepare(command, cwd)
    if doc_env and argv[0] != "bash":
        raise AssertionError(f"`{command}`: environment assignments are supported for bash scripts only")
    if argv[0] == "diffalign":
        from diffalign.cli import main

        assert main(argv[1:]) == 0, f"`{command}` failed (run as {argv})"
    elif argv[0] == "python" and argv[1].startswith("benchmarks/"):
        saved = sys.argv
        sys.argv = [str(ROOT / argv[1]), *argv[2:]]
        try:
            runpy.run_path(str(ROOT / argv[1]), run_name="__main__")
        except SystemExit as err:
            assert not err.code, f"`{command}` exited with {err.code}"
        finally:
            sys.argv = saved
    elif argv[0] == "bash" and argv[1].startswith("benchmarks/"):
        env = {**os.environ, **doc_env, **ENV.get(_key(written, ENV), {}),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        subprocess.run(["bash", str(ROOT / argv[1]), *argv[2:]], cwd=cwd, env=env, check=True)
    else:
        raise AssertionError(f"no runner for `{command}`")


def scratch(tmp_path: Path) -> Path:
    """A scratch directory where the commands find the shipped files the docs name (``diffalign/models/...``, read
    only) and write their records (``benchmarks/results/``)."""
    (tmp_path / "diffalign").symlink_to(ROOT / "diffalign")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    return tmp_path


def setup_command_runs_in_ci(command: str) -> bool:
    ci = (ROOT / ".ci" / "run").read_text()
    return all(part.strip() in ci for part in command.split("&&"))


def tour_commands() -> set[str]:
    """The README tour's shell lines, which ``.ci/run`` runs verbatim (at full size) after the tests."""
    ci = (ROOT / ".ci" / "run").read_text()
    start, end = re.search(r"awk '/\^(## [^/]+)/,/\^(## [^/]+)/'", ci).groups()
    readme = (ROOT / "README.md").read_text()
    tour = readme[readme.index(start):readme.index(end)]
    return {line.strip() for m in FENCE.finditer(tour) if m["info"].strip() == "bash"
            for line in m["body"].splitlines() if line.strip()}


PAGE_COMMANDS = [(p, commands(p)) for p in PAGES]


@pytest.mark.slow  # pages with the most commands first, so that parallel workers do not end with the longest one
@pytest.mark.parametrize("page", [p for p, c in sorted(PAGE_COMMANDS, key=lambda pc: -len(pc[1])) if c],
                         ids=lambda p: _name(p))
def test_page_commands_run(page, tmp_path, monkeypatch):
    cwd = scratch(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("diffalign.eval.sampler_bench.REFERENCE_STEPS", 50)
    tour = tour_commands()
    shipped = _shipped_files()
    for command in commands(page):
        if command.startswith(("pip ", "python3 -m venv")) or command == "python -m pytest -q -n auto":
            assert setup_command_runs_in_ci(command), f"{_name(page)}: `{command}` is not what .ci/run runs"
            continue
        if any(command.startswith(k) for k in ELSEWHERE) or (page.name == "README.md" and command in tour):
            continue
        start = time.perf_counter()
        run(command, cwd)
        print(f"{time.perf_counter() - start:6.1f} s  {command}")
    assert _shipped_files() == shipped, f"{_name(page)}: a command wrote into the package's shipped files"


def _shipped_files() -> dict[str, int]:
    """The package's data files (weights, sampler data) and their modification times."""
    return {str(p): p.stat().st_mtime_ns for p in (ROOT / "diffalign" / "models").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")}


def test_commands_are_found():
    found = {_name(p): c for p, c in PAGE_COMMANDS}
    assert len(sum(found.values(), [])) >= 50
    assert any(c.startswith("python benchmarks/align_dpo.py") for c in found["docs/alignment-dpo.md"])
    assert any(c.startswith("bash benchmarks/search_timesteps.sh") for c in found["docs/samplers.md"])
    tour = tour_commands()
    assert len(tour) >= 5 and all(c.startswith("diffalign ") for c in tour)
    assert tour < set(found["README.md"])
    assert "def test_two_processes_finish_with_identical_weights" in (ROOT / "tests" / "test_align.py").read_text()
    assert shrink(["diffalign", "eval", "fid", "--num-images", "1000"])[-1] == "20"
    assert shrink(["python", "benchmarks/align.py", "--minutes", "15"])[3] == "0.05"

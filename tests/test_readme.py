"""The README's and docs' examples work as written: Python blocks run, `diffalign ...` command lines parse, and the
README's set-up commands are the ones CI runs."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(page: Path, kinds: set[str]) -> list[str]:
    """The bodies of the fenced code blocks of ``page`` whose info string is in ``kinds`` (indentation removed)."""
    blocks = []
    for m in FENCE.finditer(page.read_text()):
        if m["info"].strip() in kinds:
            indent = len(m["indent"])
            blocks.append("".join(line[indent:] for line in m["body"].splitlines(keepends=True)))
    return blocks


def _command_lines(page: Path) -> list[str]:
    """Every `diffalign ...` command in the shell blocks of ``page``: continuation lines joined, a leading `$ `
    prompt dropped, commands chained with `&&` taken one by one."""
    commands = []
    for block in _blocks(page, SHELL_FENCES):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in line.removeprefix("$ ").split("&&"):
                if part.strip().startswith("diffalign "):
                    commands.append(part.strip())
    return commands


PYTHON_BLOCKS = [(_name(p), i, code) for p in PAGES for i, code in enumerate(_blocks(p, {"python"}))]
COMMANDS = [(_name(p), i, line) for p in PAGES for i, line in enumerate(_command_lines(p))]


@pytest.mark.parametrize(("page", "index", "code"), PYTHON_BLOCKS, ids=[f"{p}:{i}" for p, i, _ in PYTHON_BLOCKS])
def test_python_example_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page} block {index}", "exec"), {"__name__": "__example__"})


@pytest.mark.parametrize(("page", "index", "line"), COMMANDS, ids=[f"{p}:{i}" for p, i, _ in COMMANDS])
def test_command_line_parses(page, index, line):
    from diffalign.cli import build_parser

    argv = shlex.split(line, comments=True)[1:]
    placeholders = [a for a in argv if re.search(r"<[^>]*>|\.\.\.|^[A-Z_]+$", a)]
    assert not placeholders, f"{page}: write `{line}` with concrete values instead of {placeholders}"
    try:
        build_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{page}: the CLI rejects `{line}` (exit {err.code})")


def test_every_page_has_examples_checked():
    assert any(p == "README.md" for p, _, _ in PYTHON_BLOCKS)
    assert any(p == "README.md" for p, _, _ in COMMANDS)
    assert len(COMMANDS) >= 20


def test_readme_setup_commands_are_what_ci_runs():
    """.ci/run executes the README's "Run" and "Test" commands; they must stay identical, character for character."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme_lines = set((ROOT / "README.md").read_text().splitlines())
    for label in ("Run", "Test"):
        marker = ci.index(f'# README: "{label}"')
        command = ci[marker + 1]
        assert command in readme_lines, f'README.md lacks the "{label}" command that .ci/run runs: {command}'


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation other than - and _ dropped, spaces
    to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_docs_links_resolve():
    """Relative links of the README and the docs point at files that exist, and at headings that exist there."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{_name(page)} links to {target}, which does not exist"
            if anchor and path.suffix == ".md":
                assert anchor in _anchors(path), f"{_name(page)} links to {target}, a heading {path.name} lacks"


def test_the_cli_reference_names_every_option_of_every_command():
    import argparse

    from diffalign.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text()
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and not re.search(f"`{option}[` ]", text):
                    missing.append(f"{path} {option}")

    walk(build_parser(), "diffalign")
    assert missing == [], f"docs/cli.md does not document: {missing}"

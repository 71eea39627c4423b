"""docs/: the generated CLI reference is current, the site's pages exist, and the command lines
in the user pages are valid for the CLI (`mkdocs build --strict` itself runs in .ci/run)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from cli_args import parse_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_the_typer_app():
    fresh = _gen_cli().render()
    committed = (DOCS / "cli.md").read_text()
    assert committed == fresh, (
        "docs/cli.md is out of date with the CLI: run `python docs/gen_cli.py` and commit it"
    )


def test_cli_reference_lists_every_command_with_its_options():
    text = (DOCS / "cli.md").read_text()
    for title in ("tsdfm-pipeline build", "tsdfm-pipeline compass train", "tsdfm-pipeline distill"):
        assert f"\n## {title}\n" in text
    build = text.split("\n## tsdfm-pipeline build\n")[1].split("\n## ")[0]
    assert "Usage: tsdfm-pipeline build [OPTIONS]" in build
    assert "| `--address <str>` | Join this Ray cluster" in build
    assert "[default: 1024]" in build  # -N, --teacher-steps


def _nav_files(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    return [f for value in nav.values() for f in _nav_files(value)]


def test_site_config_is_strict_and_every_nav_page_exists():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert cfg["strict"] is True and cfg["docs_dir"] == "docs"
    pages = _nav_files(cfg["nav"])
    assert {"index.md", "cli.md", "schema.md", "operations.md"} <= set(pages)
    assert len(pages) == len(set(pages))
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml lists pages that do not exist: {missing}"
    assert {"site/", "/site/"} & set((ROOT / ".gitignore").read_text().split())  # built site


def _shell_commands(markdown: str) -> list[list[str]]:
    """`tsdfm-pipeline ...` command lines in the page's ```bash blocks (continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("tsdfm-pipeline "):
                commands.append(shlex.split(line))
    return commands


@pytest.mark.parametrize(
    "page",
    [
        "index.md",
        "operations.md",
        "schema.md",
        "teachers.md",
        "distill.md",
        "compass.md",
        "build.md",
        "publish.md",
    ],
)
def test_command_lines_in_the_pages_parse_with_the_cli(page):
    commands = _shell_commands((DOCS / page).read_text())
    assert commands
    for argv in commands:
        parse_cli(argv)  # raises on an unknown option, a missing argument or a bad value

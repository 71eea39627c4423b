"""Conventions shared by every typer app and group of the ``tsdfm-pipeline`` command line.

* Help texts are Markdown (typer's ``rich_markup_mode="markdown"``), not Rich markup: Rich
  would read ``org/name[@rev]`` as a style tag and print ``org/name``; Markdown keeps square
  brackets and renders the help texts' ``code`` spans.
* ``-h`` is ``--help`` everywhere (subcommands inherit the root's help option names).
"""

from __future__ import annotations

from typing import Any

import typer

MARKUP_MODE = "markdown"
HELP_OPTION_NAMES = ["-h", "--help"]


def typer_app(help: str, **kwargs: Any) -> typer.Typer:
    """A typer app or command group with the CLI's conventions (see the module docstring)."""
    settings = {"help_option_names": HELP_OPTION_NAMES, **kwargs.pop("context_settings", {})}
    kwargs.setdefault("no_args_is_help", True)
    return typer.Typer(help=help, rich_markup_mode=MARKUP_MODE, context_settings=settings, **kwargs)

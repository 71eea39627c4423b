"""Parse a `tsdfm-pipeline ...` command line with the real typer app, without running it.

Used by the tests that check command lines written in docs/ and docker/: an unknown option, a
missing required one or a bad value raises the same click error the shell would print.
"""

from __future__ import annotations


def parse_cli(argv: list[str]):
    """The leaf command's context for ``tsdfm-pipeline ARGS`` (its ``.params`` are the values)."""
    import typer.main

    from tsdfm.pipeline.cli import app

    assert argv[0] == "tsdfm-pipeline", argv
    cmd, args, name = typer.main.get_command(app), argv[1:], "tsdfm-pipeline"
    while hasattr(cmd, "get_command"):  # a group: descend into the named subcommand
        sub = cmd.get_command(cmd.make_context(name, list(args)), args[0])
        assert sub is not None, f"no command {args[0]!r} in {argv}"
        cmd, name, args = sub, args[0], args[1:]
    return cmd.make_context(name, list(args))

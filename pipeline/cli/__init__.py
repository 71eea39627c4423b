"""The ``tsdfm-pipeline`` command line: parse flags, build configs, call the library, print.

Grouped by what the commands do: ``build`` (build, inspect), ``hub`` (publish, verify),
``train`` (distill, sample, eval), ``models`` (teacher train, compass train/eval, data
synthetic), ``lm`` (lm train), ``demo``. ``common`` holds the app, the one-line error
discipline, the progress bar and the choices. Heavy imports (torch, Ray, datasets) happen
inside the commands, so ``--help`` is instant and ``eval`` never imports Ray. Every user error
is one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

from tsdfm.pipeline.cli import build, convert, demo, hub, lm, models, teacher, train  # noqa: F401
from tsdfm.pipeline.cli.common import app, user_errors

__all__ = ["app", "main", "user_errors"]


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `tsdfm-pipeline ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()

"""What every command of the ``tsdfm-pipeline`` command line shares: the app and its groups,
one-line user errors, the progress bar, the choices, the JSON report writer.

Conventions of every typer app and group:

* Help texts are Markdown (typer's ``rich_markup_mode="markdown"``), not Rich markup: Rich
  would read ``org/name[@rev]`` as a style tag and print ``org/name``; Markdown keeps square
  brackets and renders the help texts' ``code`` spans.
* ``-h`` is ``--help`` everywhere (subcommands inherit the root's help option names).
* Choices are enums, so ``--help`` and shell completion list them.
* One name per concept across verbs; an older name stays accepted as a hidden alias.
* Every verb that reports takes ``--json PATH`` and writes its report there.

The command modules (``build``, ``hub``, ``train``, ``models``, ``lm``, ``demo``) import
``app`` and the groups from here and register their commands on import; the package's
``__init__`` imports them all. Nothing is injected.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

EXIT_USER_ERROR = 2
MARKUP_MODE = "markdown"
HELP_OPTION_NAMES = ["-h", "--help"]


# click's UsageError as typer raises it (typer >= 0.25 carries its own copy of click), found
# through the public typer.BadParameter so that either kind of install works.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class OneLineUsageErrors(TyperGroup):
    """A command group whose commands report a bad flag (an unknown option, a missing one, a
    value outside its choices) as one line on stderr with exit code 2, like every other user
    error, instead of click's usage box."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _USAGE_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # the help was shown: not an error
                raise
            where = (e.ctx or ctx).command_path
            typer.echo(f"error: {e.format_message()} (see `{where} -h`)", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None


def typer_app(help: str, **kwargs: Any) -> typer.Typer:
    """A typer app or command group with the CLI's conventions (see the module docstring)."""
    settings = {"help_option_names": HELP_OPTION_NAMES, **kwargs.pop("context_settings", {})}
    kwargs.setdefault("no_args_is_help", True)
    return typer.Typer(
        help=help,
        rich_markup_mode=MARKUP_MODE,
        context_settings=settings,
        cls=OneLineUsageErrors,
        **kwargs,
    )


app = typer_app(
    "Trajectory-shaped discrete flow matching: shaped teacher trajectories in, "
    "few-step students out.",
    name="tsdfm-pipeline",
    pretty_exceptions_enable=False,
)
teacher_app = typer_app("Teacher models.")
data_app = typer_app("Data sources (synthetic language, corpora).")
compass_app = typer_app("Energy compass: train by generation-aware NCE, evaluate.")
lm_app = typer_app("Causal language models trained here on real text, to evaluate samples with.")
app.add_typer(teacher_app, name="teacher")
app.add_typer(compass_app, name="compass")
app.add_typer(data_app, name="data")
app.add_typer(lm_app, name="lm")


def _print_version(given: bool) -> None:
    if given:
        from tsdfm.models import __version__

        typer.echo(f"tsdfm-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Top-level options (the app's help text is the one given to typer_app above)."""


class Order(str, enum.Enum):
    """Reveal order of a sampler or a build (``tsdfm.models.solver.RevealPlan``)."""

    random = "random"
    dilated = "dilated"


class Head(str, enum.Enum):
    """What a compass outputs (``tsdfm.models.train.compass.CompassTrainConfig.head``)."""

    scalar = "scalar"
    tokens = "tokens"


class Selection(str, enum.Enum):
    """How the navigator keeps one of K candidates (tilt: no candidates, a tilted teacher)."""

    argmin = "argmin"
    softmax = "softmax"
    token_softmax = "token-softmax"
    tilt = "tilt"


class Precision(str, enum.Enum):
    """Numeric precision of a network's forward pass (bf16 autocast on CUDA only)."""

    fp32 = "fp32"
    bf16 = "bf16"


class Source(str, enum.Enum):
    """Source distribution of a teacher's mixture path."""

    mask = "mask"
    uniform = "uniform"


class Loss(str, enum.Enum):
    """Teacher pretraining loss: cross-entropy on x_1 or the generalized KL."""

    ce = "ce"
    gkl = "gkl"


def value(choice: enum.Enum | str | None) -> str | None:
    """The plain string of a choice (configs and the library take strings)."""
    return choice.value if isinstance(choice, enum.Enum) else choice


DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
JSON_HELP = "Also write the report as JSON here."
JsonOption = Annotated[Path | None, typer.Option("--json", help=JSON_HELP)]
DeviceOption = Annotated[str, typer.Option(help=DEVICE_HELP)]
PrecisionOption = Annotated[Precision, typer.Option(help="fp32 or bf16 (CUDA only)")]


def write_json(path: Path | None, report: Any) -> None:
    """``--json PATH``: the report as indented JSON (parents created), and say where."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    typer.echo(f"wrote {path}", err=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def pick(primary: Any, alias: Any, name: str, alias_name: str) -> Any:
    """The value of an option given under its name or its hidden older alias, not both."""
    if primary is not None and alias is not None and primary != alias:
        from tsdfm.models.errors import ConfigError

        raise ConfigError(f"{name} and {alias_name} name the same option; give it once")
    return primary if primary is not None else alias


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USER_ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Kubernetes and most supervisors send), raised in the main thread.

    A KeyboardInterrupt, so every ``finally`` that runs on Ctrl-C (stop the Ray actors, keep
    the manifest's last atomic write) runs on SIGTERM too.
    """


# Set by the handler as well as raised: Ray's waits turn a KeyboardInterrupt raised by a signal
# handler while they poll (Terminated too) into a plain KeyboardInterrupt, so the exception's
# type alone cannot tell SIGTERM from Ctrl-C.
_SIGTERM_SEEN = threading.Event()


def _on_sigterm(signum, frame):
    _SIGTERM_SEEN.set()
    raise Terminated


def user_errors(fn):
    """Turn the library's user errors into one line on stderr and exit code 2.

    Ctrl-C and SIGTERM stop the command cleanly with one line and exit 130 / 143.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import signal

        from tsdfm.models.errors import TsdfmError

        main = threading.current_thread() is threading.main_thread()
        _SIGTERM_SEEN.clear()
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
        try:
            return fn(*args, **kwargs)
        except TsdfmError as e:
            raise fail(str(e)) from None
        except KeyboardInterrupt as e:
            if isinstance(e, Terminated) or _SIGTERM_SEEN.is_set():
                typer.echo("terminated (SIGTERM); rerun the same command to resume", err=True)
                raise typer.Exit(128 + signal.SIGTERM) from None
            typer.echo("interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper


def progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
    )


class TrainingBar:
    """The progress bar of a trainer: ``report(step, total, metrics)`` is the trainers'
    progress callback; each of ``fields`` (metric name, format) shows when the metrics hold
    it; ``warn`` prints a warning above the live bar."""

    def __init__(self, bar: Any, label: str, total: int, fields: tuple[tuple[str, str], ...]):
        self.bar, self.fields = bar, fields
        self.task = bar.add_task(label, total=total, info="")

    def report(self, step: int, total: int, metrics: dict) -> None:
        info = "  ".join(
            fmt.format(metrics[name]) for name, fmt in self.fields if metrics.get(name) is not None
        )
        self.bar.update(self.task, completed=step, info=info)

    def warn(self, message: str) -> None:
        self.bar.console.print(f"warning: {message}", markup=False, highlight=False)


@contextlib.contextmanager
def training_bar(label: str, total: int, *fields: tuple[str, str]) -> Iterator[TrainingBar]:
    """A :class:`TrainingBar` on a live progress display, for the ``with`` block."""
    with progress() as bar:
        yield TrainingBar(bar, label, total, fields)


def default_teacher() -> str:
    from tsdfm.models.checkpoint import bundled_path

    return str(bundled_path("teacher"))

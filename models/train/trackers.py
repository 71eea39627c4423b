"""Where a trainer's metrics go besides metrics.jsonl: TensorBoard, Weights & Biases, Trackio.

metrics.jsonl is always written (``tsdfm.models.train.common.MetricsLog``); ``--report-to``
names the trackers that receive the same lines as well (``none``, or a comma list of
``tensorboard``, ``wandb``, ``trackio``). Each is an optional dependency, imported only when
asked for; a missing one is refused with one line naming the package to install, before the
first step. Only rank 0 of a job reports (``tsdfm.models.train.loop.TrainLoop``).

A tracker gets every numeric field of a metrics line under ``{trainer}/{field}`` (e.g.
``distill/loss``) at the line's step. W&B and Trackio runs are named after the run folder and
resumed with it (one tracker run per folder).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tsdfm.models.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "trackio")
PROJECT = "tsdfm-pipeline"
_INSTALL = {  # tracker → (module that must import, what to install)
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}


def parse_report_to(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"none"``, ``"tensorboard"``, ``"wandb,trackio"`` … as a tuple of tracker names
    (empty for none), or a ConfigError naming the choices."""
    if spec is None:
        return ()
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [p.strip().lower() for p in parts if p.strip()]
    if names in ([], ["none"]):
        return ()
    bad = [n for n in names if n not in TRACKERS]
    if bad or "none" in names:
        raise ConfigError(
            f"--report-to {','.join(names)}: unknown tracker {(bad or ['none'])[0]!r}; use none "
            f"or a comma list of {', '.join(TRACKERS)}"
        )
    return tuple(dict.fromkeys(names))


def check_available(names: Iterable[str]) -> None:
    """Every tracker of ``names`` can be imported, or a ConfigError naming the install."""
    for name in names:
        module, package = _INSTALL[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--report-to {name} needs the {package} package, which is not installed: "
                f"pip install {package} (or pass --report-to none)"
            )


class Trackers:
    """The trackers of one run; :meth:`log` sends a metrics line to each.

    Args:
        names: tracker names (:func:`parse_report_to`).
        run_dir: the run folder (TensorBoard writes ``run_dir/tensorboard``; W&B its files).
        trainer: the metric prefix (``distill``, ``teacher``, ``lm``, …).
        config: the run's record (run_config.json), given to W&B and Trackio as the run config.
    """

    def __init__(self, names: Iterable[str], run_dir: Path, trainer: str, config: dict):
        self.names = tuple(names)
        check_available(self.names)
        self.trainer = trainer
        self.sinks: list[tuple[str, Any]] = []
        run_name = Path(run_dir).name
        # one tracker run per run folder: a resumed run continues the same W&B / Trackio run
        run_id = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        for name in self.names:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.sinks.append((name, SummaryWriter(str(Path(run_dir) / "tensorboard"))))
            elif name == "wandb":
                wandb = importlib.import_module("wandb")
                run = wandb.init(
                    project=PROJECT,
                    name=run_name,
                    id=run_id,
                    resume="allow",
                    dir=str(run_dir),
                    config=config,
                )
                self.sinks.append((name, run))
            else:
                trackio = importlib.import_module("trackio")
                run = trackio.init(
                    project=PROJECT, name=f"{run_name}-{run_id[:8]}", config=config, resume="allow"
                )
                self.sinks.append((name, (trackio, run)))

    def log(self, line: dict[str, Any]) -> None:
        step = int(line["step"])
        scalars = {
            f"{self.trainer}/{k}": float(v)
            for k, v in line.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for name, sink in self.sinks:
            if name == "tensorboard":
                for k, v in scalars.items():
                    sink.add_scalar(k, v, step)
            elif name == "wandb":
                sink.log(scalars, step=step)
            else:
                sink[0].log(scalars, step=step)

    def close(self) -> None:
        for name, sink in self.sinks:
            if name == "tensorboard":
                sink.close()
            elif name == "wandb":
                sink.finish()
            else:
                sink[0].finish()
        self.sinks = []

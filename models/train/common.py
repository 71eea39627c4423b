"""Pieces shared by the trainers: learning-rate schedule, EMA, pickle-free trainer state, and
the run folder (run_config.json, metrics.jsonl, rotated checkpoints). The loop that uses them
is ``tsdfm.models.train.loop``.

Trainer state (optimizer moments, EMA weights, RNG states, step) is written as one safetensors
file plus a JSON file, never with pickle, so a resumed run continues bit-for-bit.

A run folder holds::

    run_config.json              the record the run belongs to (see check_run_config)
    run.lock                     the job writing the folder now (RunLock)
    metrics.jsonl                one JSON line per logged step (MetricsLog)
    checkpoints/step-0000250/    model files + trainer state; the newest KEEP_CHECKPOINTS kept
    final/                       the trained model

The folder may be in an object store (:class:`RunStore`): the trainer writes a local staging
copy and uploads each checkpoint as it completes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tsdfm.models.errors import CheckpointError, ConfigError

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "run.lock"
KEEP_CHECKPOINTS = 2


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (parameter initialisation on the CPU) under a fixed seed without touching
    the caller's global RNG state (of the CPU or of any CUDA device)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def get_lr(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then cosine decay to
    ``min_ratio · base_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of parameters: θ̄ ← d_n·θ̄ + (1 − d_n)·θ after update n,
    with d_n = min(decay, (1 + n) / (10 + n)) so that early weights do not dominate short runs."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state["__updates__"])
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily swap the EMA weights into ``model``."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(backup[k].dtype) for k, v in self.shadow.items()})
        try:
            yield
        finally:
            model.load_state_dict(backup)


@dataclass
class TrainerState:
    """Everything needed to continue a run exactly."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    ema: dict[str, torch.Tensor] | None
    generators: dict[str, torch.Tensor]
    extra: dict[str, Any]


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for pid, slots in opt_state["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{name}"] = value.detach().contiguous().cpu()
                meta["state"][str(pid)][name] = "__tensor__"
            else:
                meta["state"][str(pid)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for pid, slots in meta["state"].items():
        state[int(pid)] = {
            name: tensors[f"optim/{pid}/{name}"] if value == "__tensor__" else value
            for name, value in slots.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the tensors that share memory with an earlier one (tied weights appear under
    several names in a state dict; safetensors stores each name on its own)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def save_trainer_state(directory: Path, state: TrainerState) -> None:
    """Write trainer_state.{safetensors,json} into ``directory`` (JSON last, atomically)."""
    tensors = _unshared(
        {f"model/{k}": v.detach().contiguous().cpu() for k, v in state.model.items()}
    )
    opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
    tensors.update(opt_tensors)
    if state.ema is not None:
        tensors.update({f"ema/{k}": v.contiguous().cpu() for k, v in state.ema.items()})
    tensors.update({f"rng/{k}": v.contiguous().cpu() for k, v in state.generators.items()})
    save_file(tensors, str(directory / STATE_TENSORS))
    meta = {
        "step": state.step,
        "optimizer": opt_meta,
        "has_ema": state.ema is not None,
        "generators": sorted(state.generators),
        "extra": state.extra,
    }
    tmp = directory / (STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, directory / STATE_JSON)


def load_trainer_state(directory: Path) -> TrainerState:
    try:
        meta = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"trainer state in {directory} is unreadable ({e}); "
            "delete that checkpoint folder to resume from an earlier one"
        ) from None

    def pick(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    return TrainerState(
        step=int(meta["step"]),
        model=pick("model/"),
        optimizer=_unflatten_optimizer(tensors, meta["optimizer"]),
        ema=pick("ema/") if meta["has_ema"] else None,
        generators=pick("rng/"),
        extra=meta.get("extra", {}),
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``step-*`` folder of a run whose trainer state was written completely."""
    candidates = sorted(
        (p for p in run_dir.glob("checkpoints/step-*") if (p / STATE_JSON).exists()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return candidates[-1] if candidates else None


def resume_latest(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None
) -> TrainerState | None:
    """Load the newest complete checkpoint of ``run_dir`` into model, optimizer and EMA.

    Returns its state (step, generators, extra) for the caller's own RNGs and data position,
    or None when the run has no checkpoint yet.
    """
    resume_from = latest_checkpoint(run_dir)
    if resume_from is None:
        return None
    state = load_trainer_state(resume_from)
    model.load_state_dict(state.model)
    saved = [len(g["params"]) for g in state.optimizer["param_groups"]]
    wanted = [len(g["params"]) for g in optimizer.param_groups]
    if saved != wanted:
        raise CheckpointError(
            f"{resume_from} holds optimizer state for parameter groups of {saved} tensors, this "
            f"trainer has groups of {wanted} (the checkpoint was written by a version that "
            "grouped the parameters for weight decay differently); pass a new --out, or delete "
            "the folder to start over"
        )
    optimizer.load_state_dict(state.optimizer)
    if ema is not None and state.ema is not None:
        ema.load_state_dict(state.ema)
    return state


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint taken after ``step`` steps: checkpoints/step-0000123."""
    return run_dir / "checkpoints" / f"step-{step:07d}"


def rotate_checkpoints(run_dir: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    """Delete all but the newest ``keep`` checkpoint folders of a run."""
    assert keep >= 1, keep
    folders = sorted(run_dir.glob("checkpoints/step-*"), key=lambda p: p.name)
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_step_state(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    generators: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
    keep: int = KEEP_CHECKPOINTS,
) -> None:
    """Write the trainer state after ``step`` steps into :func:`checkpoint_dir` (beside the
    model files the trainer saved there first), then keep the newest ``keep`` checkpoints.

    The counterpart of :func:`resume_latest`.
    """
    directory = checkpoint_dir(run_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    save_trainer_state(
        directory,
        TrainerState(
            step=step,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            ema=ema.state_dict() if ema is not None else None,
            generators=generators,
            extra=extra if extra is not None else {},
        ),
    )
    rotate_checkpoints(run_dir, keep)


def check_run_config(
    run_dir: Path, record: dict[str, Any], holds: str = "a run", names: dict[str, str] | None = None
) -> None:
    """A run folder belongs to one record; resuming it with another one is refused.

    The first call writes ``record`` to run_config.json; a later call with a different record
    raises a ConfigError naming what changed: each changed key of ``record["run"]`` (the
    trainer config), then each other changed part of the record, in record order.

    Args:
        run_dir: the run folder.
        record: JSON-able; ``record["run"]`` is the trainer config, the other keys are what
            else the run depends on (data, teacher, ...).
        holds: what the folder holds, for the message ("a run", "an LM run").
        names: how a changed part is named in the message (default: its key), e.g.
            ``{"data": "dataset"}``.
    """
    names = names or {}
    record = json.loads(json.dumps(record))
    path = run_dir / RUN_CONFIG_FILE
    if not path.exists():
        path.write_text(json.dumps(record, indent=1))
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is not valid JSON; delete {run_dir} to start over") from None
    if old == record:
        return
    run, old_run = record["run"], old.get("run", {})
    changed = sorted(k for k in set(old_run) | set(run) if old_run.get(k) != run.get(k))
    parts = [k for k in record if k != "run"] + [k for k in old if k not in record]
    changed += [names.get(k, k) for k in parts if old.get(k) != record.get(k)]
    raise ConfigError(
        f"{run_dir} holds {holds} with a different config (changed: {', '.join(changed)}); "
        "pass a new --out or delete the folder to start over"
    )


def due(done: int, every: int, total: int) -> bool:
    """Whether a periodic action (evaluation, checkpoint) runs once ``done`` of ``total``
    steps are done: every ``every`` steps and after the last one."""
    return done % every == 0 or done == total


class MetricsLog:
    """A run's metrics.jsonl, appended to one line per logged step and flushed at once.

    ``history`` holds the lines this session wrote. Use as a context manager.

    Args:
        run_dir: the run folder.
        resume_step: drop the lines of steps after this one first (a resumed run rewrites
            them); None keeps the file as it is.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / METRICS_FILE
        self.resume_step = resume_step
        self.history: list[dict] = []

    def __enter__(self) -> MetricsLog:
        if self.resume_step is not None and self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= self.resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def write(self, metrics: dict) -> None:
        self.history.append(metrics)
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One job writes a run folder at a time: ``run.lock`` holds the identity of the job
    that writes it (job id, host, process id, start time).

    :meth:`acquire` creates the file atomically (O_EXCL). A lock held by the same job (a
    torchrun restart of it) or by a process of this host that no longer runs (a killed run)
    is taken over; any other holder is refused with a ConfigError naming it. Rank 0 of a job
    takes the lock for all its ranks.

    Args:
        run_dir: the run folder.
        job: this job's id (``tsdfm.models.train.distributed.World.job``).
    """

    def __init__(self, run_dir: Path, job: str):
        self.path = Path(run_dir) / LOCK_FILE
        self.identity = {
            "job": job,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(self.identity, indent=1)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # released meanwhile
                    continue
                note = self._stale(holder)
                tmp = self.path.with_name(LOCK_FILE + f".{os.getpid()}.tmp")
                tmp.write_text(body)
                os.replace(tmp, self.path)
                return note
            with os.fdopen(fd, "w") as f:
                f.write(body)
            return None
        raise ConfigError(f"cannot take {self.path}; retry")

    def _stale(self, holder: dict) -> str | None:
        """None when ``holder`` is this job; a note when it is gone; else a ConfigError."""
        if holder.get("job") == self.identity["job"]:
            return None
        same_host = holder.get("host") == self.identity["host"]
        pid = holder.get("pid")
        if holder and same_host and isinstance(pid, int) and not _alive(pid):
            return (
                f"{self.path.parent}: took over the lock of job {holder.get('job')} (pid {pid}, "
                "no longer running); resuming its run"
            )
        who = (
            f"job {holder.get('job')} (pid {pid} on {holder.get('host')}, since "
            f"{holder.get('started')})"
            if holder
            else "an unreadable lock"
        )
        raise ConfigError(
            f"run folder {self.path.parent} is being written by {who}; wait for it to end or "
            f"pass another --out (if that job is gone, delete {self.path})"
        )

    def release(self) -> None:
        """Remove the lock if it is still this job's."""
        holder = self._holder()
        if holder and holder.get("job") == self.identity["job"]:
            self.path.unlink(missing_ok=True)


# --------------------------------------------------------- run folders in object stores
class RunStore:
    """Where a run folder lives: a local folder, or a folder at an fsspec URL (``s3://``,
    ``gs://``, ``memory://``, …) mirrored by a local staging folder.

    The trainer always writes the staging folder (:attr:`local`); for a URL, :meth:`pull`
    first restores the run's state from the store (run_config.json, metrics.jsonl, run.lock
    and its newest complete checkpoint), and every checkpoint is then uploaded with its
    trainer_state.json last (:meth:`push_checkpoint`), so a checkpoint in the store counts
    only once it is complete, exactly as in a local folder; checkpoints rotated away locally
    are removed from the store. The lock is mirrored as well, so a second job on another
    machine that pulls the folder sees the first one's lock and is refused.

    Args:
        out: a folder, ``file://`` URL or other fsspec URL.
        staging: the staging folder for a URL (default: under ``$TSDFM_CACHE/runs``, else
            ``~/.cache/tsdfm-pipeline/runs``, named after the URL).
    """

    def __init__(self, out: str | Path, staging: Path | None = None):
        text = str(out)
        self.url: str | None = None
        self.fs, self.root = None, ""
        if "://" not in text:
            self.local = Path(text).expanduser()
            return
        from fsspec.core import url_to_fs

        try:
            fs, root = url_to_fs(text)
        except (ImportError, ValueError) as e:
            raise ConfigError(
                f"--out {text}: no fsspec driver for it ({e}); install it (s3fs for s3://, "
                "gcsfs for gs://) or pass a local folder"
            ) from None
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if "file" in protocols:  # file://: a local folder
            self.local = Path(root)
            return
        self.url, self.fs, self.root = text.rstrip("/"), fs, root.rstrip("/")
        if staging is None:
            import hashlib

            key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
            base = os.environ.get("TSDFM_CACHE") or os.path.join(
                os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "tsdfm-pipeline"
            )
            staging = Path(base).expanduser() / "runs" / f"{Path(self.root).name or 'run'}-{key}"
        self.local = staging

    @property
    def remote(self) -> bool:
        return self.url is not None

    def where(self, rel: str = "") -> str:
        """What messages name: the URL (or local path) of ``rel`` inside the run folder."""
        if self.url is None:
            return str(self.local / rel) if rel else str(self.local)
        return f"{self.url}/{rel}" if rel else self.url

    def _io(self, what: str, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            first = (str(e).splitlines() or [""])[0][:160]
            raise CheckpointError(
                f"cannot {what} {self.url} ({type(e).__name__}: {first}); check the URL and "
                "your credentials for that store"
            ) from None

    def pull(self) -> None:
        """Make the staging folder the store's run: its records and newest checkpoint."""
        if self.url is None:
            return
        fs, root = self.fs, self.root
        if self.local.exists():
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True)

        def pull() -> None:
            for name in (RUN_CONFIG_FILE, METRICS_FILE, LOCK_FILE):
                if fs.isfile(f"{root}/{name}"):
                    fs.get_file(f"{root}/{name}", str(self.local / name))
            steps = (
                sorted(
                    p.rstrip("/").rsplit("/", 1)[1]
                    for p in fs.ls(f"{root}/checkpoints", detail=False)
                    if fs.isfile(f"{p.rstrip('/')}/{STATE_JSON}")
                )
                if fs.isdir(f"{root}/checkpoints")
                else []
            )
            if steps:
                rel = f"checkpoints/{steps[-1]}"
                fs.get(f"{root}/{rel}/", str(self.local / rel) + "/", recursive=True)

        self._io("read the run folder", pull)

    def push(self, rel: str) -> None:
        """Upload the file or folder ``rel`` of the staging folder (replacing what is there)."""
        if self.url is None:
            return
        src, dst = self.local / rel, f"{self.root}/{rel}"

        def push() -> None:
            if src.is_dir():
                for f in sorted(p for p in src.rglob("*") if p.is_file()):
                    target = f"{dst}/{f.relative_to(src).as_posix()}"
                    self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                    self.fs.put_file(str(f), target)
            elif src.exists():
                self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(src), dst)

        self._io("write to", push)

    def push_checkpoint(self, step: int) -> None:
        """Upload the checkpoint after ``step`` steps (trainer_state.json last), drop the
        store's checkpoints that rotated away locally, then the metrics and run records."""
        if self.url is None:
            return
        directory = checkpoint_dir(self.local, step)
        rel = directory.relative_to(self.local).as_posix()
        for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != STATE_JSON):
            self.push(f"{rel}/{f.relative_to(directory).as_posix()}")
        self.push(f"{rel}/{STATE_JSON}")

        def rotate() -> None:
            kept = {p.name for p in self.local.glob("checkpoints/step-*")}
            for p in self.fs.ls(f"{self.root}/checkpoints", detail=False):
                if p.rstrip("/").rsplit("/", 1)[1] not in kept:
                    self.fs.rm(p, recursive=True)

        self._io("rotate the checkpoints of", rotate)
        for name in (METRICS_FILE, RUN_CONFIG_FILE):
            self.push(name)

    def remove(self, rel: str) -> None:
        """Delete ``rel`` from the store (the lock at the end of a run)."""
        if self.url is not None and self.fs.exists(f"{self.root}/{rel}"):
            self._io("write to", self.fs.rm, f"{self.root}/{rel}")

"""One driver per output: ``<out>/.tsdfm-build.lock`` while a build writes there.

The lock file is a small JSON object (host, pid, start time) created exclusively
(``O_CREAT | O_EXCL`` on a local disk). A second driver that finds it refuses with one line
naming the holder. A lock left by a process that is gone (same host, pid no longer running:
the driver was killed) is taken over, and the build says so. A lock from another host cannot
be checked from here; the message says how to remove it when that build is known to be dead.

On object stores (fsspec URLs) creation is check-then-write, not atomic: it still stops the
common mistake (the same command started twice), not a race within milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass

from fsspec.implementations.local import LocalFileSystem

from tsdfm.models.errors import ConfigError
from tsdfm.pipeline.shards import open_root

LOCK_FILE = ".tsdfm-build.lock"


class LockedError(ConfigError):
    """Another driver is building into this output."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, since {when}"


def _me() -> Holder:
    return Holder(socket.gethostname(), os.getpid(), time.time())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class BuildLock:
    """Context manager holding ``root/.tsdfm-build.lock``.

    Args:
        root: the dataset root (local path or fsspec URL); created if absent.

    After ``__enter__``, :attr:`took_over` is the holder of a stale lock that was replaced
    (None when the folder was free).
    """

    def __init__(self, root: str):
        self.root = str(root)
        self.fs, base = open_root(self.root)
        self.base = base.rstrip("/")
        self.path = f"{self.base}/{LOCK_FILE}"
        self.took_over: Holder | None = None
        self._created_root = False
        self._held = False

    def __enter__(self) -> BuildLock:
        if not self.fs.exists(self.base):
            self._created_root = True
        try:
            self.fs.makedirs(self.base, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"output {self.root} cannot be created ({e.strerror or e}); pick another"
            ) from None
        for _ in range(2):
            if self._create():
                self._held = True
                return self
            holder = self._read()
            me = _me()
            if holder is not None and holder.host == me.host and not _alive(holder.pid):
                self.fs.rm(self.path)  # stale: its driver is gone
                self.took_over = holder
                continue
            who = holder.describe() if holder is not None else "an unreadable lock file"
            raise LockedError(
                f"another build is writing to {self.root} ({who}); wait for it to finish, or, "
                f"if it is gone, delete {self.path} and rerun"
            )
        raise LockedError(f"could not take the lock {self.path}; delete it and rerun")

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        with contextlib.suppress(OSError):  # a lock of a dead pid is taken over next time
            self.fs.rm(self.path)
        if self._created_root:
            self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        """A build that failed before writing anything leaves no folder behind."""
        try:
            if self.fs.isdir(self.base) and not self.fs.ls(self.base):
                self.fs.rmdir(self.base)
        except OSError:
            pass

    def _create(self) -> bool:
        holder = _me()
        text = json.dumps(holder.__dict__, sort_keys=True).encode()
        if isinstance(self.fs, LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            except OSError as e:
                raise ConfigError(
                    f"output {self.root} is not writable ({e.strerror or e}); pick another"
                ) from None
            with os.fdopen(fd, "wb") as f:
                f.write(text)
            return True
        if self.fs.exists(self.path):
            return False
        with self.fs.open(self.path, "wb") as f:
            f.write(text)
        return True

    def _read(self) -> Holder | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                d = json.loads(f.read())
            return Holder(str(d["host"]), int(d["pid"]), float(d["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

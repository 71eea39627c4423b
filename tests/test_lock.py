"""The build lock: one driver per --out; a lock of a dead driver is taken over (no Ray)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tsdfm.pipeline.lock import LOCK_FILE, BuildLock, LockedError


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    root = tmp_path / "ds"
    with BuildLock(str(root)) as held:
        assert held.took_over is None and (root / LOCK_FILE).is_file()
        with pytest.raises(LockedError) as e:
            BuildLock(str(root)).__enter__()
        line = str(e.value)
        assert "\n" not in line and "another build is writing to" in line
        assert f"pid {os.getpid()} on {socket.gethostname()}" in line
    assert not root.exists()  # created by the lock, left empty: removed with it


def test_a_lock_of_a_dead_driver_is_taken_over(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": 1.0e9}
    (root / LOCK_FILE).write_text(json.dumps(stale))
    with BuildLock(str(root)) as lock:
        assert lock.took_over is not None and lock.took_over.pid == stale["pid"]
        assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert root.is_dir() and not (root / LOCK_FILE).exists()  # the folder was there before


def test_a_lock_from_another_host_or_unreadable_is_not_taken(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(LockedError, match=r"pid 1 on elsewhere.*if it is gone, delete"):
        BuildLock(str(root)).__enter__()
    (root / LOCK_FILE).write_text("garbage")
    with pytest.raises(LockedError, match="an unreadable lock file"):
        BuildLock(str(root)).__enter__()

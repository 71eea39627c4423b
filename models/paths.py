"""One confinement rule for every path that comes from a file, and one way to write a folder.

A checkpoint's ``config.json`` names its data files (``data.language``), a dataset card names
its Parquet files (``configs[].data_files``), a manifest names its shards. Such a path is
relative to the folder that holds the file and must stay inside it: joined to that root and
resolved (``..`` collapsed, symlinks followed), it has to lie under the resolved root. An
absolute path, a ``..`` that climbs out, or a symlink that points out is refused with one line,
because following it would read (or copy, or train on) a file the folder does not own. One
exception: in a snapshot of the Hub's local cache (``<repo>/snapshots/<commit>/``) every file is
a link into the same repo's ``blobs/``, and those links are followed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

from tsdfm.models.errors import PathError


def confined(root: str | Path, relative: str | Path, what: str) -> Path:
    """``root / relative`` resolved, if it lies inside ``root``; else a PathError.

    Args:
        root: the folder that holds the file the path came from (a local directory).
        relative: the path as written in that file.
        what: where it was read, for the message (e.g. "config.json data.language").

    Returns:
        The resolved path (it need not exist).
    """
    text = str(relative)
    rel = PurePosixPath(text.replace("\\", "/"))
    if not text.strip() or "\0" in text:
        raise PathError(f"{what} is {text!r}, not a file name inside {root}")
    if rel.is_absolute() or PureWindowsPath(text).drive or PureWindowsPath(text).is_absolute():
        raise PathError(
            f"{what} is the absolute path {text!r}; it must be relative to {root} and stay "
            "inside it: fix the file or rebuild it"
        )
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if ".." not in rel.parts and _in_own_blob_store(base, target):
        return target
    if target != base and base not in target.parents:
        how = "through a symlink" if ".." not in rel.parts else "with '..'"
        raise PathError(
            f"{what} is {text!r}, which leads outside {base} {how} (to {target}); a path read "
            "from a file must stay inside its own folder: fix the file or rebuild it"
        )
    return target


def _in_own_blob_store(base: Path, target: Path) -> bool:
    """Whether ``base`` is a snapshot of the Hub's local cache (``<repo>/snapshots/<commit>``)
    and ``target`` lies in that same repo's blob store (``<repo>/blobs``): every file of a
    downloaded snapshot is a link there, and such a link stays inside what was downloaded."""
    if base.parent.name != "snapshots":
        return False
    blobs = base.parent.parent / "blobs"
    return blobs.is_dir() and blobs in target.parents


@contextmanager
def staged_dir(directory: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``directory`` that takes its place when the block completes.

    Everything a checkpoint, an LM or a cache folder holds is written into the yielded folder;
    on a clean exit it is renamed into place (an existing ``directory`` is first renamed aside,
    then removed), so a reader sees the old folder or the new one, never a half-written one. On
    any exception the temporary folder is removed and ``directory`` is left as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

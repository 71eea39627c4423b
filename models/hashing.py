"""Canonical bytes and digests: the one way this project turns an object or a file into a hash.

Checkpoint identities, build fingerprints, shard metadata, manifest digests and evaluator
identities all hash :func:`canonical_json`; shard checksums and LM weight files use
:func:`file_sha256`. This module imports nothing heavy, so every layer can use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tsdfm.models.errors import ShardError, TsdfmError

_CHUNK = 1 << 20


def canonical_json(
    obj: Any, what: str = "shard metadata", error: type[TsdfmError] = ShardError
) -> bytes:
    """Sorted keys, no whitespace, strict JSON (no NaN): the same object gives the same bytes.

    Args:
        obj: str, finite numbers, bools, None, lists and dicts of them.
        what: how the message names ``obj`` when it is not plain JSON.
        error: the error raised then (a ShardError unless the caller says otherwise).
    """
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise error(
            f"{what} is not plain JSON ({e}); use str, finite numbers, lists and dicts"
        ) from None


def sha256_json(
    obj: Any, what: str = "shard metadata", error: type[TsdfmError] = ShardError
) -> str:
    """``sha256:<hex>`` of :func:`canonical_json` of ``obj``."""
    return "sha256:" + hashlib.sha256(canonical_json(obj, what, error)).hexdigest()


def file_sha256(path: str | Path, fs: Any = None) -> str:
    """Hex sha256 of a file's bytes, streamed in 1 MiB chunks.

    Args:
        path: the file; a path of ``fs`` when given, else a local path.
        fs: an ``fsspec.AbstractFileSystem`` (None: the local file system).
    """
    h = hashlib.sha256()
    with open(path, "rb") if fs is None else fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
